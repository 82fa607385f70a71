"""Optional Triton kernels: a batch's multi-tenant Linear layer (and embedding lookup) in one launch.

Maths
-----
A batch is sorted by tenant, so tenant group ``g`` owns the contiguous rows ``[s_g, e_g)`` of the
flattened input ``x`` (tokens × K). For a Linear layer with base weight ``W`` (N × K) and tenant
``t(g)``'s 1-bit delta ``α ⊙ sign(Δ)`` (one scale per output row), the kernel computes, in ONE
launch for every group at once::

    y[s_g:e_g] = x[s_g:e_g] · Wᵀ  +  x[s_g:e_g] · (diag(α_t) · sign(Δ_t))ᵀ  +  b_t

Each program owns a tile of ``BLOCK_M`` rows of one group × ``BLOCK_N`` output features and
accumulates both products into one float32 accumulator over K: the base tile of ``W`` and the
tenant's ``±α`` tile, unpacked from the packed sign bits in registers (``α·sign`` is exact in the
activations' dtype since the engine keeps ``α`` in that dtype). No merged or unpacked weight is
ever written to device memory; the base weight is streamed once per row tile (from L2 when tiles
of several groups share it). Groups without a delta (base rows, or a tenant that leaves this
weight alone) run the same tile loop without the delta product. GPT-2's ``Conv1D`` stores the
weight as (K, N) with one scale per *input* feature: ``y = x · (W + diag(α) sign(Δ)) + b``
(``TRANSPOSED``).

Layouts
-------
* ``x``: (M, K), rows contiguous; ``y``: (M, N), rows contiguous; fp16, bf16 or fp32 (one dtype).
* ``W``: Linear (N, K) / Conv1D (K, N), any strides, same dtype as ``x``.
* packed signs (:mod:`bitdelta_core.packing`): bit ``j`` (LSB first) of byte ``b`` is the sign of
  element ``8b + j`` of the row-major (stored rows × cols) matrix, 1 = positive. The kernel
  addresses bit ``p·cols + c`` directly, so ``cols`` need not be a multiple of 8.
* format-2 deltas leave rows whose delta is exactly zero out of the signs and scales; the
  engine keeps their ``index`` (stored rows, ascending). The kernel reads an int32 *position
  map* ``pos[r]`` (the stored position of row ``r``, or -1), built once per index tensor and
  cached: a row with ``pos = -1`` contributes a zero delta (its output is the base's).
* metadata (one launch covers all groups): a table per layer, int64 (rows, 4), one row per
  tenant (row 0: the base) with the device addresses of its signs, scales, position map and
  bias for that layer (0 = none; :class:`LayerTable`, written once per tenant); and a
  :class:`TilePlan` per forward: per row tile its group and first row, per group its end row
  and table row (shared by every layer of a forward).

Launch grid: ``(row tiles, cdiv(N, BLOCK_N))`` where the row tiles are ``cdiv(e_g - s_g, BLOCK_M)``
per group (an empty group has none); a :class:`TilePlan` may be padded to a fixed number of
tiles (no-op tiles) so that one captured CUDA graph serves every batch composition of a shape.

The embedding kernel gathers ``E[id] + α_t[pos(id)] · sign(Δ_t)[pos(id)]`` for every token in one
launch straight from the packed bits (rows left out of a format-2 delta add nothing).

Running: on CUDA tensors the kernels are compiled by Triton; with ``TRITON_INTERPRET=1`` in the
environment before ``triton`` is first imported, Triton's interpreter runs them on CPU tensors
(slow; the tests do this in a subprocess). ``triton`` is an optional dependency
(``pip install bitdelta-serve[gpu]``); without it this module imports and :func:`available` is
False. ``BITDELTA_TRITON=0`` turns the engine's use of it off.
"""

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import EngineError

logger = logging.getLogger(__name__)

_IMPORT_ERROR = ""
try:  # optional dependency
    import triton
    import triton.language as tl
except Exception as e:  # noqa: BLE001 - not installed, or a broken install: the engine runs without it
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    if not isinstance(e, ImportError):
        logger.warning("triton failed to import (%s); the Triton kernels are off", _IMPORT_ERROR)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonUnavailableError(EngineError):
    """The Triton kernel was asked for explicitly but cannot run here."""


def available() -> bool:
    """True when ``triton`` imports."""
    return triton is not None


def env_enabled() -> bool:
    """False when ``BITDELTA_TRITON`` turns the kernel off."""
    return os.environ.get("BITDELTA_TRITON", "1").strip().lower() not in {"0", "false", "no", "off"}


def usable(device: torch.device | str) -> bool:
    """Whether the engine can run the compiled kernel on ``device`` (CUDA with triton)."""
    return available() and torch.device(device).type == "cuda" and torch.cuda.is_available()


def unavailable_reason(device: torch.device | str) -> str:
    if not available():
        return f"triton is not installed (pip install 'bitdelta-serve[gpu]'): {_IMPORT_ERROR}"
    if torch.device(device).type != "cuda":
        return f"the Triton kernel runs on CUDA devices, not {torch.device(device).type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return ""


# ---------------------------------------------------------------------------------------------
# kernels (plain Python functions, jitted per mode on first use: compiled or interpreted)
# ---------------------------------------------------------------------------------------------
if triton is not None:

    def _grouped_linear_kernel(
        x_ptr, w_ptr, y_ptr,
        tile_group_ptr, tile_row_ptr, group_end_ptr, group_trow_ptr, tab_ptr,
        N, K,
        stride_xm, stride_ym, stride_wk, stride_wn,
        HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.load(tile_group_ptr + pid_m)
        row0 = tl.load(tile_row_ptr + pid_m).to(tl.int64)
        row_end = tl.load(group_end_ptr + g).to(tl.int64)
        tab = tab_ptr + tl.load(group_trow_ptr + g).to(tl.int64) * 4  # the group's tenant's table row
        signs_addr = tl.load(tab)
        pos_addr = tl.load(tab + 2)
        has_delta = signs_addr != 0
        has_pos = pos_addr != 0
        signs = signs_addr.to(tl.pointer_type(tl.uint8))
        scale = tl.load(tab + 1).to(tl.pointer_type(y_ptr.dtype.element_ty))
        pos = pos_addr.to(tl.pointer_type(tl.int32))

        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if not TRANSPOSED:
            # sign rows are output features: position, scale and first bit of each row, once
            # (masks are compared against scalar limits: Triton's interpreter mistypes a block
            # mask combined with a scalar bool by `&`)
            p_n = tl.load(pos + offs_n, mask=offs_n < tl.where(has_pos, N, 0), other=0)
            p_n = tl.where(has_pos, p_n, offs_n)
            row_ok = (offs_n < tl.where(has_delta, N, 0)) & (p_n >= 0)
            alpha_n = tl.load(scale + p_n, mask=row_ok, other=0.0).to(tl.float32)
            bit_row = tl.where(row_ok, p_n, 0).to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_F32:  # exact products of 16-bit values in float32 (the interpreter's bf16 dot)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
            if has_delta:
                if TRANSPOSED:  # sign rows are input features (Conv1D weight (K, N))
                    p_k = tl.load(pos + offs_k, mask=offs_k < tl.where(has_pos, K, 0), other=0)
                    p_k = tl.where(has_pos, p_k, offs_k)
                    ok_k = k_mask & (p_k >= 0)
                    alpha = tl.load(scale + p_k, mask=ok_k, other=0.0).to(tl.float32)[:, None]
                    bit = tl.where(ok_k, p_k, 0).to(tl.int64)[:, None] * N + offs_n[None, :]
                    ok = ok_k[:, None] & n_mask[None, :]
                else:
                    alpha = alpha_n[None, :]
                    bit = bit_row[None, :] + offs_k[:, None]
                    ok = k_mask[:, None] & row_ok[None, :]
                byte = tl.load(signs + (bit >> 3), mask=ok, other=0).to(tl.int32)
                positive = ((byte >> (bit & 7).to(tl.int32)) & 1) != 0
                d = tl.where(ok, tl.where(positive, alpha, -alpha), 0.0).to(x.dtype)  # ±α: exact in x's dtype
                if IEEE:
                    acc = tl.dot(x, d, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, d, acc)
        if HAS_BIAS:
            bias = tl.load(tab + 3).to(tl.pointer_type(w_ptr.dtype.element_ty))
            acc += tl.load(bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    def _embedding_kernel(
        ids_ptr, row_trow_ptr, e_ptr, out_ptr, tab_ptr,
        per_row, D, stride_e,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0)
        pid_d = tl.program_id(1)
        tok = tl.load(ids_ptr + t).to(tl.int64)
        tab = tab_ptr + tl.load(row_trow_ptr + t // per_row).to(tl.int64) * 4  # this batch row's tenant
        offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        e = tl.load(e_ptr + tok * stride_e + offs, mask=mask, other=0.0).to(tl.float32)
        signs_addr = tl.load(tab)
        pos_addr = tl.load(tab + 2)
        if signs_addr != 0:
            p = tok
            if pos_addr != 0:
                p = tl.load(pos_addr.to(tl.pointer_type(tl.int32)) + tok).to(tl.int64)
            if p >= 0:
                alpha = tl.load(tl.load(tab + 1).to(tl.pointer_type(out_ptr.dtype.element_ty)) + p).to(tl.float32)
                bit = p * D + offs
                byte = tl.load(signs_addr.to(tl.pointer_type(tl.uint8)) + (bit >> 3), mask=mask, other=0)
                positive = ((byte.to(tl.int32) >> (bit & 7).to(tl.int32)) & 1) != 0
                e = e + tl.where(positive, alpha, -alpha)
        tl.store(out_ptr + t * D + offs, e.to(out_ptr.dtype.element_ty), mask=mask)


_jit_lock = threading.Lock()
_jitted: dict[str, object] = {}


_interpreting: list[bool] = []


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read by Triton when
    it is imported: set it before the first ``import triton`` of the process). Read once."""
    if not _interpreting:
        try:
            from triton import knobs

            _interpreting.append(bool(knobs.runtime.interpret))
        except (ImportError, AttributeError):  # pragma: no cover - older triton 3.x
            _interpreting.append(os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "on", "yes"})
    return _interpreting[0]


def _kernel(name: str):
    """The jitted kernel ``name`` (decorated on first use, so importing this module is cheap)."""
    fn = _jitted.get(name)
    if fn is None:
        with _jit_lock:
            fn = _jitted.get(name)
            if fn is None:
                fn = _jitted[name] = triton.jit(globals()[name])
    return fn


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise TritonUnavailableError(
            f"the Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter "
            f"(TRITON_INTERPRET=1 set before triton is imported); got {device.type} tensors")


def _need_triton() -> None:
    if triton is None:
        raise TritonUnavailableError("triton is not installed (pip install 'bitdelta-serve[gpu]')")


# ---------------------------------------------------------------------------------------------
# host side: position maps, table rows, tile plans, launches
# ---------------------------------------------------------------------------------------------
_pos_lock = threading.Lock()
_positions: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def position_map(index: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 ``(rows,)``: the stored position of each row of a format-2 delta, -1 where the row
    is not stored. Built once per ``index`` tensor (kept while that tensor lives)."""
    key = id(index)
    hit = _positions.get(key)
    if hit is not None and hit[0]() is index and hit[1].numel() == rows:
        return hit[1]
    pos = torch.full((rows,), -1, dtype=torch.int32, device=index.device)
    pos[index] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    with _pos_lock:
        _positions[key] = (weakref.ref(index), pos)
        weakref.finalize(index, _positions.pop, key, None)
    return pos


def metadata_tensor(values: list[int], device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """A small metadata tensor on ``device`` without a host sync (pinned copy on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class DeltaGroup:
    """One group's rows and how its tenant changes the layer. ``signs``/``scale``/``index`` are a
    1-bit weight delta (``signs=None``: the base weight for these rows); ``bias`` replaces the
    layer's bias (``None``: no bias)."""

    start: int
    end: int
    signs: Optional[torch.Tensor] = None  # uint8 packed signs of the stored rows
    scale: Optional[torch.Tensor] = None  # (stored rows,) in x's dtype
    index: Optional[torch.Tensor] = None  # int64 stored rows (ascending), None = every row stored
    bias: Optional[torch.Tensor] = None  # (N,) in the weight's dtype


def _as_group(g) -> DeltaGroup:
    return g if isinstance(g, DeltaGroup) else DeltaGroup(*g)


def table_entry(g: DeltaGroup, weight: torch.Tensor, dtype: torch.dtype, keep: list) -> list[int]:
    """The table row ``[signs, scale, position map, bias]`` (device addresses, 0 = none) of one
    tenant's delta for a weight, checked; tensors the addresses point into are appended to
    ``keep`` (they must live as long as the row is used)."""
    rows, cols = weight.shape
    device = weight.device
    for t in (g.signs, g.scale, g.index, g.bias):
        if t is not None and t.device != device:
            raise ValueError(f"every tensor must be on {device}, got one on {t.device}")
    entry = [0, 0, 0, 0]
    if g.signs is not None:
        kept = rows if g.index is None else g.index.numel()
        if g.signs.dtype != torch.uint8 or g.signs.numel() * 8 < kept * cols:
            raise ValueError(f"signs must be uint8 covering {kept} stored rows × {cols}")
        if g.scale is None or g.scale.numel() != kept:
            raise ValueError(f"one scale per stored row ({kept}) is needed, got "
                             f"{None if g.scale is None else g.scale.numel()}")
        if kept:  # a delta without stored rows is the base
            sg, sc = g.signs.contiguous(), g.scale.to(dtype).contiguous()
            keep += [sg, sc]
            entry[0], entry[1] = sg.data_ptr(), sc.data_ptr()
            if g.index is not None:
                pm = position_map(g.index, rows)
                keep.append(pm)
                entry[2] = pm.data_ptr()
    if g.bias is not None:
        b = g.bias.to(weight.dtype).contiguous()
        keep.append(b)
        entry[3] = b.data_ptr()
    return entry


@dataclass
class TilePlan:
    """Row tiles of a batch's groups for one ``BLOCK_M``: tile -> (group, first row); group -> end
    row and table row (its tenant). Shared by every layer whose input has the same rows (one per
    forward and token count per batch row); one host-to-device copy."""

    spans: tuple[tuple[int, int], ...]
    block_m: int
    tile_group: torch.Tensor  # int32 (tiles,)
    tile_row: torch.Tensor  # int32 (tiles,)
    group_end: torch.Tensor  # int32 (groups + 1,): the last entry is an empty group for padding tiles
    group_trow: torch.Tensor  # int32 (groups + 1,): each group's table row
    n_tiles: int


def pick_block_m(spans: Sequence[tuple[int, int]]) -> int:
    """16, 32 or 64 rows per tile: the smallest that covers the largest group, at most 64."""
    largest = max((e - s for s, e in spans), default=0)
    return 16 if largest <= 16 else 32 if largest <= 32 else 64


def make_plan(spans: Sequence[tuple[int, int]], device: torch.device | str, group_rows: Sequence[int] | None = None,
              block_m: int | None = None, pad_tiles_to: int | None = None) -> TilePlan:
    """Tiles for groups owning rows ``[s, e)`` each (ascending, non-overlapping; empty allowed);
    ``group_rows``: each group's table row (default: group ``i`` uses row ``i``).

    ``pad_tiles_to`` appends no-op tiles (an empty group) up to that many tiles, so a launch with a
    fixed grid (a captured CUDA graph) serves any batch composition of the same row count:
    ``cdiv(M, BLOCK_M) + groups`` tiles always suffice."""
    device = torch.device(device)
    spans = tuple((int(s), int(e)) for s, e in spans)
    prev = 0
    for s, e in spans:
        if s < prev or e < s:
            raise ValueError(f"group rows must be ascending, non-overlapping [start, end) spans, got {spans}")
        prev = e
    group_rows = list(range(len(spans))) if group_rows is None else [int(r) for r in group_rows]
    if len(group_rows) != len(spans):
        raise ValueError(f"{len(group_rows)} table rows for {len(spans)} groups")
    bm = int(block_m or pick_block_m(spans))
    if bm not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be 16, 32, 64 or 128, got {bm}")
    tg, tr = [], []
    for g, (s, e) in enumerate(spans):
        for r in range(s, e, bm):
            tg.append(g)
            tr.append(r)
    n = len(tg)
    if pad_tiles_to is not None:
        if pad_tiles_to < n:
            raise ValueError(f"{n} tiles do not fit in pad_tiles_to={pad_tiles_to}")
        tg += [len(spans)] * (pad_tiles_to - n)
        tr += [0] * (pad_tiles_to - n)
    G1 = len(spans) + 1
    meta = metadata_tensor(tg + tr + [e for _, e in spans] + [0] + group_rows + [0], device, torch.int32)
    T = len(tg)
    return TilePlan(spans, bm, meta[:T], meta[T:2 * T], meta[2 * T:2 * T + G1], meta[2 * T + G1:], T)


def launch_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, table: torch.Tensor, plan: TilePlan, *,
                  transposed: bool, has_bias: bool, block_n: int = 64, block_k: int | None = None,
                  num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """The one launch of the grouped Linear, unchecked: ``x`` (M, K) and ``out`` (M, N) with
    contiguous rows, ``table`` int64 (rows, 4) on the device, ``plan`` over ``x``'s rows.
    :func:`grouped_linear` checks its inputs and calls this; the engine calls it directly."""
    N = weight.shape[1] if transposed else weight.shape[0]
    K = x.shape[1]
    if plan.n_tiles == 0 or N == 0:
        return out
    if block_k is None:
        block_k = 32 if x.dtype == torch.float32 else 64
    swk, swn = (weight.stride(0), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(0))
    # Triton's interpreter computes bf16 dot products wrongly (it reads the raw bits); there the
    # bf16 tiles are widened to float32 first (same products: a bf16 product is exact in fp32)
    dot_f32 = x.dtype == torch.bfloat16 and interpreting()
    _kernel("_grouped_linear_kernel")[(plan.n_tiles, triton.cdiv(N, block_n))](
        x, weight, out, plan.tile_group, plan.tile_row, plan.group_end, plan.group_trow, table,
        N, K, x.stride(0), out.stride(0), swk, swn,
        HAS_BIAS=bool(has_bias), TRANSPOSED=bool(transposed),
        IEEE=(x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32) or dot_f32,
        DOT_F32=dot_f32,
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: Sequence, *, transposed: bool = False,
                   out: torch.Tensor | None = None, plan: TilePlan | None = None, **launch) -> torch.Tensor:
    """``out[s:e] = x[s:e] · (W + diag(scale) sign)ᵀ + bias`` for every group in one launch
    (``transposed``: GPT-2 Conv1D's (K, N) weight, ``x[s:e] · (W + diag(scale) sign) + bias``).

    ``groups``: :class:`DeltaGroup` or ``(start, end, signs, scale, index, bias)`` tuples over
    ascending, non-overlapping row ranges of ``x`` (the interface of
    :func:`bitdelta_core.cpu_kernel.signed_linear_groups`, plus ``signs=None`` for base rows).
    Rows outside every group are left as they are in ``out``. Either every group has a bias or
    none has. ``plan`` (from :func:`make_plan` over the same spans, default table rows) may be
    shared by several calls. CPU tensors need Triton's interpreter (:func:`interpreting`).
    """
    _need_triton()
    groups = [_as_group(g) for g in groups]
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {_DTYPES}, got {x.dtype} and {weight.dtype}")
    M, K = x.shape
    N = weight.shape[1] if transposed else weight.shape[0]
    if (weight.shape[0] if transposed else weight.shape[1]) != K or K == 0:
        raise ValueError(f"x has {K} features, the weight {tuple(weight.shape)}"
                         f"{' (in, out)' if transposed else ' (out, in)'} does not match")
    if x.stride(1) != 1 and M * K:
        x = x.contiguous()
    if out is None:
        out = x.new_empty((M, N))
    elif out.shape != (M, N) or out.dtype != x.dtype or (out.stride(1) != 1 and M * N):
        raise ValueError(f"out must be ({M}, {N}) {x.dtype} with contiguous rows")
    _check_device(x.device)
    has_bias = {g.bias is not None for g in groups}
    if len(has_bias) > 1:
        raise ValueError("either every group has a bias or none has")
    keep: list = []
    entries = []
    for g in groups:
        if not 0 <= g.start <= g.end <= M:
            raise ValueError(f"group rows [{g.start}, {g.end}) are outside x's {M} rows")
        if g.bias is not None and g.bias.numel() != N:
            raise ValueError(f"bias must have {N} entries, got {g.bias.numel()}")
        entries += table_entry(g, weight, x.dtype, keep)
    spans = tuple((g.start, g.end) for g in groups)
    if plan is None or plan.spans != spans:
        plan = make_plan(spans, x.device)
    table = metadata_tensor(entries + [0, 0, 0, 0], x.device).view(-1, 4)  # + a zero row
    launch_linear(x, weight, out, table, plan, transposed=transposed, has_bias=has_bias == {True}, **launch)
    del keep  # the tensors the table points into lived until the launch was queued
    return out


def launch_embedding(ids: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, row_trow: torch.Tensor,
                     block_d: int = 128) -> torch.Tensor:
    """The one launch of the grouped embedding, unchecked: ``row_trow`` int32 (B,) is each batch
    row's table row, ``ids`` (B, ...) on the device."""
    D = weight.shape[1]
    out = weight.new_empty((*ids.shape, D))
    T = ids.numel()
    if T == 0 or D == 0:
        return out
    ids_c = ids.reshape(-1).contiguous()
    _kernel("_embedding_kernel")[(T, triton.cdiv(D, block_d))](
        ids_c, row_trow, weight, out, table, T // ids.shape[0], D, weight.stride(0), BLOCK_D=block_d)
    return out


def grouped_embedding(ids: torch.Tensor, weight: torch.Tensor, groups: Sequence, *,
                      block_d: int = 128) -> torch.Tensor:
    """``E[ids] + α[pos(id)] · sign(Δ)[pos(id)]`` per token in one launch.

    ``ids``: (B, ...) token ids of a batch sorted by tenant; ``groups``: :class:`DeltaGroup` or
    ``(start, end, signs, scale, index, bias)`` tuples over ascending ranges of ``ids``' first
    dimension (``bias`` is ignored; ``signs=None`` and rows outside every group: plain base rows).
    Returns ``ids.shape + (D,)`` in ``weight``'s dtype. Rows left out of a format-2 delta add nothing.
    """
    _need_triton()
    groups = [_as_group(g) for g in groups]
    if weight.dim() != 2 or weight.dtype not in _DTYPES:
        raise ValueError(f"weight must be 2-D of a dtype in {_DTYPES}, got {weight.dtype} {tuple(weight.shape)}")
    if ids.dim() < 1:
        raise ValueError("ids must have a batch dimension")
    _check_device(ids.device)
    B = ids.shape[0]
    keep: list = []
    entries = [0, 0, 0, 0]  # row 0: the base
    row_trow = [0] * B
    covered = 0
    for i, g in enumerate(groups):
        if not covered <= g.start <= g.end <= B:
            raise ValueError(f"groups must be ascending row ranges of the {B} rows")
        covered = g.end
        entries += table_entry(DeltaGroup(g.start, g.end, g.signs, g.scale, g.index), weight, weight.dtype, keep)
        row_trow[g.start:g.end] = [i + 1] * (g.end - g.start)
    table = metadata_tensor(entries, ids.device).view(-1, 4)
    out = launch_embedding(ids, weight, table, metadata_tensor(row_trow, ids.device, torch.int32), block_d)
    del keep
    return out


# ---------------------------------------------------------------------------------------------
# the engine's resident tables: one row per resident tenant, one table per layer
# ---------------------------------------------------------------------------------------------
BASE_ROW = 0


class DeltaTables:
    """Table rows of the engine's tenants, shared by every layer: tenant -> row (row 0 is the
    base). A row is assigned on a tenant's first batch and freed when the tenant object is
    garbage-collected (unregistered and out of every in-flight batch); a freed row is reused.

    Each layer owns a :class:`LayerTable` (rows × 4 int64 on the device: the addresses of that
    tenant's signs, scales, position map and bias for the layer), written once per tenant, so a
    forward hands every layer only its plan (group -> row): no per-layer host work or copy.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._lock = threading.RLock()  # (a finalizer may run while it is held)
        self._rows: dict[int, int] = {}  # id(tenant) -> row
        self._owners: dict[int, weakref.ref] = {}  # row -> tenant
        self._free: list[int] = []
        self._next = 1
        self.version = 0  # bumped whenever a row changes owner

    @property
    def capacity(self) -> int:
        return self._next

    def row(self, tenant: object | None) -> int:
        """The table row of ``tenant`` (``None``: the base row), assigning one if needed."""
        if tenant is None:
            return BASE_ROW
        key = id(tenant)
        with self._lock:
            r = self._rows.get(key)
            if r is not None and self._owners[r]() is tenant:
                return r
            r = self._free.pop() if self._free else self._next
            self._next = max(self._next, r + 1)
            self._rows[key] = r
            self._owners[r] = weakref.ref(tenant)
            self.version += 1
        weakref.finalize(tenant, self._release, key, r)
        return r

    def _release(self, key: int, r: int) -> None:
        with self._lock:
            if self._rows.get(key) == r:
                del self._rows[key]
                self._owners.pop(r, None)
                self._free.append(r)
                self.version += 1

    def owners(self) -> dict[int, object]:
        """row -> live tenant."""
        with self._lock:
            items = list(self._owners.items())
        return {r: t for r, ref in items if (t := ref()) is not None}


class LayerTable:
    """One layer's rows of :class:`DeltaTables` on the device, synced lazily (only rows whose
    owner changed are rewritten). ``entry(tenant)`` gives the tenant's :class:`DeltaGroup` for
    this layer (``None``: the base weight), or ``"dense"`` for a replacement weight the kernel
    does not cover: those rows are listed in :attr:`dense_rows`."""

    def __init__(self, tables: DeltaTables, weight: torch.Tensor, bias: torch.Tensor | None, entry):
        self.tables = tables
        self.weight = weight
        self.bias = bias
        self.entry = entry
        self.table = torch.zeros((0, 4), dtype=torch.int64, device=tables.device)
        self.dense_rows: set[int] = set()
        self._version = -1
        self._written: dict[int, weakref.ref] = {}  # row -> tenant whose entry it holds
        self._keep: dict[int, list] = {}

    def sync(self) -> None:
        if self._version == self.tables.version and self.table.shape[0] >= self.tables.capacity:
            return
        owners = self.tables.owners()
        if self.table.shape[0] < self.tables.capacity:
            grown = torch.zeros((max(8, 2 * self.tables.capacity), 4), dtype=torch.int64, device=self.tables.device)
            grown[: self.table.shape[0]] = self.table
            self.table = grown
            self._written.pop(BASE_ROW, None)
        rows, values = [], []
        if BASE_ROW not in self._written:
            keep: list = []
            rows.append(BASE_ROW)
            values += table_entry(DeltaGroup(0, 0, bias=self.bias), self.weight, self.weight.dtype, keep)
            self._keep[BASE_ROW] = keep
            self._written[BASE_ROW] = lambda: None
        for r in [r for r in self._written if r != BASE_ROW and r not in owners]:  # freed rows
            self._written.pop(r)
            self._keep.pop(r, None)
            self.dense_rows.discard(r)
        for r, t in owners.items():
            ref = self._written.get(r)
            if ref is not None and ref() is t:
                continue
            e = self.entry(t)
            keep = []
            self.dense_rows.discard(r)
            if e == "dense":
                self.dense_rows.add(r)
                e = None
            g = e if e is not None else DeltaGroup(0, 0, bias=self.bias)
            rows.append(r)
            values += table_entry(g, self.weight, self.weight.dtype, keep)
            self._keep[r] = keep
            self._written[r] = weakref.ref(t)
        if rows:
            idx = torch.tensor(rows, device=self.tables.device)
            self.table.index_copy_(0, idx, torch.tensor(values, dtype=torch.int64).view(-1, 4).to(self.tables.device))
        self._version = self.tables.version


def reference_grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: Sequence, *,
                             transposed: bool = False) -> torch.Tensor:
    """The plain definition, group by group in float64: ``x_g · (W + α ⊙ sign)ᵀ + b`` (rows outside
    every group are zero). Used by the tests; ``sign`` from :func:`bitdelta_core.packing.unpack_signs`."""
    from .packing import unpack_signs

    groups = [_as_group(g) for g in groups]
    rows, cols = weight.shape
    N = cols if transposed else rows
    out = torch.zeros(x.shape[0], N, dtype=torch.float64)
    for g in groups:
        w = weight.double().clone()
        if g.signs is not None:
            kept = rows if g.index is None else g.index.numel()
            delta = unpack_signs(g.signs.cpu(), (kept, cols), torch.float64) * g.scale.cpu().double()[:, None]
            idx = torch.arange(rows) if g.index is None else g.index.cpu()
            w[idx] += delta
        y = x[g.start:g.end].double() @ (w if transposed else w.t())
        if g.bias is not None:
            y = y + g.bias.double()
        out[g.start:g.end] = y
    return out
