"""dtype names <-> ``torch.dtype``: the one table used by artifacts, configs and the engine."""

from __future__ import annotations

import torch

# every dtype an artifact may record for a tensor
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}

# the floating-point dtypes offered for storage (scales, dense tensors) and compute
FLOAT_DTYPES: dict[str, torch.dtype] = {k: DTYPES[k] for k in ("float32", "float16", "bfloat16")}


def dtype_name(dt: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dt).removeprefix("torch.")


__all__ = ["DTYPES", "FLOAT_DTYPES", "dtype_name"]
