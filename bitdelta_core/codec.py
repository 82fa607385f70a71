"""One tensor's delta -> 1-bit code (packed signs + scales) and back.

Maths. For a weight of rank >= 2, ``Δ = W_ft - W_base`` is approximated by ``α ⊙ sign(Δ)``
with ``sign(0) = +1`` and the scales chosen to minimise ``||Δ - α ⊙ sign(Δ)||²``:

* ``granularity="row"`` (default): one scale per row of dim 0, ``α_r = mean_r |Δ|``.
  An all-zero row (an embedding row the fine-tune never touched) gets ``α_r = 0`` and so
  reconstructs to exactly zero.
* ``granularity="tensor"``: one scale, ``α = mean |Δ|`` over the rows that changed (the
  BitDelta paper's choice), and a packed row mask so unchanged rows stay exactly zero.

Stored tensors (see :mod:`bitdelta_core.packing` for the bit layout):

* ``signs``: uint8 ``(ceil(numel/8),)``
* ``scale``: ``(rows,)`` or ``(1,)`` in ``scale_dtype`` (fp16 by default). A tensor's scales are
  kept in fp32 instead when fp16 would overflow, flush a changed row's scale to zero, or (for
  scales in fp16's subnormal range, e.g. embedding rows of rarely seen tokens) add more than
  ``FP16_MAX_EXTRA_ERROR`` (0.1 %) to the tensor's 1-bit reconstruction error ``||Δ − α ⊙ sign(Δ)||²``
* ``rowmask``: uint8 ``(ceil(rows/8),)``, tensor granularity only, present only if some row
  is unchanged.

``decode`` is the reference definition that :mod:`bitdelta_core.apply` and the multi-tenant
engine are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from .packing import pack_bits, pack_signs, packed_numel, unpack_bits, unpack_signs

_FP16_MIN_NORMAL = 6.104e-05
_FP16_MAX = 65504.0
FP16_MAX_EXTRA_ERROR = 1e-3


class Granularity(str, Enum):
    ROW = "row"
    TENSOR = "tensor"


@dataclass
class SignDelta:
    """A 1-bit delta of one tensor of shape ``shape`` (rows = ``shape[0]``)."""

    shape: tuple[int, ...]
    signs: torch.Tensor  # uint8 (ceil(numel/8),)
    scale: torch.Tensor  # (rows,) or (1,)
    granularity: Granularity
    rowmask: torch.Tensor | None = None  # uint8 (ceil(rows/8),) or None

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def row_scales(self, dtype=torch.float32) -> torch.Tensor:
        """Per-row scales ``(rows,)`` whatever the granularity (0 for unchanged rows)."""
        if self.granularity == Granularity.ROW:
            return self.scale.to(dtype)
        alpha = self.scale.to(dtype).expand(self.rows).clone()
        if self.rowmask is not None:
            alpha = alpha * unpack_bits(self.rowmask, self.rows).to(dtype)
        return alpha

    def decode(self, dtype=torch.float32) -> torch.Tensor:
        """``α ⊙ sign(Δ)`` as a dense tensor of ``shape``."""
        signs = unpack_signs(self.signs, (self.rows, self.numel // max(self.rows, 1)), dtype)
        return (self.row_scales(dtype).unsqueeze(1) * signs).reshape(self.shape)

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


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype, delta2d: torch.Tensor | None = None,
                 changed: torch.Tensor | None = None) -> torch.Tensor:
    """``scale`` in ``scale_dtype``, or fp32 where fp16 would lose it (see the module docstring).

    Without ``delta2d`` any scale outside fp16's normal range falls back to fp32. With the
    ``(rows, cols)`` delta it was computed from (and, for one tensor-wide scale, the ``changed`` row
    mask), subnormal fp16 scales are kept when they cost < ``FP16_MAX_EXTRA_ERROR`` of the 1-bit
    squared error: rounding ``α_r`` by ``ε_r`` adds exactly ``cols · ε_r²`` to row ``r``'s error.
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
    rows_used = changed.float() if changed is not None else torch.ones(delta2d.shape[0])
    alpha = scale.float().expand(delta2d.shape[0]) * rows_used  # per-row α (0 for unchanged rows)
    eps = (half.float().expand(delta2d.shape[0]) - scale.float().expand(delta2d.shape[0])) * rows_used
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
    """Encode ``delta`` (rank >= 2, any float dtype) as signs + scales."""
    granularity = Granularity(granularity)
    if delta.dim() < 2:
        raise ValueError(f"1-bit codec needs a tensor of rank >= 2, got shape {tuple(delta.shape)}")
    d = delta.detach().float().reshape(delta.shape[0], -1)
    signs = pack_signs(d)
    # sum_r |Δ| in one pass (no |Δ| temporary); mean = sum / cols
    l1 = torch.linalg.vector_norm(d, ord=1, dim=1)
    cols = max(d.shape[1], 1)
    rowmask = None
    changed = None
    if granularity == Granularity.ROW:
        scale = l1 / cols
    else:
        changed = d.ne(0).any(dim=1)
        n_changed = int(changed.sum())
        mean = l1[changed].sum() / (n_changed * cols) if n_changed else l1.new_zeros(())
        scale = mean.reshape(1)
        if n_changed < d.shape[0]:
            rowmask = pack_bits(changed)
    return SignDelta(tuple(delta.shape), signs, _store_scale(scale, scale_dtype, d, changed), granularity, rowmask)


def from_tensors(shape: tuple[int, ...], granularity: Granularity | str, signs, scale, rowmask=None) -> SignDelta:
    """Rebuild a :class:`SignDelta` from stored tensors, checking their shapes (raises ValueError)."""
    granularity = Granularity(granularity)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape {shape} has rank < 2")
    n = math.prod(shape)
    if signs.dtype != torch.uint8 or tuple(signs.shape) != (packed_numel(n),):
        raise ValueError(f"signs must be uint8 ({packed_numel(n)},), got {signs.dtype} {tuple(signs.shape)}")
    want = (shape[0],) if granularity == Granularity.ROW else (1,)
    if tuple(scale.shape) != want or not scale.is_floating_point():
        raise ValueError(f"scale must be float {want}, got {scale.dtype} {tuple(scale.shape)}")
    if not torch.isfinite(scale).all():
        raise ValueError("scale holds NaN or Inf")
    if rowmask is not None:
        if granularity == Granularity.ROW:
            raise ValueError("rowmask is only valid with tensor granularity")
        if rowmask.dtype != torch.uint8 or tuple(rowmask.shape) != (packed_numel(shape[0]),):
            raise ValueError(f"rowmask must be uint8 ({packed_numel(shape[0])},), got {tuple(rowmask.shape)}")
    return SignDelta(shape, signs, scale, granularity, rowmask)
