"""Per-tenant data: what the pool holds for one fine-tune, and its merged working weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec import SignDelta
from ..packing import unpack_signs

BASE_SLOT = -1


def merged_weight(base: torch.Tensor, sign: SignDelta, scale: torch.Tensor,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """``base + scale[:, None] * sign(Δ)`` in ``base``'s dtype.

    ``scale`` holds one scale per stored row; ``index`` (the stored rows, ascending) is given
    when ``sign`` leaves unchanged rows out, which then stay equal to the base.
    """
    rows = base.shape[0]
    cols = base.numel() // rows
    b = base.reshape(rows, cols)
    if index is None:  # in place on the freshly unpacked signs: one allocation, no second pass buffer
        signs = unpack_signs(sign.signs, (rows, cols), base.dtype)
        return signs.mul_(scale.unsqueeze(1)).add_(b).reshape(base.shape)
    signs = unpack_signs(sign.signs, (index.numel(), cols), base.dtype)
    return b.index_add(0, index, signs.mul_(scale.unsqueeze(1))).reshape(base.shape)


@dataclass(frozen=True)
class TenantInfo:
    """What the pool knows about a registered fine-tune (returned by list/get)."""

    name: str
    base: str
    architecture: str
    num_labels: int
    labels: list[str] | None
    problem_type: str
    bytes: int
    created: str


@dataclass
class Prediction:
    label: str | None
    score: float
    scores: dict[str, float] | None = None


@dataclass
class ParamDelta:
    """How one tenant changes one base parameter (resident form)."""

    kind: str  # "sign" | "dense"
    sign: SignDelta | None = None  # packed signs + one scale per stored row, in compute dtype
    dense: torch.Tensor | None = None  # replacement tensor in compute dtype
    index: torch.Tensor | None = None  # stored rows (int64, ascending) when unchanged rows are left out

    def nbytes(self) -> int:
        n = 0
        if self.sign is not None:
            n += self.sign.nbytes()
        if self.index is not None:
            n += self.index.numel() * self.index.element_size()
        if self.dense is not None:
            n += self.dense.numel() * self.dense.element_size()
        return n


@dataclass
class Tenant:
    info: TenantInfo
    slot: int
    # module name -> {param name (local) -> ParamDelta}; modules the tenant leaves alone are absent
    layers: dict[str, dict[str, ParamDelta]]
    num_labels: int
    id2label: dict[int, str] | None
    problem_type: str
    merged_bytes: int  # bytes of all working weights if merged (cache admission size)
