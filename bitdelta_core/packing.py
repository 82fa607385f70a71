"""Sign bits <-> packed bytes.

Layout (the only one used in this project)::

    packed: uint8, shape (ceil(n / 8),) where n = numel of the signed tensor
    bit j (LSB = 0) of byte b  =  1 if element 8*b + j of the row-major flattened tensor is
                                  "positive" (>= 0 for signs of a delta, see codec), else 0
    padding bits in the last byte are 0

When the last dimension is a multiple of 8 (every hidden size in practice) row ``r`` of a
``(rows, cols)`` matrix occupies bytes ``[r*cols/8, (r+1)*cols/8)``, so rows can be gathered
without unpacking the whole tensor (used by the multi-tenant embedding path).

All functions are vectorised (no Python loop over elements) and run on any device; CPU tensors
take numpy's ``packbits``/``unpackbits`` (same layout, ``bitorder="little"``), other devices a
torch shift-and-sum path. Both are tested against a plain Python reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_numel(n: int) -> int:
    """Number of bytes needed to pack ``n`` bits."""
    return math.ceil(n / 8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor of any shape into ``uint8`` (see module docstring for the layout)."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    flat = bits.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_bits_torch(flat)


def _pack_bits_torch(flat: torch.Tensor) -> torch.Tensor:
    """Device-agnostic torch path of :func:`pack_bits` (flat bool in)."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8)
    shifts = _SHIFTS.to(groups.device)
    return (groups << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects a uint8 tensor, got {packed.dtype}")
    if packed.numel() * 8 < n:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than {n} bits")
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.reshape(-1).numpy(), count=n, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    return _unpack_bits_torch(packed, n)


def _unpack_bits_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Device-agnostic torch path of :func:`unpack_bits`."""
    shifts = _SHIFTS.to(packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` (zero counts as positive) for a tensor of any shape."""
    return pack_bits(x >= 0)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype=torch.float32) -> torch.Tensor:
    """Unpack to a ``{-1, +1}`` tensor of ``shape`` and ``dtype`` (one table gather per byte)."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs expects a uint8 tensor, got {packed.dtype}")
    if packed.numel() * 8 < n:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than {n} bits")
    signs = sign_lut(dtype, packed.device).index_select(0, packed.reshape(-1).int())
    return signs.view(-1)[:n].view(shape)


_LUT_CACHE: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def sign_lut(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``(256, 8)`` table: byte value -> its 8 signs (LSB first) as ``dtype`` in {-1, +1}.

    ``index_select`` of packed bytes into it unpacks signs in one gather (several times faster
    than advanced indexing on CPU); every sign unpacking in the project goes through it.
    """
    key = (dtype, str(device))
    lut = _LUT_CACHE.get(key)
    if lut is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        lut = _LUT_CACHE[key] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return lut


def unpack_sign_rows(packed: torch.Tensor, cols: int, rows: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Signs of selected rows of a packed ``(R, cols)`` matrix, ``cols % 8 == 0``.

    ``rows`` is an integer tensor of any shape; the result has shape ``rows.shape + (cols,)``.
    Only the bytes of the selected rows are touched.
    """
    if cols % 8:
        raise ValueError(f"row gather needs cols divisible by 8, got {cols}")
    sel = packed.view(-1, cols // 8).index_select(0, rows.reshape(-1))  # (k, cols/8) bytes
    return sign_lut(dtype, packed.device).index_select(0, sel.reshape(-1).int()).view(*rows.shape, cols)
