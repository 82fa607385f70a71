"""One tensor's delta -> 1-bit code (packed signs + scales) and back.

Maths. For a weight of rank >= 2, ``Δ = W_ft - W_base`` is approximated by ``α ⊙ sign(Δ)``
with ``sign(0) = +1`` and the scales chosen to minimise ``||Δ - α ⊙ sign(Δ)||²``:

* ``granularity="row"`` (default): one scale per row of dim 0, ``α_r = mean_r |Δ|``.
* ``granularity="tensor"``: one scale, ``α = mean |Δ|`` over the rows that changed (the
  BitDelta paper's choice).

Rows whose delta is exactly zero (embedding rows of tokens the fine-tune never saw: typically
35-45 % of a real fine-tune's sign bits) reconstruct to exactly zero. They are left out of the
stored signs and scales behind a row mask, with tensor granularity always and with row
granularity whenever that saves bytes (otherwise they are stored with ``α_r = 0``).

Stored tensors (see :mod:`bitdelta_core.packing` for the bit layout):

* ``rowmask``: uint8 ``(ceil(rows/8),)``, present only when rows are left out; bit ``r`` is 1
  when row ``r`` is stored.
* ``signs``: uint8 ``(ceil(kept·cols/8),)``: the stored rows' signs, row-major, in row order
  (``kept = rows`` without a row mask).
* ``scale``: ``(kept,)`` or ``(1,)`` in ``scale_dtype`` (fp16 by default). A tensor's scales are
  kept in fp32 instead when fp16 would overflow, flush a changed row's scale to zero, or (for
  scales in fp16's subnormal range, e.g. embedding rows of rarely seen tokens) add more than
  ``FP16_MAX_EXTRA_ERROR`` (0.1 %) to the tensor's 1-bit reconstruction error ``||Δ − α ⊙ sign(Δ)||²``

``decode`` is the reference definition that :mod:`bitdelta_core.apply` and the multi-tenant
engine are tested against.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

import torch

from .packing import pack_bits, pack_signs, packed_numel, unpack_bits, unpack_signs


class Codec(str, Enum):
    """How one tensor of a fine-tune is stored in an artifact."""

    SIGN1 = "sign1"  # packed signs + scales (rank >= 2, same shape as base)
    RESIZED = "resized"  # sign1 on rows shared with the base + dense extra rows
    DENSE = "dense"  # the fine-tuned tensor stored as is (cast to dense_dtype)
    BASE = "base"  # identical to the base: nothing stored


def codec_counts(codecs: Iterable[Codec]) -> dict[str, int]:
    """``{codec value: number of tensors}``, sorted by codec value."""
    counts = Counter(Codec(c).value for c in codecs)
    return dict(sorted(counts.items()))


def format_counts(counts: dict[str, int]) -> str:
    """``{"dense": 2, "sign1": 5}`` -> ``"dense=2, sign1=5"``."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))

_FP16_MIN_NORMAL = 6.104e-05
_FP16_MAX = 65504.0
FP16_MAX_EXTRA_ERROR = 1e-3


class Granularity(str, Enum):
    ROW = "row"
    TENSOR = "tensor"


@dataclass
class SignDelta:
    """A 1-bit delta of one tensor of shape ``shape`` (rows = ``shape[0]``).

    Without a ``rowmask`` every row is stored: ``signs`` packs all ``numel`` signs and a per-row
    ``scale`` has ``rows`` entries. With a ``rowmask`` (packed bits over rows; rows whose delta is
    exactly zero are 0) only the kept rows are stored, in order: ``signs`` packs ``kept × cols``
    signs and a per-row ``scale`` has ``kept`` entries; the other rows decode to exactly zero.
    """

    shape: tuple[int, ...]
    signs: torch.Tensor  # uint8 (ceil(kept*cols/8),)
    scale: torch.Tensor  # (kept,) or (1,)
    granularity: Granularity
    rowmask: torch.Tensor | None = None  # uint8 (ceil(rows/8),) or None (all rows kept)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.numel // max(self.rows, 1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def kept_rows(self) -> torch.Tensor | None:
        """Indices (int64, ascending) of the stored rows, or ``None`` when every row is stored."""
        if self.rowmask is None:
            return None
        return torch.nonzero(unpack_bits(self.rowmask, self.rows)).reshape(-1).to(self.signs.device)

    @property
    def kept(self) -> int:
        """Number of stored rows."""
        return self.rows if self.rowmask is None else int(unpack_bits(self.rowmask, self.rows).sum())

    def kept_scales(self, dtype=torch.float32) -> torch.Tensor:
        """Scales of the stored rows, ``(kept,)``, whatever the granularity."""
        return self.scale.to(dtype).expand(self.kept).clone()

    def row_scales(self, dtype=torch.float32) -> torch.Tensor:
        """Per-row scales ``(rows,)`` whatever the granularity (0 for rows not stored)."""
        idx = self.kept_rows()
        if idx is None:
            return self.scale.to(dtype).expand(self.rows).clone()
        out = torch.zeros(self.rows, dtype=dtype, device=self.scale.device)
        return out.index_copy_(0, idx.to(out.device), self.scale.to(dtype).expand(idx.numel()))

    def decode(self, dtype=torch.float32) -> torch.Tensor:
        """``α ⊙ sign(Δ)`` as a dense tensor of ``shape``."""
        idx = self.kept_rows()  # the row mask is read once
        kept = self.rows if idx is None else idx.numel()
        signs = unpack_signs(self.signs, (kept, self.cols), dtype)
        vals = self.scale.to(dtype).expand(kept).unsqueeze(1) * signs
        if idx is None:
            return vals.reshape(self.shape)
        out = torch.zeros(self.rows, self.cols, dtype=dtype, device=vals.device)
        return out.index_copy_(0, idx, vals).reshape(self.shape)

    def nbytes(self) -> int:
        n = self.signs.numel() + self.scale.numel() * self.scale.element_size()
        if self.rowmask is not None:
            n += self.rowmask.numel()
        return n

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.signs": self.signs, f"{prefix}.scale": self.scale}
        if self.rowmask is not None:
            out[f"{prefix}.rowmask"] = self.rowmask
        return out


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype, delta2d: torch.Tensor | None = None) -> torch.Tensor:
    """``scale`` in ``scale_dtype``, or fp32 where fp16 would lose it (see the module docstring).

    Without ``delta2d`` any scale outside fp16's normal range falls back to fp32. With the
    ``(stored rows, cols)`` delta it was computed from, subnormal fp16 scales are kept when they
    cost < ``FP16_MAX_EXTRA_ERROR`` of the 1-bit squared error: rounding ``α_r`` by ``ε_r`` adds
    exactly ``cols · ε_r²`` to row ``r``'s error (a stored all-zero row has ``α_r = ε_r = 0``).
    """
    if scale_dtype != torch.float16:
        return scale.to(scale_dtype).contiguous()
    nz = scale[scale != 0]
    if not nz.numel() or (nz.min() >= _FP16_MIN_NORMAL and nz.max() <= _FP16_MAX):
        return scale.to(torch.float16).contiguous()
    half = scale.to(torch.float16)
    if delta2d is None or nz.max() > _FP16_MAX or bool(((half == 0) & (scale != 0)).any()):
        return scale.to(torch.float32).contiguous()
    cols = delta2d.shape[1]
    alpha = scale.float().expand(delta2d.shape[0])  # per stored row
    eps = half.float().expand(delta2d.shape[0]) - alpha
    sq = torch.linalg.vector_norm(delta2d.double(), ord=2, dim=1) ** 2
    one_bit_err = float(sq.sum() - cols * (alpha.double() ** 2).sum())
    extra = float(cols * (eps.double() ** 2).sum())
    if extra <= FP16_MAX_EXTRA_ERROR * max(one_bit_err, 0.0):
        return half.contiguous()
    return scale.to(torch.float32).contiguous()


def encode(
    delta: torch.Tensor,
    granularity: Granularity | str = Granularity.ROW,
    scale_dtype: torch.dtype = torch.float16,
) -> SignDelta:
    """Encode ``delta`` (rank >= 2, any float dtype) as signs + scales.

    Rows whose delta is exactly zero (embedding rows of tokens the fine-tune never saw) are
    dropped from the stored signs and scales behind a row mask whenever that saves bytes (always
    with tensor granularity, where a zero row could not be represented otherwise).
    """
    granularity = Granularity(granularity)
    if delta.dim() < 2:
        raise ValueError(f"1-bit codec needs a tensor of rank >= 2, got shape {tuple(delta.shape)}")
    d = delta.detach().float().reshape(delta.shape[0], -1)
    rows, cols = d.shape
    changed = d.ne(0).any(dim=1)
    n_changed = int(changed.sum())
    rowmask = None
    if n_changed < rows:
        scale_bytes = 0 if granularity == Granularity.TENSOR else torch.finfo(scale_dtype).bits // 8
        saved = math.ceil(rows * cols / 8) - math.ceil(n_changed * cols / 8) + (rows - n_changed) * scale_bytes
        if granularity == Granularity.TENSOR or saved > math.ceil(rows / 8):
            rowmask = pack_bits(changed)
            d = d[changed]
    signs = pack_signs(d)
    # sum_r |Δ| in one pass (no |Δ| temporary); mean = sum / cols
    l1 = torch.linalg.vector_norm(d, ord=1, dim=1)
    cols = max(cols, 1)
    if granularity == Granularity.ROW:
        scale = l1 / cols
    else:
        mean = l1.sum() / (n_changed * cols) if n_changed else l1.new_zeros(())
        scale = mean.reshape(1)
    return SignDelta(tuple(delta.shape), signs, _store_scale(scale, scale_dtype, d), granularity, rowmask)


def from_tensors(shape: tuple[int, ...], granularity: Granularity | str, signs, scale, rowmask=None, *,
                 full_rows: bool = False) -> SignDelta:
    """Rebuild a :class:`SignDelta` from stored tensors, checking their shapes (raises ValueError).

    ``full_rows=True`` reads the format-1 layout, where a row mask (tensor granularity only)
    came with the signs of every row; those are converted to the kept-rows layout.
    """
    granularity = Granularity(granularity)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape {shape} has rank < 2")
    rows = shape[0]
    cols = math.prod(shape) // max(rows, 1)
    kept = rows
    if rowmask is not None:
        if full_rows and granularity == Granularity.ROW:
            raise ValueError("rowmask is only valid with tensor granularity")
        if rowmask.dtype != torch.uint8 or tuple(rowmask.shape) != (packed_numel(rows),):
            raise ValueError(f"rowmask must be uint8 ({packed_numel(rows)},), got {rowmask.dtype} {tuple(rowmask.shape)}")
        bits = unpack_bits(rowmask, rowmask.numel() * 8)
        if bits[rows:].any():
            raise ValueError("rowmask has bits set beyond the last row")
        kept = int(bits.sum())
    stored = rows if full_rows else kept
    if signs.dtype != torch.uint8 or tuple(signs.shape) != (packed_numel(stored * cols),):
        raise ValueError(f"signs must be uint8 ({packed_numel(stored * cols)},) for {stored} stored rows, "
                         f"got {signs.dtype} {tuple(signs.shape)}")
    want = (kept,) if granularity == Granularity.ROW else (1,)
    if tuple(scale.shape) != want or not scale.is_floating_point():
        raise ValueError(f"scale must be float {want}, got {scale.dtype} {tuple(scale.shape)}")
    if not torch.isfinite(scale).all():
        raise ValueError("scale holds NaN or Inf")
    if full_rows and rowmask is not None:  # format 1: keep only the masked rows' signs
        idx = torch.nonzero(unpack_bits(rowmask, rows)).reshape(-1)
        signs = pack_bits(unpack_bits(signs, rows * cols).view(rows, cols)[idx])
    return SignDelta(shape, signs, scale, granularity, rowmask)
