"""Artifact file: round trip, and every kind of bad file / bad base / bad model -> a typed error."""

from __future__ import annotations

import copy
import json
import random
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bitdelta_core.apply import apply, apply_to_state_dict, check_base
from bitdelta_core.artifact import (
    FORMAT_VERSION, artifact_from_bytes, inspect_artifact, load_artifact,
)
from bitdelta_core.compress import compress
from bitdelta_core.errors import (
    ArchitectureMismatchError, ArtifactContentError, ArtifactCorruptError, ArtifactError,
    ArtifactNotFoundError, ArtifactVersionError, BaseMismatchError, BitDeltaError, ModelLoadError,
)

from core_reference import assert_states_equal
from tiny_models import build, one_torch_thread, pair  # noqa: F401

W = "bert.encoder.layer.0.attention.self.query.weight"
B = "bert.encoder.layer.0.attention.self.query.bias"


@pytest.fixture(scope="module")
def art():
    base, ft = pair("bert", "seqcls")
    return compress(base, ft, progress=False)


@pytest.fixture(scope="module")
def data(art):
    return art.to_bytes()


def split(data: bytes) -> tuple[dict, dict]:
    flat = st_load(data)
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["bitdelta"])
    return flat, meta


def join(flat: dict, meta: dict) -> bytes:
    return st_save(flat, metadata={"bitdelta": json.dumps(meta)})


def test_save_load_roundtrip(art, tmp_path):
    path = tmp_path / "d.safetensors"
    size = art.save(path)
    assert path.stat().st_size == size
    assert not [p for p in tmp_path.iterdir() if p.name != "d.safetensors"]  # no temp file left
    loaded = load_artifact(path)
    assert loaded.metadata() == art.metadata()
    flat_a, flat_b = art.flat_tensors(), loaded.flat_tensors()
    assert_states_equal(flat_b, flat_a)
    base, _ = pair("bert", "seqcls")
    assert_states_equal(apply_to_state_dict(base.state_dict(), loaded), apply_to_state_dict(base.state_dict(), art))
    info = inspect_artifact(path)
    assert info["file_bytes"] == size
    assert info["bits_per_parameter"] == pytest.approx(size * 8 / art.num_parameters)
    assert sum(info["codec_counts"].values()) == len(art.tensors)
    meta = split(path.read_bytes())[1]
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model"]["architecture"] == "BertForSequenceClassification"
    assert meta["model"]["num_labels"] == 3
    assert meta["tensors"][W] == {"codec": "sign1", "shape": [32, 32], "dtype": "float32", "granularity": "row",
                                  "base_shape": [32, 32]}


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, "half"], ids=lambda c: f"cut{c}")
def test_truncated(data, cut):
    n = len(data) // 2 if cut == "half" else (len(data) + cut if cut < 0 else cut)
    with pytest.raises(ArtifactCorruptError):
        artifact_from_bytes(data[:n])


def test_random_bytes():
    rnd = random.Random(0)
    for size in (7, 100, 5000):
        with pytest.raises(ArtifactCorruptError):
            artifact_from_bytes(rnd.randbytes(size))


def test_absurd_header_size(data):
    with pytest.raises(ArtifactCorruptError, match="header declares"):
        artifact_from_bytes(struct.pack("<Q", 2**62) + data[8:])


def test_header_not_json():
    bad = struct.pack("<Q", 12) + b"not json at!" + b"\0" * 16
    with pytest.raises(ArtifactCorruptError, match="JSON"):
        artifact_from_bytes(bad)


def test_plain_safetensors_is_not_an_artifact():
    with pytest.raises(ArtifactCorruptError, match="not a bitdelta artifact"):
        artifact_from_bytes(st_save({"x": torch.zeros(3)}))


def test_unknown_version(data):
    flat, meta = split(data)
    meta["format_version"] = 99
    with pytest.raises(ArtifactVersionError, match="99"):
        artifact_from_bytes(join(flat, meta))


def _edit(data, fn):
    flat, meta = split(data)
    fn(flat, meta)
    return join(flat, meta)


EDITS = {
    "nan-scale": (lambda f, m: f[f"{W}.scale"].__setitem__(0, float("nan")), ArtifactContentError, "NaN"),
    "inf-dense": (lambda f, m: f[f"{B}.dense"].__setitem__(1, float("inf")), ArtifactContentError, "NaN or Inf"),
    "signs-shape": (lambda f, m: f.__setitem__(f"{W}.signs", f[f"{W}.signs"][:-1].clone()), ArtifactContentError, W),
    "meta-shape": (lambda f, m: m["tensors"][W].__setitem__("shape", [32, 40]), ArtifactContentError, W),
    "dense-shape": (lambda f, m: m["tensors"][B].__setitem__("shape", [33]), ArtifactContentError, B),
    "missing-tensor": (lambda f, m: f.pop(f"{W}.scale"), ArtifactContentError, "missing"),
    "extra-tensor": (lambda f, m: f.__setitem__("surprise", torch.zeros(2)), ArtifactContentError, "surprise"),
    "missing-meta-entry": (lambda f, m: m["tensors"].pop(W), ArtifactContentError, "unexpected"),
    "bad-codec": (lambda f, m: m["tensors"][W].__setitem__("codec", "sign2"), ArtifactCorruptError, W),
    "bad-dtype": (lambda f, m: m["tensors"][B].__setitem__("dtype", "float7"), ArtifactContentError, "float7"),
    "no-fingerprint": (lambda f, m: m["base"].pop("fingerprint"), ArtifactCorruptError, "fingerprint"),
    "no-tensors": (lambda f, m: m.pop("tensors"), ArtifactCorruptError, "tensors"),
    "bad-tied": (lambda f, m: m.__setitem__("tied", {"a.weight": "nope"}), ArtifactContentError, "nope"),
    "bad-granularity": (lambda f, m: m["tensors"][W].__setitem__("granularity", "diag"), ArtifactContentError, W),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_file(data, edit):
    fn, err, msg = EDITS[edit]
    with pytest.raises(err, match=msg):
        artifact_from_bytes(_edit(data, fn))


def test_meta_not_json(data):
    flat, _ = split(data)
    with pytest.raises(ArtifactCorruptError, match="metadata"):
        artifact_from_bytes(st_save(flat, metadata={"bitdelta": "{not json"}))


def test_missing_paths(tmp_path, art):
    with pytest.raises(ArtifactNotFoundError):
        load_artifact(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        inspect_artifact(tmp_path / "nope.safetensors")
    base, ft = pair("bert", "seqcls")
    for bad in (tmp_path / "missing-model", "./missing", "/definitely/not/here"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            compress(bad, ft, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        compress(base, tmp_path / "empty", progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(ModelLoadError, match="junk"):
        compress(tmp_path / "junk.safetensors", ft, progress=False)
    with pytest.raises(ArtifactNotFoundError):
        apply(copy.deepcopy(base), tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError):
        compress(42, ft, progress=False)


def test_errors_are_one_family():
    for e in (ArtifactCorruptError, ArtifactVersionError, ArtifactContentError, BaseMismatchError,
              ArtifactNotFoundError):
        assert issubclass(e, ArtifactError) and issubclass(e, BitDeltaError)
    assert issubclass(ArchitectureMismatchError, BitDeltaError) and issubclass(ModelLoadError, BitDeltaError)


# ---- wrong base ---------------------------------------------------------------------------


def test_delta_on_wrong_base(art):
    other = build("bert", "seqcls", seed=123)  # same architecture, other weights
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        apply_to_state_dict(other.state_dict(), art)
    with pytest.raises(BaseMismatchError):
        apply(other, art)


def test_base_with_one_changed_tensor(art):
    base, _ = pair("bert", "seqcls")
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    sd[W][0, 0] += 1e-6
    with pytest.raises(BaseMismatchError):
        check_base(sd, art)
    del sd[W]
    with pytest.raises(BaseMismatchError, match=W):
        check_base(sd, art)


def test_base_of_other_shape(art):
    other = build("bert", "seqcls", hidden_size=48, num_attention_heads=2)
    with pytest.raises(BaseMismatchError, match="shape"):
        apply(other, art)


# ---- different architectures ----------------------------------------------------------------


def test_different_architectures_named():
    bert, _ = pair("bert", "seqcls")
    _, gpt2 = pair("gpt2", "causal")
    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        compress(bert, gpt2, progress=False)
    wide = build("bert", "seqcls", hidden_size=48)
    with pytest.raises(ArchitectureMismatchError, match="'bert.embeddings.word_embeddings.weight'"):
        compress(bert, wide, progress=False)
    ffn = build("bert", "seqcls", intermediate_size=40)
    # the first mismatching tensor in order is named even though only its rows changed
    with pytest.raises(ArchitectureMismatchError, match="'bert.encoder.layer.0.intermediate.dense.weight'"):
        compress(bert, ffn, progress=False)


def test_nan_in_finetune_is_rejected_at_compress_time():
    base, ft = pair("bert", "seqcls")
    bad = copy.deepcopy(ft)
    with torch.no_grad():
        dict(bad.named_parameters())[W][1, 2] = float("nan")
    with pytest.raises(ModelLoadError, match=W):
        compress(base, bad, progress=False)


def test_format_1_artifact_still_reads():
    """Format 1 stored every row's signs next to a (tensor-granularity) row mask."""
    from bitdelta_core.packing import pack_signs
    from bitdelta_core.select import CompressionConfig

    base, ft = pair("bert", "seqcls")
    art = compress(base, ft, CompressionConfig(granularity="tensor"), progress=False)
    flat, meta = split(art.to_bytes())
    assert meta["format_version"] == FORMAT_VERSION == 2
    masked = [n for n, e in art.tensors.items() if e.sign is not None and e.sign.rowmask is not None]
    assert masked  # the tiny fine-tune leaves some embedding rows untouched
    meta["format_version"] = 1
    for n in masked:
        full = pack_signs(art.tensors[n].sign.decode())  # every row (unchanged ones decode to 0 -> +1)
        assert full.numel() > flat[f"{n}.signs"].numel()
        flat[f"{n}.signs"] = full
    old = artifact_from_bytes(join(flat, meta))
    for n in masked:
        assert torch.equal(old.tensors[n].sign.signs, art.tensors[n].sign.signs)
    sd = base.state_dict()
    assert_states_equal(apply_to_state_dict(sd, old), apply_to_state_dict(sd, art))
    meta["format_version"] = True  # JSON true is not version 1
    with pytest.raises(ArtifactVersionError):
        artifact_from_bytes(join(flat, meta))
