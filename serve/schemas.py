"""HTTP request/response models (the fixed API contract). Unknown keys are rejected (422)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


TextPair = Annotated[list[StrictStr], Field(min_length=2, max_length=2, description="[text, text_pair]")]
Input = Union[StrictStr, TextPair]


class ClassifyRequest(_Strict):
    model: StrictStr = Field(description="name of a registered fine-tune", examples=["sst2"])
    inputs: list[Input] = Field(min_length=1, description="texts or [text, text] pairs (at least one)",
                                examples=[["a gripping, beautifully shot film", "dull and far too long"]])
    truncate: StrictBool = Field(True, description="truncate inputs longer than the model's limit "
                                                   "(false: such an input is answered with 413)")
    return_all_scores: StrictBool = Field(False, description="include the probability of every label")


class PredictionOut(_Strict):
    label: str | None = Field(description="top label (null for regression heads)")
    score: float = Field(description="probability of the top label, or the regression value")
    scores: dict[str, float] | None = Field(None, description="every label's probability (return_all_scores)")


class ClassifyResponse(_Strict):
    model: str
    predictions: list[PredictionOut]


class ModelInfo(_Strict):
    name: str
    base: str = Field(description="the base model the delta applies to")
    num_labels: int
    labels: list[str] | None = Field(description="label names in id order (null for regression)")
    bytes: int = Field(description="resident bytes of this fine-tune in the pool (packed signs, scales, dense tensors)")
    created: str = Field(description="registration time, ISO-8601 UTC")


class ModelList(_Strict):
    models: list[ModelInfo]
    serving_path: str = Field(
        description="how the answering replica runs a batch for this base's architecture: 'mixed' (every "
                    "fine-tune of the batch in one forward), 'fallback' (one forward per fine-tune group, "
                    "merged weights from the packed pool) or 'fallback-merged' (the same through "
                    "torch.func.functional_call); chosen by the engine's start-up self-check")


class ErrorBody(_Strict):
    type: str = Field(description="machine-readable error kind, e.g. unknown_model, invalid_artifact")
    message: str = Field(description="what is wrong, naming the offending model/field/tensor")


class ErrorResponse(_Strict):
    error: ErrorBody


class Health(_Strict):
    status: str
    models: int
    replicas: int = Field(description="engine replicas that answered")


__all__ = ["ClassifyRequest", "ClassifyResponse", "PredictionOut", "ModelInfo", "ModelList",
           "ErrorBody", "ErrorResponse", "Health"]
