"""Plain reference of what an applied delta must be, computed from the two models directly
(never through the library's decode): ``base + α ⊙ sign(Δ)`` with ``sign(0) = +1``."""

from __future__ import annotations

import math

import torch

from bitdelta_core.codec import Codec

# fp16 scales: half an ulp of rounding (4.9e-4) plus fp32 summation-order noise
SCALE_RTOL = 1e-3


def ref_sign(delta: torch.Tensor) -> torch.Tensor:
    return torch.where(delta >= 0, 1.0, -1.0)


def ref_scales(delta2d: torch.Tensor, granularity: str) -> torch.Tensor:
    """α per row: mean |Δ| of the row, or one mean over the changed rows (0 for unchanged rows)."""
    absd = delta2d.abs().double()
    if granularity == "row":
        return absd.mean(dim=1)
    changed = delta2d.ne(0).any(dim=1)
    alpha = absd[changed].mean() if changed.any() else absd.new_zeros(())
    return torch.where(changed, alpha, 0.0)


def expected_tensor(entry, base_t: torch.Tensor | None, ft_t: torch.Tensor, dense_dtype=torch.float16):
    """The applied tensor for one artifact entry, from the base and fine-tuned tensors."""
    dtype = ft_t.dtype
    dense = (lambda t: t.to(dense_dtype).to(dtype)) if ft_t.is_floating_point() and dense_dtype else (lambda t: t)
    if entry.codec == Codec.BASE:
        assert torch.equal(base_t, ft_t)
        return base_t.clone()
    if entry.codec == Codec.DENSE:
        return dense(ft_t)
    k = base_t.shape[0]
    shared_ft = ft_t[:k]
    delta = (shared_ft.float() - base_t[: shared_ft.shape[0]].float()).reshape(shared_ft.shape[0], -1)
    gran = entry.sign.granularity.value
    want_alpha = ref_scales(delta, gran)
    changed = delta.ne(0).any(dim=1)
    kept = entry.sign.kept_rows()
    if kept is not None:  # rows left out of the stored signs are exactly the unchanged ones
        assert torch.equal(kept, torch.nonzero(changed).reshape(-1))
    if gran == "tensor" and not changed.all():
        assert kept is not None, "tensor granularity must mask its unchanged rows"
    alpha = entry.sign.row_scales(torch.float32)
    atol = 2.0**-25 if entry.sign.scale.dtype == torch.float16 else 1e-12  # fp16 subnormal rounding
    assert torch.allclose(alpha.double(), want_alpha, rtol=SCALE_RTOL, atol=atol), (
        f"scales differ from mean|Δ|: max rel err {((alpha.double() - want_alpha).abs() / want_alpha.clamp_min(1e-30)).max()}"
    )
    rec = (base_t[: shared_ft.shape[0]].float().reshape(delta.shape) + alpha[:, None] * ref_sign(delta))
    rec = rec.reshape(shared_ft.shape).to(dtype)
    if entry.codec == Codec.RESIZED and ft_t.shape[0] > k:
        rec = torch.cat([rec, dense(ft_t[k:])])
    return rec


def expected_state(base_sd, ft_sd, art, dense_dtype=torch.float16) -> dict[str, torch.Tensor]:
    out = {}
    for name, e in art.tensors.items():
        out[name] = expected_tensor(e, base_sd.get(name), ft_sd[name], dense_dtype)
    for alias, target in art.tied.items():
        out[alias] = out[target]
    return out


def assert_states_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), f"{k}: max abs diff {(got[k].float() - want[k].float()).abs().max()}"


def packed_bytes_ok(art) -> None:
    for name, e in art.tensors.items():
        if e.sign is not None:
            assert e.sign.signs.dtype == torch.uint8
            kept = e.sign.kept
            assert e.sign.signs.numel() == math.ceil(kept * math.prod(e.sign.shape[1:]) / 8), name
