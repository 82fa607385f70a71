"""Typed exceptions raised by :mod:`bitdelta_core`.

Every error a user can trigger with bad input derives from :class:`BitDeltaError`, so callers
(the CLI, the HTTP service) can catch one type and report ``str(err)``, which always names the
offending file, tensor or model.
"""

from __future__ import annotations


class BitDeltaError(Exception):
    """Base class of all errors raised by bitdelta_core."""


class ConfigError(BitDeltaError, ValueError):
    """An option or selection rule is invalid (e.g. a regex that does not compile)."""


class ModelLoadError(BitDeltaError):
    """A model path / hub id / object could not be loaded."""


class ArchitectureMismatchError(BitDeltaError):
    """Base and fine-tuned models do not share an architecture (names the first bad tensor)."""


class ArtifactError(BitDeltaError):
    """Base class of problems with a delta artifact file."""


class ArtifactCorruptError(ArtifactError):
    """The file is not a readable safetensors artifact (truncated, random bytes, bad header)."""


class ArtifactVersionError(ArtifactError):
    """The artifact declares a format version this library does not read."""


class ArtifactContentError(ArtifactError):
    """Tensors are missing, extra, of the wrong shape/dtype, or hold NaN/Inf."""


class BaseMismatchError(ArtifactError):
    """The artifact was made against a different base model (fingerprint or shape mismatch)."""


class DataError(BitDeltaError, ValueError):
    """A dataset file or task specification is invalid."""


class EngineError(BitDeltaError):
    """Base class of multi-tenant engine errors."""


class UnknownModelError(EngineError, KeyError):
    """A request names a fine-tune that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown model"


class ModelExistsError(EngineError):
    """A fine-tune with this name is already registered."""


class InvalidInputError(EngineError, ValueError):
    """A batch is empty or its inputs are malformed / mismatched."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """The artifact path does not exist."""


class InputTooLongError(InvalidInputError):
    """A text exceeds the model's maximum length and truncation was disabled."""
