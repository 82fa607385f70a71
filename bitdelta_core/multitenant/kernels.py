"""The layer-kernel registry: how to run a module of a given exact type with explicit parameters."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Callable[[nn.Module, dict[str, torch.Tensor], tuple, dict], Any]
_KERNELS: dict[type, Kernel] = {}


def register_kernel(cls: type) -> Callable[[Kernel], Kernel]:
    """Register a functional kernel ``fn(module, params, args, kwargs)`` for modules of exactly
    type ``cls`` (a subclass may lay out its inputs differently: it takes the generic path
    until a kernel is registered for it too)."""

    def deco(fn: Kernel) -> Kernel:
        _KERNELS[cls] = fn
        return fn

    return deco


@register_kernel(nn.Linear)
def _linear(m, p, args, kwargs):
    return F.linear(args[0], p["weight"], p.get("bias"))


@register_kernel(nn.LayerNorm)
def _layer_norm(m, p, args, kwargs):
    return F.layer_norm(args[0], m.normalized_shape, p.get("weight"), p.get("bias"), m.eps)


try:  # GPT-2 style Conv1D: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D

    @register_kernel(Conv1D)
    def _conv1d(m, p, args, kwargs):
        x = args[0]
        w = p["weight"]
        y = x.reshape(-1, x.shape[-1]) @ w
        if p.get("bias") is not None:
            y = y + p["bias"]
        return y.reshape(*x.shape[:-1], w.shape[1])
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = None


def _generic_kernel(m, p, args, kwargs):
    return torch.func.functional_call(m, p, args, kwargs, strict=False)


def _kernel_for(module: nn.Module) -> Kernel:
    return _KERNELS.get(type(module), _generic_kernel)
