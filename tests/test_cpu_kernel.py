"""The optional compiled CPU kernel: fused grouped Linear vs merged weights, and the fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from bitdelta_core import cpu_kernel
from bitdelta_core.codec import encode
from bitdelta_core.multitenant import MultiTenantEngine, merged_weight

from tenant_fixtures import VOCAB, finetune_tiny, save_tiny_base


@pytest.fixture(scope="module")
def mod():
    m = cpu_kernel.load()
    if m is None:
        pytest.skip(f"compiled CPU kernel unavailable here: {cpu_kernel._state.get('error')}")
    return m


def _tenant(N, K, g, unchanged=()):
    delta = torch.randn(N, K, generator=g) * 1e-2
    for r in unchanged:
        delta[r] = 0
    code = encode(delta)
    return code, code.kept_scales(), code.kept_rows()


@pytest.mark.parametrize("small_rows,chunk_rows", [(0, None), (8, None), (8, 4), (1000, None), (1000, 8)],
                         ids=["gemm", "both", "both-chunked", "register-blocked", "register-blocked-chunked"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("N,K", [(40, 24), (304, 64), (8, 8), (21, 16)])
def test_fused_groups_equal_merged_weights(mod, N, K, transposed, small_rows, chunk_rows, monkeypatch):
    """Groups up to ``small_rows`` rows run the register-blocked kernel (Linear layout), the
    others one GEMM per tile; every row count modulo the register block and every output
    tail (N % 4) occurs. ``chunk_rows``: the base rows the small groups share at a time (the
    default: all of a tile at these sizes), so that chunk boundaries, a short last chunk and
    row-masked tenants' stored rows across chunks are covered."""
    if transposed and N % 8:
        pytest.skip("Conv1D needs out_features % 8 == 0")
    if transposed and chunk_rows:
        pytest.skip("the register-blocked path is Linear-only")
    monkeypatch.setattr(cpu_kernel, "SMALL_ROWS", small_rows)
    if chunk_rows:
        monkeypatch.setattr(cpu_kernel, "SMALL_CHUNK_BYTES", chunk_rows * 4 * K)
    g = torch.Generator().manual_seed(N + K)
    R, C = (K, N) if transposed else (N, K)  # the weight's (and the signs') rows and columns
    W = torch.randn(R, C, generator=g)
    sizes = [5, 0, 17, 1, 9, 2, 4, 6, 3, 13]  # an empty group and uneven ones
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    x = torch.randn(sum(sizes), K, generator=g)
    tenants = [_tenant(R, C, g, unchanged=(range(0, R, 3) if i % 3 == 1 else [R - 1] if i % 3 == 2 else ()))
               for i in range(len(sizes))]
    biases = [torch.randn(N, generator=g) if i % 2 == 0 else None for i in range(len(sizes))]
    assert tenants[1][2] is not None and tenants[0][2] is None  # row-masked and full tenants both run
    out = torch.full((sum(sizes), N), float("nan"))
    groups = [(s, s + n, code.signs, scale, index, b)
              for s, n, (code, scale, index), b in zip(starts, sizes, tenants, biases)]
    cpu_kernel.signed_linear_groups(mod, x, out, W, groups, transposed=transposed)
    for s, n, (code, scale, index), b in zip(starts, sizes, tenants, biases):
        w = merged_weight(W, code, scale, index)
        # the direct definition, not the engine's helper: W + α ⊙ sign(Δ)
        torch.testing.assert_close(w, W + code.decode(), atol=1e-6, rtol=0)
        want = x[s:s + n] @ (w if transposed else w.t()) + (0 if b is None else b)
        torch.testing.assert_close(out[s:s + n], want, atol=1e-5, rtol=1e-5)
    assert not out.isnan().any()


@pytest.mark.parametrize("small_rows", [0, 1000], ids=["gemm", "register-blocked"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_fused_groups_on_mapped_rows(mod, transposed, small_rows, monkeypatch):
    """``rows``: each group computes its rows of a larger (padded) matrix in place, in any order
    and spacing; ``zero_rows`` are zeroed; every other row of ``out`` is left as it was. Equal
    to gathering the rows and running the merged weights."""
    monkeypatch.setattr(cpu_kernel, "SMALL_ROWS", small_rows)
    N, K, P = 24, 16, 50
    g = torch.Generator().manual_seed(7)
    R, C = (K, N) if transposed else (N, K)
    W = torch.randn(R, C, generator=g)
    x = torch.randn(P, K, generator=g)
    perm = torch.randperm(P, generator=g)
    rows, zero_rows, untouched = perm[:31].contiguous(), perm[31:45].sort().values, perm[45:]
    sizes = [7, 0, 1, 13, 10]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    tenants = [_tenant(R, C, g, unchanged=range(0, R, 4) if i == 3 else ()) for i in range(len(sizes))]
    biases = [torch.randn(N, generator=g) if i % 2 else None for i in range(len(sizes))]
    out = torch.full((P, N), 7.0)
    groups = [(s, s + n, code.signs, scale, index, b)
              for s, n, (code, scale, index), b in zip(starts, sizes, tenants, biases)]
    cpu_kernel.signed_linear_groups(mod, x, out, W, groups, transposed=transposed, rows=rows, zero_rows=zero_rows)
    for s, n, (code, scale, index), b in zip(starts, sizes, tenants, biases):
        w = W + code.decode()
        r = rows[s:s + n]
        want = x[r] @ (w if transposed else w.t()) + (0 if b is None else b)
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)
    assert (out[zero_rows] == 0).all() and (out[untouched] == 7.0).all()
    with pytest.raises(RuntimeError, match="is not a row of x"):
        cpu_kernel.signed_linear_groups(mod, x, out, W, groups, transposed=transposed,
                                        rows=torch.cat([rows[:-1], torch.tensor([P])]))
    with pytest.raises(RuntimeError, match="is not a row of out"):
        cpu_kernel.signed_linear_groups(mod, x, out, W, groups, transposed=transposed, rows=rows,
                                        zero_rows=torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="bad row range"):  # ranges index rows, not x
        cpu_kernel.signed_linear_groups(mod, x, out, W, [(0, 32, *groups[0][2:])], transposed=transposed, rows=rows)


def test_fused_kernel_rejects_bad_shapes(mod):
    W, x, out = torch.randn(16, 12), torch.randn(4, 12), torch.empty(4, 16)  # K = 12 is not a multiple of 8
    code, scale, _ = _tenant(16, 12, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cpu_kernel.signed_linear_groups(mod, x, out, W, [(0, 4, code.signs, scale, None, None)])
    W, x, out = torch.randn(16, 8), torch.randn(4, 8), torch.empty(4, 16)
    with pytest.raises(RuntimeError, match="covering the stored rows"):
        cpu_kernel.signed_linear_groups(mod, x, out, W, [(0, 4, code.signs[:3], scale, None, None)])
    with pytest.raises(RuntimeError, match="bad row range"):
        cpu_kernel.signed_linear_groups(mod, x, out, W, [(2, 9, torch.zeros(16, dtype=torch.uint8),
                                                          torch.ones(16), None, None)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel")
    base = save_tiny_base(root / "base", "bert")
    from bitdelta_core.compress import compress

    arts = {n: compress(base, finetune_tiny(base, root / n, nl, seed=s), progress=False)
            for n, nl, s in (("a", 2, 1), ("b", 3, 2))}
    return base, arts


def _logits(eng, arts):
    for n, a in arts.items():
        if n not in eng:
            eng.register(n, a)
    ids = torch.randint(4, VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))
    return eng.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["a", "b", None, "b", "a", "a"])


def test_engine_with_and_without_kernel_agree(mod, tiny, monkeypatch):
    base, arts = tiny
    fused = MultiTenantEngine(base, cpu_kernel=True)
    plain = MultiTenantEngine(base, cpu_kernel=False)
    assert fused._kernel is not None and plain._kernel is None
    torch.testing.assert_close(_logits(fused, arts), _logits(plain, arts), atol=1e-5, rtol=0)
    assert fused.memory_report()["cache_bytes"] == 0 < plain.memory_report()["cache_bytes"]
    # a large group ("a": 3 rows x 9 tokens) runs on cached merged weights, the small one fused
    mixed = MultiTenantEngine(base, cpu_kernel=True)
    mixed.fused_max_tokens = 20
    calls = []
    real = cpu_kernel.signed_linear_groups
    monkeypatch.setattr(cpu_kernel, "signed_linear_groups", lambda *a, **k: calls.append(len(a[-1])) or real(*a, **k))
    torch.testing.assert_close(_logits(mixed, arts), _logits(plain, arts), atol=1e-5, rtol=0)
    rep = mixed.memory_report()
    assert rep["tenants"]["a"]["cache"] > 0 and rep["tenants"]["b"]["cache"] == 0
    assert calls and max(calls) == 1  # only "b" went through the kernel


def test_one_tenant_batch_runs_fused_below_the_token_threshold(mod, tiny, monkeypatch):
    """A batch of one tenant goes through the kernel (nothing merged, nothing cached) unless its
    tokens reach ``fused_max_tokens``; then it runs on its cached merged weights. Both equal the
    plain engine."""
    base, arts = tiny
    plain = MultiTenantEngine(base, cpu_kernel=False)
    eng = MultiTenantEngine(base, cpu_kernel=True)
    for e in (plain, eng):
        e.register("a", arts["a"])
    ids = torch.randint(4, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = []
    real = cpu_kernel.signed_linear_groups
    monkeypatch.setattr(cpu_kernel, "signed_linear_groups", lambda *a, **k: calls.append(len(a[-1])) or real(*a, **k))
    want = plain.forward(enc, "a")
    torch.testing.assert_close(eng.forward(enc, "a"), want, atol=1e-5, rtol=0)
    assert calls and eng.memory_report()["cache_bytes"] == 0  # 36 tokens < fused_max_tokens
    calls.clear()
    eng.fused_max_tokens = 36
    torch.testing.assert_close(eng.forward(enc, "a"), want, atol=1e-5, rtol=0)
    assert not calls and eng.memory_report()["tenants"]["a"]["cache"] > 0


def test_engine_falls_back_when_the_kernel_is_unavailable(tiny, monkeypatch):
    base, arts = tiny
    monkeypatch.setattr(cpu_kernel, "_state", {"module": None, "error": "no compiler here"})
    eng = MultiTenantEngine(base)  # auto: plain PyTorch, still correct
    assert eng._kernel is None
    ref = MultiTenantEngine(base, cpu_kernel=False)
    torch.testing.assert_close(_logits(eng, arts), _logits(ref, arts), atol=0, rtol=0)
    with pytest.raises(cpu_kernel.KernelUnavailableError, match="no compiler here"):
        MultiTenantEngine(base, cpu_kernel=True)


def test_kernel_switches(tiny, monkeypatch):
    base, _ = tiny
    monkeypatch.setenv("BITDELTA_CPU_KERNEL", "0")
    assert MultiTenantEngine(base)._kernel is None
    monkeypatch.delenv("BITDELTA_CPU_KERNEL")
    assert MultiTenantEngine(base, dtype="bfloat16")._kernel is None  # float32 only: plain path
    with pytest.raises(cpu_kernel.KernelUnavailableError, match="float32 on CPU"):
        MultiTenantEngine(base, dtype="bfloat16", cpu_kernel=True)


def test_failed_build_is_logged_not_raised(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(**kw):
        raise RuntimeError("Error building extension\ng++: command not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(cpu_kernel, "_state", {})
    with caplog.at_level(logging.WARNING, logger="bitdelta_core.cpu_kernel"):
        assert cpu_kernel.load() is None
    assert "g++: command not found" in caplog.text
    with pytest.raises(cpu_kernel.KernelUnavailableError, match="command not found"):
        cpu_kernel.load(required=True)


def test_service_setting_reads_the_same_environment_variable():
    from serve.config import ServeConfig

    assert ServeConfig.load({"base": "x"}, env={}).cpu_kernel is True
    assert ServeConfig.load({"base": "x"}, env={"BITDELTA_CPU_KERNEL": "0"}).cpu_kernel is False
    assert ServeConfig.load({"base": "x", "cpu_kernel": False}, env={"BITDELTA_CPU_KERNEL": "1"}).cpu_kernel is False


def test_pip_ninja_is_found_without_an_activated_venv(monkeypatch):
    ninja = pytest.importorskip("ninja")
    import shutil

    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    cpu_kernel._ninja_on_path()
    assert shutil.which("ninja") is not None and ninja.BIN_DIR in shutil.which("ninja")


def test_kernel_releases_the_gil(mod):
    """Another Python thread keeps running during one long fused call (as with torch ops): with
    the GIL held it could not run at all until the call returned."""
    import threading
    import time

    N = K = 1024
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(N, K, generator=g), torch.randn(8192, K, generator=g)
    code, scale, _ = _tenant(N, K, g)
    out = torch.empty(8192, N)
    ticks, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.01)
    try:
        t0 = time.perf_counter()
        cpu_kernel.signed_linear_groups(mod, x, out, W, [(0, 8192, code.signs, scale, None, None)])
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    during = [s for s in ticks if t0 < s < t1]
    assert t1 - t0 > 0.03 and len(during) >= 5, (t1 - t0, len(during))
