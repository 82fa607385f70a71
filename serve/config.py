"""Service settings (pydantic, validated on construction).

Precedence: explicit values (CLI flags, the ``args:`` of a Serve config file) > environment
variables ``BITDELTA_<FIELD>`` (e.g. ``BITDELTA_ADMIN_TOKEN``, ``BITDELTA_STORE``) > defaults.
Tokens are :class:`~pydantic.SecretStr` so they never appear in ``repr`` or logs; prefer the
environment for them over files and command lines.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bitdelta_core.bases import BASE_ALIASES
from bitdelta_core.errors import ModelLoadError

ENV_PREFIX = "BITDELTA_"


class ServeConfig(BaseModel):
    """Everything the service needs; one object shared by the CLI, the builder and the replicas."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- model -----------------------------------------------------------------------------
    base: str = Field(description="base model: a Hugging Face folder (or a hub id where the hub is reachable)")
    device: str = Field("cpu", description="torch device of the engine replicas: cpu, cuda, cuda:1, mps")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="compute dtype of the base")
    max_length: int | None = Field(None, ge=8, description="max tokens per input (default: the base's limit)")
    cache_bytes: int = Field(256 << 20, ge=0, description="working-weight cache budget per replica (bytes)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per engine replica")
    switch_interval_ms: float = Field(
        0.25, gt=0.0, le=100.0, description="Python's thread switch interval in each engine replica (ms): how long "
                                            "the thread that runs the forward waits for the GIL while the event "
                                            "loop answers other requests (Python's default is 5)")
    cpu_kernel: bool = Field(True, description="use the compiled fused CPU kernel where it builds "
                             "(float32 on CPU; plain PyTorch otherwise or when false)")

    # -- persistence -------------------------------------------------------------------------
    store: str = Field(".cache/store", description="artifact store directory (shared by all replicas)")
    sync_interval_s: float = Field(
        0.0, ge=0.0, description="min seconds between store checks per replica; 0 = check before every request")

    # -- dynamic batching ----------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096, description="max rows (inputs) per forward")
    max_wait_ms: float = Field(
        0.0, ge=0.0, le=10_000, description="how long a batch that is not full waits for more requests; 0 = a "
                                            "batch starts the moment the engine is free (requests that arrive "
                                            "during a forward form the next batch)")
    refill_wait_ms: float = Field(
        20.0, ge=0.0, le=1000.0, description="after a batch, how long the next one may wait for the clients it "
                                             "answered to send again (as many requests as were queued plus as "
                                             "many as it answered; at most half the batch's run time): keeps "
                                             "batches whole under steady load; a request that reaches an idle "
                                             "engine later than this runs at once; 0 = off")
    max_batch_tokens: int = Field(
        16384, ge=1, description="token budget per forward: rows x longest row (padded tokens); a single "
                                 "request larger than the budget still runs, alone")

    # -- request limits --------------------------------------------------------------------------
    max_inputs: int = Field(64, ge=1, description="max inputs per classify request (413 beyond)")
    max_text_chars: int = Field(20_000, ge=1, description="max characters per text (413 beyond)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="max JSON request body (413 beyond)")
    max_upload_bytes: int = Field(256 << 20, ge=1024, description="max artifact upload body (413 beyond)")

    # -- auth -----------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="bearer token for POST/DELETE /v1/models; unset = admin endpoints always 401")
    classify_token: SecretStr | None = Field(
        None, description="bearer token for POST /v1/classify and GET /v1/models; unset = open")
    rate_limit_hold_s: float = Field(
        1.0, ge=0.0, le=60.0, description="an API key over its rate limit gets its 429 after up to this many "
                                          "seconds (until its bucket refills; a few held per key at a time), so a "
                                          "client retrying in a loop sends at its limit; 0 = answer at once")

    # -- deployment ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 exposes the service)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    num_replicas: int = Field(1, ge=1, description="engine replicas (each holds the base + the whole pool)")
    replica_num_cpus: float = Field(0.5, ge=0.0, description="Ray CPUs reserved per engine replica")
    replica_num_gpus: float = Field(0.0, ge=0.0, description="Ray GPUs per engine replica (1 for device=cuda)")
    max_replicas_per_node: int | None = Field(
        None, ge=1, le=100, description="at most this many engine replicas on one Ray node (1 spreads them over "
                                       "nodes: a lost node takes one replica with it); unset = no limit")
    replica_resources: dict[str, float] | None = Field(
        None, description="custom Ray resources each engine replica needs, e.g. {bitdelta: 1} with that resource "
                          "declared only on the nodes meant to run replicas")
    max_ongoing_requests: int = Field(256, ge=1, description="per engine replica; keeps the batcher fed")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config for the engine (replaces num_replicas), e.g. "
                          "{min_replicas: 1, max_replicas: 4, target_ongoing_requests: 32}")

    @field_validator("admin_token", "classify_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, v):
        if v is None or (isinstance(v, str) and v.strip() == ""):
            return None
        return v

    @field_validator("store")
    @classmethod
    def _store_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must be a directory path")
        return v

    @field_validator("base")
    @classmethod
    def _resolve_base(cls, v: str) -> str:
        """Aliases (``all-minilm-l6-v2``) -> the packaged folder; local paths -> absolute, so
        replicas whose working directory differs load the same folder."""
        alias = BASE_ALIASES.get(v.strip().lower())
        if alias is not None:
            try:
                return str(alias())
            except ModelLoadError as e:
                raise ValueError(str(e)) from None
        return os.path.abspath(v) if os.path.exists(v) else v

    @field_validator("store")
    @classmethod
    def _store_absolute(cls, v: str) -> str:
        return os.path.abspath(os.path.expanduser(v))

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        for name in ("admin_token", "classify_token"):
            tok = getattr(self, name)
            if tok is not None and len(tok.get_secret_value()) < 8:
                raise ValueError(f"{name} must be at least 8 characters")
        return self

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def load(cls, values: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> "ServeConfig":
        """Defaults < ``BITDELTA_*`` environment < ``values`` (``None`` values are ignored)."""
        env = os.environ if env is None else env
        merged: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                merged[name] = _parse_env(name, raw)
        merged.update({k: v for k, v in (values or {}).items() if v is not None})
        return cls.model_validate(merged)

    def to_args(self) -> dict[str, Any]:
        """Plain dict (secrets revealed) for handing to Ray Serve deployments / builders."""
        d = self.model_dump()
        for name in ("admin_token", "classify_token"):
            tok = getattr(self, name)
            d[name] = tok.get_secret_value() if tok is not None else None
        return d


def _parse_env(name: str, raw: str) -> Any:
    if name in ("autoscaling", "replica_resources"):
        import json

        return json.loads(raw)
    return raw  # pydantic converts "32" -> 32, "0.5" -> 0.5 in lax mode


__all__ = ["ServeConfig", "ENV_PREFIX"]
