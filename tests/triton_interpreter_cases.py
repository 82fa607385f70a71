"""Triton kernels under Triton's interpreter, on CPU, against direct references.

Not collected by the main test run (the file name does not start with ``test_``):
``tests/test_triton_kernel.py`` runs it in a subprocess with ``TRITON_INTERPRET=1`` set before
``triton`` is imported, which the interpreter needs and which must not leak into other tests.
Shapes are small (the interpreter runs every program in Python) but odd on purpose: K not a
multiple of 8 or 32, one-row and empty groups, base rows, format-2 deltas with rows left out.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run
    pytest.skip("run through tests/test_triton_kernel.py (needs TRITON_INTERPRET=1 before triton imports)",
                allow_module_level=True)
pytest.importorskip("triton")

from bitdelta_core import triton_kernel as tk  # noqa: E402
from bitdelta_core.apply import apply  # noqa: E402
from bitdelta_core.codec import encode  # noqa: E402
from bitdelta_core.compress import compress  # noqa: E402
from bitdelta_core.multitenant import MultiTenantEngine  # noqa: E402
from bitdelta_core.packing import unpack_signs  # noqa: E402

from tenant_fixtures import VOCAB, finetune_tiny, save_tiny_base  # noqa: E402

# |kernel - float64 reference| <= TOL * (1 + |reference|): float32 accumulates in a different
# order; fp16/bf16 round the output once (the interpreter's bf16 conversion truncates: 2 ulps)
TOL = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]


def _delta(rows, cols, g, unchanged=()):
    d = torch.randn(rows, cols, generator=g) * 0.1
    for r in unchanged:
        d[r] = 0
    return encode(d)


def _direct(x, W, groups, transposed):
    """``x_g @ (W + α[:, None] * sign)ᵀ`` (Conv1D: ``x_g @ (W + α[:, None] * sign)``) per group,
    in float64, from the SignDelta's own decode: independent of the kernel's bit addressing."""
    rows = W.shape[0]
    out = torch.zeros(x.shape[0], W.shape[1] if transposed else rows, dtype=torch.float64)
    for s, e, code, b in groups:
        w = W.double() + (code.decode(torch.float64) if code is not None else 0)
        y = x[s:e].double() @ (w if transposed else w.t())
        out[s:e] = y + (b.double() if b is not None else 0)
    return out


def _check(got, want, dtype, what=""):
    err = (got.double() - want).abs() / (1 + want.abs())
    assert float(err.max()) <= TOL[dtype], f"{what}: max relative error {float(err.max()):.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("N,K", [(37, 45), (24, 16), (5, 70)], ids=["K45", "K16", "N5-K70"])
def test_grouped_linear_equals_base_plus_scaled_signs(N, K, transposed, dtype):
    g = torch.Generator().manual_seed(N * 100 + K)
    R, C = (K, N) if transposed else (N, K)  # rows/cols of the weight and of its sign matrix
    W = torch.randn(R, C, generator=g).to(dtype)
    sizes = [5, 0, 17, 1, 9, 3, 1]  # an empty group, one-row groups, a group over BLOCK_M = 16
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    x = torch.randn(sum(sizes), K, generator=g).to(dtype)
    codes = [_delta(R, C, g), _delta(R, C, g, range(0, R, 3)), _delta(R, C, g), None,
             _delta(R, C, g, [R - 1]), None, _delta(R, C, g, range(1, R))]
    assert codes[1].rowmask is not None and codes[0].rowmask is None  # format 2 and full deltas
    biases = [torch.randn(N, generator=g).to(dtype) for _ in sizes]
    groups = [(s, s + n, None if c is None else c.signs, None if c is None else c.kept_scales(dtype),
               None if c is None else c.kept_rows(), b) for s, n, c, b in zip(starts, sizes, codes, biases)]
    out = torch.full((sum(sizes), N), float("nan"), dtype=dtype)
    tk.grouped_linear(x, W, groups, transposed=transposed, out=out)
    # scales as the kernel saw them (in x's dtype): the reference decodes with those
    ref_codes = [None if c is None else _rescaled(c, dtype) for c in codes]
    want = _direct(x, W, [(s, s + n, c, b) for s, n, c, b in zip(starts, sizes, ref_codes, biases)], transposed)
    assert not out.isnan().any()
    _check(out, want, dtype, f"{N}x{K} {'conv1d' if transposed else 'linear'} {dtype}")
    # the base rows really are the base and the deltas really change the output
    s3 = starts[3]
    _check(out[s3:s3 + 1], (x[s3:s3 + 1].double() @ (W.double() if transposed else W.double().t())) + biases[3].double(),
           dtype, "base rows")
    base_out = x[:5].double() @ (W.double() if transposed else W.double().t()) + biases[0].double()
    assert float(((out[:5].double() - base_out).abs() / (1 + base_out.abs())).max()) > 4 * TOL[dtype]


def _rescaled(code, dtype):
    """``code`` with its scales rounded to ``dtype`` (what the engine keeps and the kernel reads)."""
    from bitdelta_core.codec import SignDelta

    return SignDelta(code.shape, code.signs, code.scale.to(dtype).float(), code.granularity, code.rowmask)


def test_grouped_linear_without_bias_matches_and_leaves_other_rows():
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(19, 13, generator=g), torch.randn(12, 13, generator=g)
    code = _delta(19, 13, g, [0, 7])
    out = torch.full((12, 19), 7.0)
    tk.grouped_linear(x, W, [(2, 6, code.signs, code.kept_scales(), code.kept_rows(), None), (6, 6), (6, 9)], out=out)
    want = _direct(x, W, [(2, 6, code, None), (6, 9, None, None)], False)
    _check(out[2:9], want[2:9], torch.float32)
    assert torch.equal(out[:2], torch.full((2, 19), 7.0)) and torch.equal(out[9:], torch.full((3, 19), 7.0))
    # rows left out of a format-2 delta contribute exactly nothing: those outputs are the base's
    torch.testing.assert_close(out[2:6, [0, 7]], x[2:6] @ W[[0, 7]].t(), atol=1e-5, rtol=0)


def test_padded_plan_and_large_groups():
    """Tiles of a plan padded to a fixed count are no-ops; groups larger than BLOCK_M take several tiles."""
    g = torch.Generator().manual_seed(2)
    W, x = torch.randn(33, 40, generator=g), torch.randn(150, 40, generator=g)
    c1, c2 = _delta(33, 40, g), _delta(33, 40, g, [3])
    spans = [(0, 70), (70, 71), (71, 150)]
    plan = tk.make_plan(spans, "cpu", pad_tiles_to=tk.make_plan(spans, "cpu").n_tiles + 5)
    assert plan.block_m == 64 and plan.n_tiles == 2 + 1 + 2 + 5
    out = tk.grouped_linear(x, W, [(0, 70, c1.signs, c1.kept_scales(), None, None), (70, 71),
                                   (71, 150, c2.signs, c2.kept_scales(), c2.kept_rows(), None)], plan=plan)
    _check(out, _direct(x, W, [(0, 70, c1, None), (70, 71, None, None), (71, 150, c2, None)], False), torch.float32)


def test_bad_groups_are_refused():
    W, x = torch.randn(8, 12), torch.randn(4, 12)
    code = _delta(8, 12, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="covering"):
        tk.grouped_linear(x, W, [(0, 4, code.signs[:3], code.kept_scales(), None, None)])
    with pytest.raises(ValueError, match="one scale per stored row"):
        tk.grouped_linear(x, W, [(0, 4, code.signs, code.kept_scales()[:2], None, None)])
    with pytest.raises(ValueError, match="outside"):
        tk.grouped_linear(x, W, [(2, 9)])
    with pytest.raises(ValueError, match="ascending"):
        tk.grouped_linear(x, W, [(2, 4), (0, 2)])
    with pytest.raises(ValueError, match="every group has a bias or none"):
        tk.grouped_linear(x, W, [(0, 2, None, None, None, torch.zeros(8)), (2, 4)])
    with pytest.raises(ValueError, match="dtype"):
        tk.grouped_linear(x.double(), W.double(), [(0, 4)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_grouped_embedding_gathers_from_packed_bits(dtype):
    g = torch.Generator().manual_seed(3)
    V, D = 53, 21  # D not a multiple of 8: rows do not start on a byte
    E = torch.randn(V, D, generator=g).to(dtype)
    c1 = _delta(V, D, g, range(0, V, 2))  # format 2: even rows unchanged
    c2 = _delta(V, D, g)
    ids = torch.randint(0, V, (8, 5), generator=g)
    groups = [(0, 3, c1.signs, c1.kept_scales(dtype), c1.kept_rows()), (3, 4), (4, 4),
              (4, 8, c2.signs, c2.kept_scales(dtype), None)]
    out = tk.grouped_embedding(ids, E, groups)
    d1, d2 = _rescaled(c1, dtype).decode(torch.float64), _rescaled(c2, dtype).decode(torch.float64)
    want = E.double()[ids]
    want[:3] += d1[ids[:3]]
    want[4:] += d2[ids[4:]]
    assert out.shape == (8, 5, D) and out.dtype == dtype
    _check(out, want, dtype, "embedding")
    even = ids[:3] % 2 == 0  # tokens whose row the fine-tune left unchanged: exactly the base row
    assert torch.equal(out[:3][even], E[ids[:3][even]])


def test_position_map_marks_rows_left_out():
    idx = torch.tensor([1, 4, 5])
    pos = tk.position_map(idx, 7)
    assert pos.tolist() == [-1, 0, -1, -1, 1, 2, -1]
    assert tk.position_map(idx, 7) is pos  # cached per index tensor
    # the kernels address the signs of stored position p, column c at bit p * cols + c
    code = _delta(7, 5, torch.Generator().manual_seed(4), [0, 2, 3, 6])
    assert code.kept_rows().tolist() == [1, 4, 5]
    signs = unpack_signs(code.signs, (3, 5))
    torch.testing.assert_close(code.decode()[4], code.kept_scales()[int(pos[4])] * signs[int(pos[4])])


# ---------------------------------------------------------------------------------------------
# the engine on its Triton path (CPU tensors under the interpreter): mixed batch vs apply()
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["bert", "gpt2"])
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"triton_{arch}")
    base = save_tiny_base(root / "base", arch)
    arts, refs = {}, {}
    for i, (name, labels) in enumerate([("a", 2), ("b", 2), ("c", 3)]):
        ft = finetune_tiny(base, root / name, labels, seed=10 + i)
        arts[name] = compress(base, ft, progress=False)
        refs[name] = apply(base, arts[name])
    refs[None] = apply(base, compress(base, base, progress=False))
    return arch, base, arts, refs


def test_engine_triton_path_matches_per_model_reference(setup, monkeypatch):
    arch, base, arts, refs = setup
    launches = []
    real = tk.launch_linear
    monkeypatch.setattr(tk, "launch_linear", lambda *a, **k: launches.append(len(a[4].spans)) or real(*a, **k))
    eng = MultiTenantEngine(base, triton_kernel=True, cpu_kernel=False)
    for n, a in arts.items():
        eng.register(n, a)
    g = torch.Generator().manual_seed(0)
    # heads of one width (dense head weights: GEMMs beside the launch) and of two widths (that
    # layer falls back to the per-group path)
    for names in (["a", "b", None, "b", "a", None, "a"], ["a", "b", None, "c", "a", "b", "c"]):
        ids = torch.randint(4, VOCAB, (len(names), 6), generator=g)
        mask = torch.ones_like(ids)
        mask[2, 4:] = 0
        launches.clear()  # (the engine's start-up self-check ran it too)
        logits = eng.forward({"input_ids": ids, "attention_mask": mask}, names)
        for i, n in enumerate(names):
            with torch.no_grad():
                ref = refs[n](input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0]
            torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=1e-4, rtol=0,
                                       msg=f"{arch} row {i} ({n})")
        assert not torch.allclose(logits[0], logits[2], atol=1e-3)
        # every Linear/Conv1D ran all groups of the batch (tenants + base) in one launch
        assert launches and set(launches) == {len(set(names))}
    mem = eng.memory_report()
    assert mem["triton_kernel"] and mem["cache_bytes"] == 0  # no merged weights anywhere


def test_engine_table_rows_follow_tenants(setup):
    """A removed tenant's table row is freed and reused by the next one; every layer rewrites it
    before use, so the new tenant's rows never run with the old tenant's deltas."""
    import gc

    arch, base, arts, refs = setup
    eng = MultiTenantEngine(base, triton_kernel=True, cpu_kernel=False, self_check=False)
    eng.register("x", arts["a"])
    eng.register("y", arts["b"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 5), generator=g)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    eng.forward(enc, ["x", "y", None])
    tables = eng._triton_tables
    row_x = tables.row(eng._tenants["x"])
    eng.unregister("x")
    gc.collect()
    assert row_x not in tables.owners()
    eng.register("z", arts["c"])
    logits = eng.forward(enc, ["z", "y", "z"])
    assert tables.row(eng._tenants["z"]) == row_x  # the freed row, reused
    for i, n in enumerate(["c", "b", "c"]):
        with torch.no_grad():
            ref = refs[n](input_ids=ids[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=1e-4, rtol=0, msg=f"{arch} row {i}")
    # a re-registered name is a new tenant object: a new row, the new deltas
    eng.register("y", arts["a"], replace=True)
    logits = eng.forward(enc, ["y"] * 3)
    for i in range(3):
        with torch.no_grad():
            ref = refs["a"](input_ids=ids[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i], ref, atol=1e-4, rtol=0)


def test_engine_triton_path_with_per_group_attention(tmp_path, monkeypatch):
    """DeBERTa-v3 reads its relative-position table outside any layer's forward: its attention
    runs once per tenant group (each group's layers one single-group launch), the rest of the
    model one launch for all groups; the mixed batch equals per-model ``apply``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model("deberta-v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=VOCAB, relative_attention=True,
                               pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=8,
                               norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(base)
    arts = {n: compress(base, finetune_tiny(base, tmp_path / n, 2, seed=s), progress=False)
            for n, s in (("a", 1), ("b", 2))}
    refs = {n: apply(base, a) for n, a in arts.items()}
    refs[None] = apply(base, compress(base, base, progress=False))
    launches = []
    real = tk.launch_linear
    monkeypatch.setattr(tk, "launch_linear", lambda *a, **k: launches.append(len(a[4].spans)) or real(*a, **k))
    eng = MultiTenantEngine(base, triton_kernel=True, cpu_kernel=False)
    assert eng.memory_report()["per_group_modules"] == ["DisentangledSelfAttention"]
    for n, a in arts.items():
        eng.register(n, a)
    names = ["a", None, "b", "a", "b"]
    ids = torch.randint(4, VOCAB, (len(names), 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    launches.clear()
    logits = eng.forward({"input_ids": ids, "attention_mask": mask}, names)
    for i, n in enumerate(names):
        with torch.no_grad():
            ref = refs[n](input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i], ref, atol=1e-4, rtol=0, msg=f"row {i} ({n})")
    assert set(launches) == {1, 3}  # per-group attention projections; the other layers all groups at once
    assert eng.memory_report()["cache_bytes"] == 0


def test_delta_tables_assign_and_release_rows():
    class T:  # any object stands for a tenant
        pass

    tables = tk.DeltaTables("cpu")
    a, b = T(), T()
    assert tables.row(None) == tk.BASE_ROW == 0
    ra, rb = tables.row(a), tables.row(b)
    assert {ra, rb} == {1, 2} and tables.row(a) == ra
    v = tables.version
    del a
    import gc

    gc.collect()
    assert tables.version > v and set(tables.owners()) == {rb}
    c = T()
    assert tables.row(c) == ra and tables.capacity == 3


def test_triton_layer_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks.triton_layer runs end to end (tiny shapes; on a GPU it times the real ones)."""
    from benchmarks import triton_layer

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = triton_layer.main(["--device", "cpu", "--shapes", "40x24", "--groups", "1", "3", "--tokens", "37",
                           "--reps", "1"])
    assert [r["groups"] for r in s["rows"]] == [1, 3]
    assert all(r["max_rel_err"] < 2e-3 for r in s["rows"])  # fp16 merged-weight reference
    assert (tmp_path / "triton_layer.md").read_text().count("\n") == 4
