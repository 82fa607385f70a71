"""Bit packing: both code paths against a plain Python reference of the documented layout."""

from __future__ import annotations

import math

import pytest
import torch

from bitdelta_core import packing
from bitdelta_core.packing import (
    pack_bits, pack_signs, packed_numel, unpack_bits, unpack_sign_rows, unpack_signs,
)


def ref_pack(bits: list[bool]) -> list[int]:
    """bit j (LSB = 0) of byte b = element 8b + j; padding bits 0."""
    out = [0] * math.ceil(len(bits) / 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return out


SHAPES = [(0,), (1,), (7,), (8,), (9,), (63,), (3, 5), (4, 8), (2, 3, 7), (6, 3, 3, 3), (1000,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_pack_matches_reference_and_roundtrips(shape, path):
    g = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    bits = torch.rand(shape, generator=g) > 0.5
    if path == "numpy":
        packed = pack_bits(bits)
        back = unpack_bits(packed, bits.numel())
    else:
        packed = packing._pack_bits_torch(bits.reshape(-1))
        back = packing._unpack_bits_torch(packed, bits.numel())
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(bits.numel()) == math.ceil(bits.numel() / 8)
    assert packed.tolist() == ref_pack(bits.reshape(-1).tolist())
    assert back.dtype == torch.bool and torch.equal(back, bits.reshape(-1))


def test_known_bytes():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b00000001, 0b10000010, 0b00000001]


def test_signs_zero_counts_as_positive():
    x = torch.tensor([[-2.0, 0.0, 3.0], [-0.5, 1e-30, -1e-30]])
    packed = pack_signs(x)
    assert unpack_signs(packed, x.shape).tolist() == [[-1, 1, 1], [-1, 1, -1]]
    assert unpack_signs(packed, x.shape, torch.float16).dtype == torch.float16


def test_unpack_sign_rows_matches_full_unpack():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 16, generator=g)
    packed = pack_signs(x)
    full = unpack_signs(packed, x.shape)
    rows = torch.tensor([[3, 0], [10, 3]])
    got = unpack_sign_rows(packed, 16, rows)
    assert got.shape == (2, 2, 16)
    assert torch.equal(got, full[rows])


def test_bad_inputs():
    with pytest.raises(TypeError):
        pack_bits(torch.ones(3))
    with pytest.raises(TypeError):
        unpack_bits(torch.ones(3), 3)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        unpack_sign_rows(torch.zeros(4, dtype=torch.uint8), 12, torch.tensor([0]))
