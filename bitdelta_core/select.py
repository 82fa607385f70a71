"""Which tensors get which codec: decided by rank/shape and user rules, never by name substrings.

Rules (PEFT ``target_modules`` style), each a string:

* ``"classifier.weight"``: exact parameter name, or a suffix on a ``.`` boundary
  (``"query.weight"`` matches ``"bert.encoder.layer.0.attention.self.query.weight"``);
* ``"re:<regex>"``: a regular expression that must match the whole name.

``include`` (default: every tensor) restricts which rank>=2 tensors may use the 1-bit codec;
``exclude`` keeps the matching tensors dense. A rule that matches no tensor is an error, so a
typo never silently compresses nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .codec import Codec, Granularity
from .dtypes import FLOAT_DTYPES
from .errors import ConfigError


@dataclass
class CompressionConfig:
    """Options of :func:`bitdelta_core.compress.compress`.

    ``dense_dtype="exact"`` stores dense tensors in their own dtype (bit-exact).
    """

    granularity: Granularity = Granularity.ROW
    scale_dtype: str = "float16"
    dense_dtype: str = "float16"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        try:
            self.granularity = Granularity(self.granularity)
        except ValueError:
            raise ConfigError(
                f"granularity must be one of {[g.value for g in Granularity]}, got {self.granularity!r}"
            ) from None
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise ConfigError("include/exclude must be lists of rules, not a single string")
        if self.scale_dtype not in ("float16", "float32"):
            raise ConfigError(f"scale_dtype must be float16 or float32, got {self.scale_dtype!r}")
        if self.dense_dtype not in (*FLOAT_DTYPES, "exact"):
            raise ConfigError(f"dense_dtype must be one of {[*FLOAT_DTYPES, 'exact']}, got {self.dense_dtype!r}")
        self._include = [_compile(r) for r in self.include] if self.include is not None else None
        self._exclude = [_compile(r) for r in self.exclude]

    def to_dict(self) -> dict:
        return {
            "granularity": self.granularity.value,
            "scale_dtype": self.scale_dtype,
            "dense_dtype": self.dense_dtype,
            "include": self.include,
            "exclude": list(self.exclude),
        }

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.scale_dtype]

    def dense_torch_dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.dense_dtype == "exact" or not t.is_floating_point():
            return t.dtype
        return FLOAT_DTYPES[self.dense_dtype]


@dataclass
class Rule:
    text: str
    regex: re.Pattern | None

    def matches(self, name: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return name == self.text or name.endswith("." + self.text)


def _compile(text: str) -> Rule:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"selection rule must be a non-empty string, got {text!r}")
    if text.startswith("re:"):
        try:
            return Rule(text, re.compile(text[3:]))
        except re.error as e:
            raise ConfigError(f"invalid regex in rule {text!r}: {e}") from None
    return Rule(text, None)


@dataclass
class TensorPlan:
    """The decision for one fine-tuned tensor (what a dry run prints)."""

    name: str
    shape: tuple[int, ...]
    codec: Codec
    reason: str
    base_shape: tuple[int, ...] | None = None
    tied_to: str | None = None


def decide(
    ft: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    config: CompressionConfig,
    tied: dict[str, str],
    *,
    check_identical: bool = True,
) -> list[TensorPlan]:
    """Decide the codec of every tensor of the fine-tuned state dict ``ft``.

    ``base`` holds only tensors that really come from the base checkpoint; ``tied`` maps an
    alias name to the canonical name it shares storage with (aliases are not stored).
    ``check_identical=False`` skips the equality test for would-be ``sign1`` tensors (the caller,
    :func:`bitdelta_core.compress.compress`, detects an all-zero delta while encoding instead).
    """
    used: set[str] = set()

    def hit(rules, name):
        for r in rules:
            if r.matches(name):
                used.add(r.text)
                return True
        return False

    plans = []
    for name, t in ft.items():
        shape = tuple(t.shape)
        if name in tied:
            plans.append(TensorPlan(name, shape, Codec.BASE, f"tied to {tied[name]}", tied_to=tied[name]))
            continue
        b = base.get(name)
        bshape = tuple(b.shape) if b is not None else None
        excluded = hit(config._exclude, name)
        included = True if config._include is None else hit(config._include, name)
        same = bshape == shape and b is not None and b.dtype == t.dtype
        sign_candidate = same and t.is_floating_point() and t.dim() >= 2 and included and not excluded
        if b is None:
            plans.append(TensorPlan(name, shape, Codec.DENSE, "absent from base"))
        elif same and (check_identical or not sign_candidate) and torch.equal(b, t):
            plans.append(TensorPlan(name, shape, Codec.BASE, "identical to base", bshape))
        elif not t.is_floating_point():
            plans.append(TensorPlan(name, shape, Codec.DENSE, "non-float tensor changed", bshape))
        elif t.dim() < 2:
            plans.append(TensorPlan(name, shape, Codec.DENSE, f"rank {t.dim()}", bshape))
        elif excluded or not included:
            why = "excluded by rule" if excluded else "not matched by include rules"
            plans.append(TensorPlan(name, shape, Codec.DENSE, why, bshape))
        elif bshape == shape:
            plans.append(TensorPlan(name, shape, Codec.SIGN1, f"rank {t.dim()}", bshape))
        elif bshape[1:] == shape[1:]:
            plans.append(TensorPlan(name, shape, Codec.RESIZED, f"rows {bshape[0]} -> {shape[0]}", bshape))
        else:
            plans.append(TensorPlan(name, shape, Codec.DENSE, f"shape changed {bshape} -> {shape}", bshape))

    rules = [r.text for r in (config._include or [])] + [r.text for r in config._exclude]
    unused = [r for r in rules if r not in used]
    if unused:
        raise ConfigError(f"selection rule(s) matched no tensor: {unused}")
    return plans
