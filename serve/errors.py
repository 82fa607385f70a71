"""How errors become HTTP answers: ``{"error": {"type": str, "message": str}}`` + a status code.

Library errors (:mod:`bitdelta_core.errors`) map through the ordered table below (first match
wins); the HTTP layer (:mod:`serve.http`) applies it in its exception handlers.
"""

from __future__ import annotations

from typing import Any

from bitdelta_core import errors as E

# most specific first: the first isinstance match wins
_MAP: list[tuple[type[BaseException], int, str]] = [
    (E.UnknownModelError, 404, "unknown_model"),
    (E.ModelExistsError, 409, "model_exists"),
    (E.InputTooLongError, 413, "input_too_long"),
    (E.InvalidInputError, 422, "invalid_request"),
    (E.BaseMismatchError, 400, "base_mismatch"),
    (E.ArtifactVersionError, 400, "artifact_version"),
    (E.ArtifactCorruptError, 400, "artifact_corrupt"),
    (E.ArtifactContentError, 400, "invalid_artifact"),
    (E.ArtifactError, 400, "invalid_artifact"),
    (E.ArchitectureMismatchError, 400, "base_mismatch"),
]


class ApiError(Exception):
    """An error with its HTTP status and a machine-readable type."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message}}


def classify_exception(exc: BaseException) -> tuple[int, str]:
    for cls, status, kind in _MAP:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


__all__ = ["ApiError", "classify_exception"]
