"""The delta artifact: one ``.safetensors`` file with packed signs, scales, dense tensors and
JSON metadata.

Tensor names (flat, one group per fine-tuned parameter ``P``)::

    P.signs    uint8 (ceil(kept*cols/8),) codec sign1 / resized (rows shared with the base)
    P.scale    fp16|fp32 (kept,) or (1,)  codec sign1 / resized
    P.rowmask  uint8 (ceil(rows/8),)      only when unchanged rows are left out (see codec)
    P.dense    any dtype, P's shape       codec dense
    P.extra    any dtype (new_rows, ...)  codec resized: rows beyond the base's

Metadata key ``"bitdelta"`` holds a JSON document (format ``FORMAT_VERSION``)::

    {"format_version": 2,
     "base": {"name_or_path", "fingerprint", "fingerprint_names": [...]},
     "model": {"architecture", "model_type", "config", "num_labels", "id2label", "problem_type"},
     "tokenizer": null | {"added_tokens": [{"content", "special"}]},
     "tensors": {P: {"codec", "shape", "dtype", "granularity"?, "base_shape"?}},
     "tied": {alias: canonical},
     "num_parameters": int, "compression": {...}, "created": iso8601, "library": "bitdelta x.y"}

Every ``base`` codec tensor and every tensor whose base value is used (sign1/resized) is listed
in ``fingerprint_names``; loading an artifact against a base checks their combined digest.

Format versions: 2 (written) stores only the kept rows' signs behind a row mask (either
granularity); 1 (read) stores every row's signs and allows a row mask with tensor granularity only.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from . import __version__
from .codec import Codec, SignDelta, codec_counts, from_tensors
from .dtypes import DTYPES
from .errors import (
    ArtifactContentError,
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactVersionError,
)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "bitdelta"
MAX_HEADER_BYTES = 64 * 1024 * 1024

def parse_dtype(name: str) -> torch.dtype:
    """A tensor's recorded dtype name -> ``torch.dtype``; :class:`ArtifactContentError` if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ArtifactContentError(f"unknown dtype {name!r}") from None


@dataclass
class TensorEntry:
    """How one fine-tuned tensor is stored."""

    codec: Codec
    shape: tuple[int, ...]
    dtype: str  # the fine-tuned tensor's dtype
    sign: SignDelta | None = None  # sign1 / resized
    dense: torch.Tensor | None = None  # dense (whole tensor) / resized (extra rows, may be None)
    base_shape: tuple[int, ...] | None = None

    def nbytes(self) -> int:
        n = self.sign.nbytes() if self.sign is not None else 0
        if self.dense is not None:
            n += self.dense.numel() * self.dense.element_size()
        return n

    def meta(self) -> dict:
        m: dict[str, Any] = {"codec": self.codec.value, "shape": list(self.shape), "dtype": self.dtype}
        if self.sign is not None:
            m["granularity"] = self.sign.granularity.value
        if self.base_shape is not None:
            m["base_shape"] = list(self.base_shape)
        return m


@dataclass
class DeltaArtifact:
    """A compressed fine-tune: everything needed to rebuild it from its base."""

    tensors: dict[str, TensorEntry]
    base: dict[str, Any]  # name_or_path, fingerprint, fingerprint_names
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    tied: dict[str, str] = field(default_factory=dict)
    num_parameters: int = 0
    compression: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    library: str = f"bitdelta {__version__}"

    # ---- derived views -------------------------------------------------------------------
    @property
    def num_labels(self) -> int | None:
        return self.model.get("num_labels")

    def id2label(self) -> dict[int, str] | None:
        m = self.model.get("id2label")
        return {int(k): v for k, v in m.items()} if m else None

    def stored_bytes(self) -> int:
        """Bytes of tensor payload (the file adds a JSON header)."""
        return sum(e.nbytes() for e in self.tensors.values())

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "base": self.base,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "tensors": {k: e.meta() for k, e in self.tensors.items()},
            "tied": self.tied,
            "num_parameters": self.num_parameters,
            "compression": self.compression,
            "created": self.created,
            "library": self.library,
        }

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, e in self.tensors.items():
            if e.sign is not None:
                out.update(e.sign.tensors(name))
            if e.dense is not None:
                key = f"{name}.dense" if e.codec == Codec.DENSE else f"{name}.extra"
                out[key] = e.dense
        return {k: v.contiguous().cpu() for k, v in out.items()}

    # ---- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)}
        return st_save_bytes(self.flat_tensors(), metadata=meta)

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically (temp file + rename); returns the file size in bytes."""
        data = self.to_bytes()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return len(data)


# ---- loading / validation ----------------------------------------------------------------


def _check_header(data: bytes, source: str) -> None:
    if len(data) < 8:
        raise ArtifactCorruptError(f"{source}: {len(data)} bytes is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        raise ArtifactCorruptError(
            f"{source}: header declares {n} bytes but the file has {len(data) - 8} after the length "
            "(truncated or not a safetensors file)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactCorruptError(f"{source}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactCorruptError(f"{source}: header is not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            s, e = (int(x) for x in v["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ArtifactCorruptError(f"{source}: tensor {k!r} has no valid data_offsets") from None
        if not 0 <= s <= e:
            raise ArtifactCorruptError(f"{source}: tensor {k!r} has invalid data_offsets [{s}, {e}]")
        end = max(end, e)
    if 8 + n + end > len(data):
        raise ArtifactCorruptError(
            f"{source}: tensors need {8 + n + end} bytes but the file has {len(data)} (truncated)"
        )


def load_artifact(path: str | os.PathLike) -> DeltaArtifact:
    """Read and fully validate an artifact file (typed :class:`ArtifactError` on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"artifact {str(path)!r} does not exist")
    return artifact_from_bytes(path.read_bytes(), source=str(path))


def artifact_from_bytes(data: bytes, source: str = "<bytes>") -> DeltaArtifact:
    _check_header(data, source)
    try:
        flat = st_load_bytes(data)
    except (SafetensorError, Exception) as e:  # noqa: BLE001 - any parser failure is corruption
        raise ArtifactCorruptError(f"{source}: not a readable safetensors file ({e})") from None
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise ArtifactCorruptError(f"{source}: no {METADATA_KEY!r} metadata (not a bitdelta artifact)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactCorruptError(f"{source}: metadata is not valid JSON ({e})") from None
    return artifact_from_parts(flat, meta, source)


def artifact_from_parts(flat: dict[str, torch.Tensor], meta: dict, source: str = "<artifact>") -> DeltaArtifact:
    if not isinstance(meta, dict):
        raise ArtifactCorruptError(f"{source}: metadata is not a JSON object")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ArtifactVersionError(
            f"{source}: format_version {version!r} is not supported (this library reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key in ("base", "tensors"):
        if not isinstance(meta.get(key), dict):
            raise ArtifactCorruptError(f"{source}: metadata field {key!r} is missing or not an object")
    base = meta["base"]
    if not isinstance(base.get("fingerprint"), str) or not isinstance(base.get("fingerprint_names"), list):
        raise ArtifactCorruptError(f"{source}: base identity (fingerprint) missing from metadata")

    remaining = dict(flat)
    entries: dict[str, TensorEntry] = {}

    def take(key: str, required: bool = True):
        t = remaining.pop(key, None)
        if t is None and required:
            raise ArtifactContentError(f"{source}: tensor {key!r} is missing")
        return t

    for name, m in meta["tensors"].items():
        try:
            codec = Codec(m["codec"])
            shape = tuple(int(s) for s in m["shape"])
            dtype = m["dtype"]
            parse_dtype(dtype)
            base_shape = tuple(int(s) for s in m["base_shape"]) if m.get("base_shape") is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactCorruptError(f"{source}: bad metadata for tensor {name!r} ({e})") from None
        if any(s < 0 for s in shape + (base_shape or ())):
            raise ArtifactCorruptError(f"{source}: negative shape for {name!r}")
        entry = TensorEntry(codec, shape, dtype, base_shape=base_shape)
        if codec in (Codec.SIGN1, Codec.RESIZED):
            sign_shape = shape
            if codec == Codec.RESIZED:
                if base_shape is None or base_shape[1:] != shape[1:]:
                    raise ArtifactContentError(f"{source}: resized tensor {name!r} needs a compatible base_shape")
                sign_shape = (min(shape[0], base_shape[0]), *shape[1:])
            try:
                entry.sign = from_tensors(
                    sign_shape, m.get("granularity", "row"), take(f"{name}.signs"), take(f"{name}.scale"),
                    take(f"{name}.rowmask", required=False), full_rows=version == 1,
                )
            except ValueError as e:
                raise ArtifactContentError(f"{source}: tensor {name!r}: {e}") from None
            if codec == Codec.RESIZED and shape[0] > base_shape[0]:
                extra = take(f"{name}.extra")
                want = (shape[0] - base_shape[0], *shape[1:])
                if tuple(extra.shape) != want:
                    raise ArtifactContentError(
                        f"{source}: tensor {name!r}.extra has shape {tuple(extra.shape)}, expected {want}"
                    )
                _check_finite(extra, f"{name}.extra", source)
                entry.dense = extra
        elif codec == Codec.DENSE:
            d = take(f"{name}.dense")
            if tuple(d.shape) != shape:
                raise ArtifactContentError(
                    f"{source}: tensor {name!r} has shape {tuple(d.shape)}, metadata says {shape}"
                )
            _check_finite(d, name, source)
            entry.dense = d
        entries[name] = entry
    if remaining:
        raise ArtifactContentError(f"{source}: unexpected tensors not described by metadata: {sorted(remaining)[:5]}")
    tied = meta.get("tied") or {}
    for alias, target in tied.items():
        if target not in entries:
            raise ArtifactContentError(f"{source}: tied tensor {alias!r} points to unknown {target!r}")
    return DeltaArtifact(
        tensors=entries,
        base=base,
        model=meta.get("model") or {},
        tokenizer=meta.get("tokenizer"),
        tied=tied,
        num_parameters=int(meta.get("num_parameters") or 0),
        compression=meta.get("compression") or {},
        created=meta.get("created", ""),
        library=meta.get("library", ""),
    )


def _check_finite(t: torch.Tensor, name: str, source: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ArtifactContentError(f"{source}: tensor {name!r} holds NaN or Inf")


def inspect_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of an artifact file: metadata, per-tensor codec/size, bits per parameter."""
    art = load_artifact(path)
    size = os.path.getsize(path)
    rows = []
    for name, e in art.tensors.items():
        row = {"name": name, **e.meta(), "bytes": e.nbytes(), "numel": math.prod(e.shape)}
        if e.sign is not None:  # rows whose delta is zero are not stored (see codec)
            row["rows_stored"] = e.sign.kept
        rows.append(row)
    return {
        "path": str(path),
        "file_bytes": size,
        "num_parameters": art.num_parameters,
        "bits_per_parameter": size * 8 / art.num_parameters if art.num_parameters else None,
        "codec_counts": codec_counts(e.codec for e in art.tensors.values()),
        "base": {k: v for k, v in art.base.items() if k != "fingerprint_names"},
        "model": {k: v for k, v in art.model.items() if k != "config"},
        "tokenizer": art.tokenizer,
        "tied": art.tied,
        "compression": art.compression,
        "created": art.created,
        "library": art.library,
        "tensors": rows,
    }
