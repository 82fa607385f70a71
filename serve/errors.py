"""How errors become HTTP answers: ``{"error": {"type": str, "message": str}}`` + a status code.

Library errors (:mod:`bitdelta_core.errors`) cross the Ray boundary as plain dicts
(:func:`error_payload`) so nothing depends on exception pickling; the ingress turns them back
into :class:`ApiError` (:func:`raise_if_error`).
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


def error_payload(exc: BaseException) -> dict[str, Any]:
    """A library exception as a JSON-able dict (returned by engine replicas instead of raising)."""
    status, kind = classify_exception(exc)
    message = str(exc) if status != 500 else f"{type(exc).__name__}: {exc}"
    return {"error": {"status": status, "type": kind, "message": message}}


def raise_if_error(result: Any) -> Any:
    if isinstance(result, dict) and isinstance(result.get("error"), dict) and "status" in result["error"]:
        e = result["error"]
        replica = result.get("replica")
        raise ApiError(int(e["status"]), str(e["type"]), str(e["message"]),
                       {"x-bitdelta-replica": str(replica)} if replica else None)
    return result


__all__ = ["ApiError", "classify_exception", "error_payload", "raise_if_error"]
