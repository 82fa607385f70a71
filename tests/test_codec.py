"""Delta codec: signs, scales (row / tensor), exact zero rows, fp16 fallback, stored-tensor checks."""

from __future__ import annotations

import pytest
import torch

from bitdelta_core.codec import Granularity, encode, from_tensors
from bitdelta_core.packing import pack_signs, unpack_signs

from core_reference import SCALE_RTOL, ref_scales, ref_sign


def _delta(shape, seed=0, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=g) * 1e-3
    for r in zero_rows:
        d[r] = 0
    return d


@pytest.mark.parametrize("shape", [(5, 13), (8, 16), (6, 3, 3, 3), (1, 7)], ids=str)
@pytest.mark.parametrize("gran", ["row", "tensor"])
def test_encode_matches_reference(shape, gran):
    d = _delta(shape, zero_rows=(0,) if shape[0] > 1 else ())
    sd = encode(d, gran)
    d2 = d.reshape(shape[0], -1)
    assert sd.granularity == Granularity(gran)
    changed = d2.ne(0).any(dim=1)
    kept = sd.kept_rows()
    if kept is None:
        assert changed.all()
        stored = d2
    else:  # the zero row is left out of the stored signs and scales
        assert torch.equal(kept, torch.nonzero(changed).reshape(-1))
        stored = d2[kept]
    assert sd.signs.numel() == -(-stored.numel() // 8)
    assert torch.equal(unpack_signs(sd.signs, stored.shape), ref_sign(stored))
    want = ref_scales(d2, gran)
    assert torch.allclose(sd.row_scales().double(), want, rtol=SCALE_RTOL, atol=0)
    assert sd.scale.shape == ((stored.shape[0],) if gran == "row" else (1,))
    assert sd.scale.dtype == torch.float16
    dec = sd.decode()
    assert torch.equal(dec, (sd.row_scales()[:, None] * ref_sign(d2)).reshape(shape))
    if shape[0] > 1:
        assert torch.equal(dec[0], torch.zeros_like(dec[0]))  # untouched row -> exactly 0, not ±α
        assert (dec[1:] != 0).all()


def test_row_granularity_leaves_zero_rows_out_only_when_that_saves_bytes():
    # an embedding the fine-tune touched in 3 of 40 rows: signs and scales of 3 rows + a 5-byte mask
    d = torch.zeros(40, 16)
    d[[3, 17, 31]] = _delta((3, 16), seed=2)
    sd = encode(d, "row")
    assert sd.kept == 3 and sd.kept_rows().tolist() == [3, 17, 31]
    assert sd.signs.numel() == 6 and sd.scale.shape == (3,) and sd.rowmask.numel() == 5
    assert sd.nbytes() == 6 + 3 * 2 + 5 < 40 * 16 // 8  # vs 80 bytes of signs alone
    assert torch.equal(sd.decode()[[3, 17, 31]], sd.kept_scales()[:, None] * ref_sign(d[[3, 17, 31]]))
    assert torch.count_nonzero(sd.decode()) == 3 * 16
    # one zero row among 64 two-wide rows: a mask (8 bytes) would cost more than it saves
    d = _delta((64, 2), seed=3)
    d[5] = 0
    sd = encode(d, "row")
    assert sd.rowmask is None and sd.scale.shape == (64,) and sd.scale[5] == 0
    assert torch.equal(sd.decode()[5], torch.zeros(2))


def test_tensor_granularity_rowmask_only_when_rows_unchanged():
    assert encode(_delta((4, 8)), "tensor").rowmask is None
    sd = encode(_delta((12, 8), zero_rows=(2, 9)), "tensor")
    assert sd.rowmask is not None and sd.rowmask.numel() == 2
    assert sd.row_scales()[[2, 9]].tolist() == [0.0, 0.0]


def test_all_zero_delta():
    for gran in ("row", "tensor"):
        sd = encode(torch.zeros(4, 8), gran)
        assert torch.equal(sd.decode(), torch.zeros(4, 8))


def test_row_scale_minimises_error():
    d = _delta((6, 40), seed=3)
    sd = encode(d, "row", torch.float32)
    s = ref_sign(d)
    err = lambda a: ((d - a[:, None] * s) ** 2).sum()  # noqa: E731
    best = err(sd.scale)
    assert best < err(sd.scale * 1.01) and best < err(sd.scale * 0.99)
    # and per-row scales beat one scale for the whole tensor on rows of different magnitude
    d[:3] *= 10
    assert ((d - encode(d, "row", torch.float32).decode()) ** 2).sum() < ((d - encode(d, "tensor", torch.float32).decode()) ** 2).sum()


def test_fp16_fallback_for_tiny_scales():
    sd = encode(_delta((3, 8)) * 1e-4, "row", torch.float16)  # |Δ| ~ 1e-7 < fp16 min normal
    assert sd.scale.dtype == torch.float32 and (sd.scale > 0).all()
    assert encode(_delta((3, 8)), "row", torch.float32).scale.dtype == torch.float32


@pytest.mark.parametrize("gran", ["row", "tensor"])
def test_fp16_kept_when_a_few_tiny_rows_cost_nothing(gran):
    # an embedding whose rarely seen tokens moved by ~1e-6: fp16 subnormal scales for those rows
    d = _delta((64, 32), seed=4)
    d[:4] *= 1e-3
    d[60:] = 0
    sd = encode(d, gran, torch.float16)
    assert sd.scale.dtype == torch.float16
    ref = encode(d, gran, torch.float32)
    err16, err32 = ((d - sd.decode()) ** 2).sum(), ((d - ref.decode()) ** 2).sum()
    assert err16 <= err32 * (1 + 1e-3)
    assert torch.equal(sd.decode()[60:], torch.zeros(4, 32))


def test_fp16_never_flushes_a_changed_row_to_zero():
    d = _delta((8, 16), seed=5)
    d[0] = 1e-9  # scale 1e-9 would round to 0 in fp16: the row would silently become "unchanged"
    sd = encode(d, "row", torch.float16)
    assert sd.scale.dtype == torch.float32 and sd.scale[0] > 0


def test_other_input_dtypes():
    d = _delta((4, 16)).to(torch.bfloat16)
    sd = encode(d, "row")
    assert torch.equal(unpack_signs(sd.signs, (4, 16)), ref_sign(d.float()))


def test_rank_one_rejected():
    with pytest.raises(ValueError, match="rank"):
        encode(torch.ones(5))


def test_from_tensors_validates():
    sd = encode(_delta((4, 8)), "row")
    assert from_tensors((4, 8), "row", sd.signs, sd.scale).decode().shape == (4, 8)
    with pytest.raises(ValueError, match="signs"):
        from_tensors((4, 8), "row", sd.signs[:-1], sd.scale)
    with pytest.raises(ValueError, match="scale"):
        from_tensors((4, 8), "row", sd.signs, sd.scale[:2])
    with pytest.raises(ValueError, match="NaN"):
        from_tensors((4, 8), "row", sd.signs, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="signs"):  # a mask keeping 0 rows, with 4 rows of signs
        from_tensors((4, 8), "row", sd.signs, sd.scale, torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rowmask has bits set beyond"):
        from_tensors((4, 8), "row", sd.signs, sd.scale, torch.tensor([0xFF], dtype=torch.uint8))
    with pytest.raises(ValueError, match="rowmask must be"):
        from_tensors((4, 8), "row", sd.signs, sd.scale, torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="only valid with tensor granularity"):  # format 1 rule
        from_tensors((4, 8), "row", sd.signs, sd.scale, torch.tensor([0x0F], dtype=torch.uint8), full_rows=True)
    with pytest.raises(ValueError, match="rank"):
        from_tensors((32,), "row", sd.signs, sd.scale)
    with pytest.raises(ValueError):
        from_tensors((4, 8), "diagonal", sd.signs, sd.scale)


def test_format1_full_row_signs_are_converted():
    """Format 1 stored every row's signs next to a tensor-granularity row mask."""
    d = _delta((12, 8), seed=6, zero_rows=(0, 5, 11))
    sd = encode(d, "tensor")
    full_signs = pack_signs(d)  # every row, as format 1 wrote them
    old = from_tensors((12, 8), "tensor", full_signs, sd.scale, sd.rowmask, full_rows=True)
    assert torch.equal(old.signs, sd.signs) and old.kept == 9
    assert torch.equal(old.decode(), sd.decode())
    with pytest.raises(ValueError, match="signs"):  # format 2 reading of the same tensors
        from_tensors((12, 8), "tensor", full_signs, sd.scale, sd.rowmask)
