"""The optional Triton kernels: interpreter cases on CPU (a subprocess), the engine without
triton, and on a GPU the compiled kernels and the engine's mixed batch against references."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _env(**extra) -> dict:
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'bitdelta-serve[gpu]')")
def test_kernels_under_the_triton_interpreter(tmp_path):
    """tests/triton_interpreter_cases.py in a fresh process with TRITON_INTERPRET=1 (Triton reads
    it when imported, and it must not reach the other tests)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
         str(HERE / "triton_interpreter_cases.py")],
        env=_env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=900,
        cwd=HERE.parent,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


def test_engine_runs_and_module_imports_without_triton():
    """With triton absent the module imports, says why it cannot run, and the engine (CPU, and
    ``triton_kernel=None`` anywhere) runs its PyTorch paths; asking for it explicitly is a clear error."""
    code = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch
from bitdelta_core import triton_kernel as tk
from bitdelta_core.multitenant import MultiTenantEngine
from tenant_fixtures import save_tiny_base
import tempfile, pathlib
assert not tk.available() and not tk.usable("cuda")
assert "not installed" in tk.unavailable_reason("cuda")
try:
    tk.grouped_linear(torch.zeros(2, 8), torch.zeros(4, 8), [(0, 2)])
    raise SystemExit("no error")
except tk.TritonUnavailableError as e:
    assert "not installed" in str(e)
base = save_tiny_base(pathlib.Path(tempfile.mkdtemp()) / "base", "bert")
eng = MultiTenantEngine(base, cpu_kernel=False)
assert eng._triton is None and not eng.memory_report()["triton_kernel"]
try:
    MultiTenantEngine(base, triton_kernel=True, self_check=False)
    raise SystemExit("no error")
except tk.TritonUnavailableError as e:
    assert "not installed" in str(e)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=HERE.parent)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_outside_the_interpreter_are_refused():
    """Without the interpreter, CPU tensors and a CPU engine asking for the kernel get a clear error."""
    code = r"""
import torch
from bitdelta_core import triton_kernel as tk
assert not tk.interpreting()
try:
    tk.grouped_linear(torch.zeros(2, 8), torch.zeros(4, 8), [(0, 2)])
    raise SystemExit("no error")
except tk.TritonUnavailableError as e:
    assert "TRITON_INTERPRET=1" in str(e)
import pathlib, tempfile
from bitdelta_core.multitenant import MultiTenantEngine
from tenant_fixtures import save_tiny_base
base = save_tiny_base(pathlib.Path(tempfile.mkdtemp()) / "base", "bert")
assert MultiTenantEngine(base, cpu_kernel=False)._triton is None  # CPU: never by default
try:
    MultiTenantEngine(base, triton_kernel=True, self_check=False)
    raise SystemExit("no error")
except tk.TritonUnavailableError as e:
    assert "CUDA" in str(e)
print("ok")
"""
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


_AOT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bitdelta_core import triton_kernel as tk

lin, emb = tk._kernel("_grouped_linear_kernel"), tk._kernel("_embedding_kernel")
PTR = {"x_ptr", "w_ptr", "y_ptr"}
I32P = {"tile_group_ptr", "tile_row_ptr", "group_end_ptr", "group_trow_ptr"}
cases = [(90, dt, tr, bm) for dt in ("fp16", "bf16", "fp32") for tr in (False, True) for bm in (16, 64)]
cases += [(80, dt, tr, 64) for dt in ("fp16", "bf16") for tr in (False, True)]
for cc, dt, tr, bm in cases:
    const = {"HAS_BIAS": True, "TRANSPOSED": tr, "IEEE": dt == "fp32", "DOT_F32": False,
             "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32 if dt == "fp32" else 64}
    sig = {a: ("constexpr" if a in const else f"*{dt}" if a in PTR else "*i32" if a in I32P
               else "*i64" if a == "tab_ptr" else "i32") for a in lin.arg_names}
    k = triton.compile(ASTSource(lin, sig, constexprs=const), target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": 4, "num_stages": 3})
    ptx = k.asm["ptx"]
    if dt != "fp32":  # 16-bit tiles on tensor cores: mma.sync, or wgmma on sm_90 for 64-row tiles
        assert "mma.sync" in ptx or (cc == 90 and bm == 64 and "wgmma" in ptx), (cc, dt, tr, bm)
    print("linear", cc, dt, tr, bm, "ok")
for dt in ("fp16", "bf16", "fp32"):
    sig = {a: ("constexpr" if a == "BLOCK_D" else f"*{dt}" if a in ("e_ptr", "out_ptr") else "*i64"
               if a in ("ids_ptr", "tab_ptr") else "*i32" if a == "row_trow_ptr" else "i32") for a in emb.arg_names}
    triton.compile(ASTSource(emb, sig, constexprs={"BLOCK_D": 128}), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})
    print("embedding", dt, "ok")
print("all compiled")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_cuda_targets():
    """The kernels compile to cubins for sm_80 (A100) and sm_90 (H100/H200) with Triton's bundled
    ptxas, no GPU needed: the GPU code path is type-checked in CI (16-bit tiles on tensor cores)."""
    env = _env(TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=900,
                          cwd=HERE.parent)
    out = proc.stdout + proc.stderr
    if proc.returncode and ("ptxas" in out and ("not found" in out or "No such file" in out)):
        pytest.skip("Triton's ptxas is not available on this platform")
    assert proc.returncode == 0 and "all compiled" in proc.stdout, out[-4000:]


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels and the engine (skipped without CUDA + triton)
# ---------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
GPU_TOL = {torch.float32: 1e-4, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}


def _code(rows, cols, g, unchanged=()):
    from bitdelta_core.codec import encode

    d = torch.randn(rows, cols, generator=g) * 0.1
    for r in unchanged:
        d[r] = 0
    return encode(d)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("N,K", [(37, 45), (384, 384), (1536, 384), (96, 1000)])
def test_gpu_grouped_linear_matches_direct_reference(N, K, transposed, dtype):
    """The compiled kernel (tensor cores; fp32 without TF32) against the float64 definition."""
    from bitdelta_core import triton_kernel as tk

    g = torch.Generator().manual_seed(N + K)
    R, C = (K, N) if transposed else (N, K)
    W = torch.randn(R, C, generator=g).to(dtype)
    sizes = [64, 0, 129, 1, 17, 300, 5]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    x = torch.randn(sum(sizes), K, generator=g).to(dtype)
    codes = [_code(R, C, g), _code(R, C, g, range(0, R, 3)), _code(R, C, g), None, _code(R, C, g, [R - 1]),
             _code(R, C, g), None]
    biases = [torch.randn(N, generator=g).to(dtype) for _ in sizes]
    cuda = torch.device("cuda")
    groups = [(s, s + n, None if c is None else c.signs.to(cuda), None if c is None else c.kept_scales(dtype).to(cuda),
               None if c is None or c.kept_rows() is None else c.kept_rows().to(cuda), b.to(cuda))
              for s, n, c, b in zip(starts, sizes, codes, biases)]
    out = tk.grouped_linear(x.to(cuda), W.to(cuda), groups, transposed=transposed)
    cpu_groups = [(s, e, None if sg is None else sg.cpu(), None if sc is None else sc.cpu(),
                   None if ix is None else ix.cpu(), b.cpu()) for s, e, sg, sc, ix, b in groups]
    want = tk.reference_grouped_linear(x, W, cpu_groups, transposed=transposed)
    err = ((out.cpu().double() - want).abs() / (1 + want.abs())).max()
    assert float(err) <= GPU_TOL[dtype] * max(1.0, K / 256) ** 0.5, float(err)


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    from bitdelta_core.apply import apply
    from bitdelta_core.compress import compress

    from tenant_fixtures import finetune_tiny, save_tiny_base

    out = {}
    for arch in ("bert", "gpt2"):
        root = tmp_path_factory.mktemp(f"gpu_{arch}")
        base = save_tiny_base(root / "base", arch)
        arts, refs = {}, {}
        for i, (name, nl) in enumerate((("two", 2), ("three", 3), ("two_b", 2))):
            ft = finetune_tiny(base, root / name, nl, seed=10 + i)
            arts[name] = compress(base, ft, progress=False)
            refs[name] = apply(base, arts[name])
        refs[None] = apply(base, compress(base, base, progress=False))
        out[arch] = (base, arts, refs)
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-3), ("float16", 3e-2), ("bfloat16", 6e-2)])
def test_gpu_engine_mixed_batch_matches_apply(gpu_setup, arch, dtype, atol, monkeypatch):
    """The engine's mixed batch on CUDA through the Triton kernels equals one-model-at-a-time
    ``apply`` (float32 CPU references); heads of different widths take the fallback path."""
    from bitdelta_core import triton_kernel as tk
    from bitdelta_core.multitenant import MultiTenantEngine

    from tenant_fixtures import VOCAB

    base, arts, refs = gpu_setup[arch]
    launches = []
    real = tk.launch_linear
    monkeypatch.setattr(tk, "launch_linear", lambda *a, **k: launches.append(len(a[4].spans)) or real(*a, **k))
    eng = MultiTenantEngine(base, device="cuda", dtype=dtype, triton_kernel=True)
    for n, a in arts.items():
        eng.register(n, a)
    names = ["two", "three", None, "two_b", "two", "three", None, "two_b", "two"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (len(names), 13), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    launches.clear()
    logits = eng.forward({"input_ids": ids.cuda(), "attention_mask": mask.cuda()}, names).float().cpu()
    for i, n in enumerate(names):
        with torch.no_grad():
            ref = refs[n](input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=atol, rtol=0, msg=f"{arch} {dtype} row {i}")
    assert launches and max(launches) == 4  # all groups of a layer (three tenants + base) in one launch
    assert eng.memory_report()["cache_bytes"] == 0
