"""Optional compiled CPU kernel: the fused multi-tenant Linear (``csrc/signed_linear.cpp``).

For every tenant group of a batch it computes ``x_g (W + diag(α_g) sign_g)ᵀ + b_g`` tile by tile
of output features, rebuilding the group's merged rows from the packed sign bits in a per-thread
buffer that stays in cache; no tenant's merged weight matrix is ever written to memory, and the
base weight is read once per layer instead of once per tenant. The results are bit-for-bit the
merged weights of :func:`bitdelta_core.multitenant.merged_weight` fed to ordinary GEMMs.

The kernel is built on first use with ``torch.utils.cpp_extension`` (needs a C++ compiler and
ninja; about 30 s once, then loaded from torch's extension cache in ~0.1 s). It is never
required: where it cannot be built the engine runs the plain PyTorch path and logs why once.

Environment: ``BITDELTA_CPU_KERNEL=0`` turns it off (``1`` or unset: use it when it builds).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from .errors import EngineError

logger = logging.getLogger(__name__)

KERNEL_VERSION = 4  # bump when csrc/signed_linear.cpp changes meaningfully (new cache entry)
_SOURCE = Path(__file__).parent / "csrc" / "signed_linear.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": ModuleType | None, "error": str


class KernelUnavailableError(EngineError):
    """The compiled CPU kernel was asked for explicitly but cannot be built or loaded."""


def env_enabled() -> bool:
    """False when ``BITDELTA_CPU_KERNEL`` turns the kernel off."""
    return os.environ.get("BITDELTA_CPU_KERNEL", "1").strip().lower() not in {"0", "false", "no", "off"}


def _flags() -> tuple[str, list[str], list[str]]:
    """Name suffix and compiler/linker flags for this platform and CPU.

    The instruction set is part of the extension's name so machines sharing a home directory
    never load a binary built for another CPU; ``-march=native`` is avoided for that reason.
    """
    cap = "generic"
    try:
        cap = torch.backends.cpu.get_cpu_capability().lower()
    except Exception:  # pragma: no cover - very old torch
        pass
    if sys.platform == "win32":
        cflags, ldflags = ["/O2", "/openmp"], []
        if cap.startswith("avx"):
            cflags.append("/arch:AVX2")
    else:
        cflags, ldflags = ["-O3"], []
        if sys.platform != "darwin":  # Apple clang has no -fopenmp: the kernel then runs on one thread
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        if cap.startswith("avx"):  # torch reports AVX2 / AVX512 only on x86 CPUs that have them
            cflags += ["-mavx2", "-mfma"]
        if cap.startswith("avx512"):  # 32 vector registers: larger register blocks
            cflags += ["-mavx512f", "-mavx512vl"]
    suffix = re.sub(r"[^0-9a-zA-Z]+", "_", f"v{KERNEL_VERSION}_t{torch.__version__}_{cap}")
    return suffix, cflags, ldflags


def load(required: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it on first use; ``None`` when unavailable
    (``required=True`` raises :class:`KernelUnavailableError` instead)."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["error"] = _build()
        mod = _state["module"]
    if mod is None and required:
        raise KernelUnavailableError(f"the compiled CPU kernel is unavailable: {_state['error']}")
    return mod  # type: ignore[return-value]


def _build() -> tuple[ModuleType | None, str]:
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        suffix, cflags, ldflags = _flags()
        name = f"bitdelta_signed_linear_{suffix}"
        logger.info("loading the CPU kernel %s (built once on first use, about 30 s)", name)
        mod = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags,
                                 extra_ldflags=ldflags, verbose=False)
        return mod, ""
    except Exception as e:  # no compiler, no ninja, no headers, a failed build: fall back
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        logger.warning("compiled CPU kernel unavailable (%s); using the plain PyTorch path", msg)
        return None, msg


# groups of at most this many rows (tokens) run the register-blocked small-group kernel instead
# of one GEMM call per tile (Linear layers, GCC/Clang builds); 0 turns that path off. Measured on
# the 2-core benchmark machine (MiniLM's layer shapes, one thread): as fast as or faster than a
# GEMM per tile from 1 to 1,024 rows, 3-20 % slower at 2,048 (the engine gives the kernel groups
# of fewer than FUSED_MAX_TOKENS = 1,024 tokens in mixed batches)
SMALL_ROWS = 1024
# base rows of a tile that every small group reads before the next ones: a quarter of a core's
# L2 (1 MB on the 2-core benchmark machine), leaving room for a group's rows of x. A whole tile
# of a large layer (MiniLM's 1536 x 384 is 2.4 MB) does not fit, and each group would read it
# again from the last-level cache; 256 KB beat 512 KB and whole tiles by 3-10 % on MiniLM's
# shapes with 3-8 groups of 25-75 rows
SMALL_CHUNK_BYTES = 256 << 10

# "no stored-row index" and "no bias" for the extension (it only reads their sizes)
_NO_INDEX = torch.empty(0, dtype=torch.long)
_NO_BIAS = torch.empty(0)

TILE_BYTES = 5 << 19  # 2.5 MB: a merged tile stays in the last-level cache


@functools.lru_cache(maxsize=256)
def tile_size(n_out: int, n_in: int, threads: int) -> int:
    """Output features per tile: the fewest tiles, a multiple of the thread count, whose merged
    buffer (``tile × n_in`` floats) fits in :data:`TILE_BYTES`; a multiple of 8.

    Measured on the 2-core benchmark machine for BERT-base and MiniLM shapes, 1-16 groups of
    128-2048 rows: within a few % of the best tile everywhere, where a fixed 128 lost up to 10 %
    on large groups (its many small GEMMs re-read the inputs)."""
    threads = max(1, threads)
    k = 1
    while True:
        tile = -(-n_out // (threads * k))
        tile = -(-tile // 8) * 8
        if tile <= 8 or tile * n_in * 4 <= TILE_BYTES:
            return max(8, tile)
        k += 1


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; a virtual environment that was not activated
    has the pip ``ninja`` (a dependency of this project) only in its own bin folder."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        pass  # the build then fails with torch's own "ninja is required" message


def signed_linear_groups(mod: ModuleType, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                         groups: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                            torch.Tensor | None]], transposed: bool = False,
                         rows: torch.Tensor | None = None, zero_rows: torch.Tensor | None = None) -> None:
    """``out[s:e] = x[s:e] @ (weight + diag(scale) sign)ᵀ + bias`` for every group, in place
    (``transposed``: GPT-2 Conv1D's ``(in, out)`` weight, ``x[s:e] @ (weight + ...) + bias``).

    ``groups``: ``(start, end, packed_signs, scale, index, bias)`` with the group's row range, the
    tenant's packed signs and one float32 scale per stored row, the stored rows (``None`` = all)
    and the bias (``None`` = none). ``x`` and ``weight`` contiguous float32, ``out`` float32
    with contiguous rows; ``weight.shape[1] % 8 == 0``.

    ``rows`` (int64, distinct): the row ranges index it, and a group computes rows
    ``rows[s:e]`` of ``x`` and ``out`` (the real tokens of a padded batch, read and written in
    place); ``zero_rows``: rows of ``out`` set to zero.
    """
    N = weight.shape[1 if transposed else 0]
    tile = tile_size(N, weight.numel() // N, torch.get_num_threads())
    mod.signed_linear_groups(
        x, out, weight,
        [g[0] for g in groups], [g[1] for g in groups],
        [g[2].contiguous() for g in groups], [g[3].contiguous() for g in groups],
        [_NO_INDEX if g[4] is None else g[4] for g in groups],
        [_NO_BIAS if g[5] is None else g[5] for g in groups],
        tile, transposed, SMALL_ROWS, SMALL_CHUNK_BYTES,
        _NO_INDEX if rows is None else rows, _NO_INDEX if zero_rows is None else zero_rows,
    )
