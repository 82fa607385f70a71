"""Bad-input suite over real HTTP: one local Ray Serve service for the module.

Every case is one malformed request, API or artifact upload. Each must get its documented
status code and a JSON error ``{"error": {"type", "message"}}`` whose message names the problem
(``needles``: case-insensitive substrings that must all appear). After each case ``/healthz``
is fine, the model list is unchanged, the store directory is unchanged (file listing and
SHA-256 of every file), and nothing appeared next to the store (path traversal).

Artifacts are tiny real 1-bit deltas (``compress`` of a few AdamW steps); the corrupt ones are
made by rewriting a valid file at the safetensors level, so each one breaks exactly one thing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bitdelta_core.compress import compress
from serve import run
from serve.config import ServeConfig
from serve_helpers import ADMIN, AUTH, client, finetune, free_port, save_base

pytestmark = pytest.mark.slow

MAX_INPUTS = 8
MAX_TEXT_CHARS = 2000
MAX_BODY = 16 * 1024
MAX_UPLOAD = 256 * 1024
GOOD = "good"  # the one registered model
JSON_CT = {"content-type": "application/json"}


# =============================================================================================
# artifacts: one valid file, rewritten to break exactly one thing
# =============================================================================================
def _parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return st_load(data), json.loads(header["__metadata__"]["bitdelta"])


def _pack(flat: dict[str, torch.Tensor], meta: dict | None) -> bytes:
    return st_save(flat, metadata={"bitdelta": json.dumps(meta)} if meta is not None else None)


def _first(meta: dict, codec: str, ndim: int | None = None) -> str:
    for name, m in meta["tensors"].items():
        if m["codec"] == codec and (ndim is None or len(m["shape"]) == ndim):
            return name
    raise AssertionError(f"no {codec} tensor in the test artifact")


def _nan_scale(data: bytes) -> bytes:
    flat, meta = _parts(data)
    name = _first(meta, "sign1")
    flat[f"{name}.scale"] = flat[f"{name}.scale"].clone()
    flat[f"{name}.scale"][0] = float("nan")
    return _pack(flat, meta)


def _inf_scale(data: bytes) -> bytes:
    flat, meta = _parts(data)
    name = _first(meta, "sign1")
    flat[f"{name}.scale"] = flat[f"{name}.scale"].clone()
    flat[f"{name}.scale"][-1] = float("inf")
    return _pack(flat, meta)


def _nan_dense(data: bytes) -> bytes:
    flat, meta = _parts(data)
    name = _first(meta, "dense")
    flat[f"{name}.dense"] = flat[f"{name}.dense"].clone()
    flat[f"{name}.dense"].view(-1)[0] = float("nan")
    return _pack(flat, meta)


def _dense_shape_vs_metadata(data: bytes) -> bytes:
    """A dense tensor whose stored shape differs from the shape its metadata declares."""
    flat, meta = _parts(data)
    name = _first(meta, "dense", ndim=1)
    flat[f"{name}.dense"] = torch.zeros(flat[f"{name}.dense"].numel() + 3)
    return _pack(flat, meta)


def _dense_shape_vs_base(data: bytes) -> bytes:
    """Self-consistent file (data and metadata agree) whose tensor does not fit the base's shape."""
    flat, meta = _parts(data)
    name = _first(meta, "dense", ndim=1)
    n = flat[f"{name}.dense"].numel() + 5
    flat[f"{name}.dense"] = torch.zeros(n)
    meta["tensors"][name]["shape"] = [n]
    return _pack(flat, meta)


def _signs_short(data: bytes) -> bytes:
    """Packed signs with fewer bytes than the declared shape needs."""
    flat, meta = _parts(data)
    name = _first(meta, "sign1")
    flat[f"{name}.signs"] = flat[f"{name}.signs"][:-3].clone()
    return _pack(flat, meta)


def _metadata_absurd_shape(data: bytes) -> bytes:
    """Metadata declares a 2^31 x 2^31 weight backed by a few bytes (must not allocate)."""
    flat, meta = _parts(data)
    name = _first(meta, "sign1")
    meta["tensors"][name]["shape"] = [2**31, 2**31]
    return _pack(flat, meta)


def _safetensors_absurd_shape(data: bytes) -> bytes:
    """A safetensors header declaring a (2^40, 2^40) float tensor in 16 bytes."""
    _, meta = _parts(data)
    header = {"x.dense": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]},
              "__metadata__": {"bitdelta": json.dumps(meta)}}
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * 16


def _header_len_absurd(data: bytes) -> bytes:
    return struct.pack("<Q", 2**62) + b'{"a": 1}'


def _header_not_json(data: bytes) -> bytes:
    body = b"{not json at all}"
    return struct.pack("<Q", len(body)) + body


def _no_bitdelta_metadata(data: bytes) -> bytes:
    flat, _ = _parts(data)
    return _pack(flat, None)


def _future_version(data: bytes) -> bytes:
    flat, meta = _parts(data)
    meta["format_version"] = 999
    return _pack(flat, meta)


def _unexpected_tensor(data: bytes) -> bytes:
    flat, meta = _parts(data)
    flat["smuggled.payload"] = torch.zeros(4)
    return _pack(flat, meta)


def _missing_tensor(data: bytes) -> bytes:
    flat, meta = _parts(data)
    name = _first(meta, "sign1")
    del flat[f"{name}.scale"]
    return _pack(flat, meta)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _random(data: bytes) -> bytes:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (len(data),), generator=g, dtype=torch.uint8).numpy().tobytes()


def _pickle_like(data: bytes) -> bytes:
    """The first bytes of a torch.save/pickle file: must be refused, never unpickled."""
    return b"\x80\x04\x95" + b"\x00" * 64 + b"cos\nsystem\n(S'echo pwned'\ntR."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_bad_input")
    base = save_base(root / "base")
    good = compress(base, finetune(base, root / "ft_good", ["neg", "pos"], seed=31), progress=False).to_bytes()
    other = save_base(root / "other_base", seed=77)
    other_art = compress(other, finetune(other, root / "ft_other", ["neg", "pos"], seed=32), progress=False).to_bytes()
    store = root / "store"
    cfg = ServeConfig(base=str(base), store=str(store), admin_token=ADMIN, port=free_port(), max_inputs=MAX_INPUTS,
                      max_text_chars=MAX_TEXT_CHARS, max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD,
                      max_wait_ms=2, replica_num_cpus=0.5)
    url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    try:
        with client(url) as c:
            r = c.post("/v1/models", data={"name": GOOD}, files={"file": ("good.safetensors", good)}, headers=AUTH)
            assert r.status_code == 201, r.text
            yield {"c": c, "root": root, "store": store, "good": good, "other": other_art}
    finally:
        run.stop()


def _snapshot(env) -> dict:
    """Everything that must not change: store files + checksums, the model list, the store's neighbours."""
    store: Path = env["store"]
    audit = store / "access" / "audit.jsonl"  # grows by one line per refused admin action, by design
    files = {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(store.rglob("*")) if p.is_file() and p != audit}
    audit_ok = sum(json.loads(line)["result"] == "ok" for line in audit.read_text().splitlines()) \
        if audit.exists() else 0
    return {"files": files, "audit_ok": audit_ok, "models": env["c"].get("/v1/models").json(),
            "neighbours": sorted(p.name for p in env["root"].iterdir()),
            "outside": sorted(p.name for p in env["root"].parent.iterdir())}


def _check_error(r, status: int, kind: str | None, needles: tuple[str, ...]) -> None:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    err = body["error"]
    assert isinstance(err["type"], str) and isinstance(err["message"], str) and err["message"].strip()
    if kind is not None:
        assert err["type"] == kind, err
    for n in needles:
        assert n.lower() in err["message"].lower(), f"message does not mention {n!r}: {err['message']!r}"


def _check_unchanged(env, before: dict) -> None:
    h = env["c"].get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    after = _snapshot(env)
    assert after == before
    ok = env["c"].post("/v1/classify", json={"model": GOOD, "inputs": ["w1 w2"]})
    assert ok.status_code == 200, ok.text


# =============================================================================================
# API cases: (id, method, path, request kwargs, status, type, needles)
# =============================================================================================
def _nested(depth: int) -> bytes:
    return b'{"model": "good", "inputs": ' + b"[" * depth + b"]" * depth + b"}"


API_CASES = [
    # malformed JSON / wrong content type
    ("json_truncated", "post", "/v1/classify", dict(content=b'{"model": "good", "inputs": [', headers=JSON_CT),
     422, "invalid_request", ("json",)),
    ("json_invalid_utf8", "post", "/v1/classify", dict(content=b'{"model": "g\xff\xfe", "inputs": ["w1"]}',
                                                        headers=JSON_CT), 422, "invalid_request", ("json",)),
    ("json_trailing_garbage", "post", "/v1/classify", dict(content=b'{"model": "good", "inputs": ["w1"]} xx',
                                                            headers=JSON_CT), 422, "invalid_request", ("json",)),
    ("json_deeply_nested", "post", "/v1/classify", dict(content=_nested(5000), headers=JSON_CT),
     422, "invalid_request", ("json",)),
    ("json_top_level_array", "post", "/v1/classify", dict(json=["good", ["w1"]]), 422, "invalid_request", ()),
    ("json_top_level_null", "post", "/v1/classify", dict(content=b"null", headers=JSON_CT), 422, "invalid_request", ()),
    ("empty_body", "post", "/v1/classify", dict(content=b"", headers=JSON_CT), 422, "invalid_request", ()),
    ("content_type_text_plain", "post", "/v1/classify",
     dict(content=b'{"model": "good", "inputs": ["w1"]}', headers={"content-type": "text/plain"}),
     422, "invalid_request", ()),
    ("content_type_form", "post", "/v1/classify", dict(data={"model": "good", "inputs": "w1"}),
     422, "invalid_request", ()),
    # wrong types / missing / extra fields
    ("model_is_int", "post", "/v1/classify", dict(json={"model": 5, "inputs": ["w1"]}), 422, "invalid_request", ("model",)),
    ("model_is_list", "post", "/v1/classify", dict(json={"model": ["good"], "inputs": ["w1"]}),
     422, "invalid_request", ("model",)),
    ("inputs_is_string", "post", "/v1/classify", dict(json={"model": "good", "inputs": "w1 w2"}),
     422, "invalid_request", ("inputs",)),
    ("inputs_numbers", "post", "/v1/classify", dict(json={"model": "good", "inputs": [1, 2.5]}),
     422, "invalid_request", ("inputs",)),
    ("inputs_null_item", "post", "/v1/classify", dict(json={"model": "good", "inputs": ["w1", None]}),
     422, "invalid_request", ("inputs",)),
    ("inputs_object_item", "post", "/v1/classify", dict(json={"model": "good", "inputs": [{"text": "w1"}]}),
     422, "invalid_request", ("inputs",)),
    ("pair_of_three", "post", "/v1/classify", dict(json={"model": "good", "inputs": [["w1", "w2", "w3"]]}),
     422, "invalid_request", ("inputs",)),
    ("pair_of_one", "post", "/v1/classify", dict(json={"model": "good", "inputs": [["w1"]]}),
     422, "invalid_request", ("inputs",)),
    ("truncate_is_string", "post", "/v1/classify", dict(json={"model": "good", "inputs": ["w1"], "truncate": "false"}),
     422, "invalid_request", ("truncate",)),
    ("return_all_scores_is_int", "post", "/v1/classify",
     dict(json={"model": "good", "inputs": ["w1"], "return_all_scores": 1}), 422, "invalid_request", ("return_all_scores",)),
    ("missing_model", "post", "/v1/classify", dict(json={"inputs": ["w1"]}), 422, "invalid_request", ("model",)),
    ("missing_inputs", "post", "/v1/classify", dict(json={"model": "good"}), 422, "invalid_request", ("inputs",)),
    ("extra_field", "post", "/v1/classify", dict(json={"model": "good", "inputs": ["w1"], "temperature": 0.7}),
     422, "invalid_request", ("temperature",)),
    ("lone_surrogate_text", "post", "/v1/classify",
     dict(content=b'{"model": "good", "inputs": ["w1 \\ud800 w2"]}', headers=JSON_CT), 422, "invalid_request", ("input 0", "unicode")),
    # empty and oversized
    ("empty_inputs", "post", "/v1/classify", dict(json={"model": "good", "inputs": []}), 422, "invalid_request", ("inputs",)),
    ("too_many_inputs", "post", "/v1/classify", dict(json={"model": "good", "inputs": ["w1"] * (MAX_INPUTS + 1)}),
     413, "too_many_inputs", (str(MAX_INPUTS + 1), str(MAX_INPUTS))),
    ("text_over_char_limit", "post", "/v1/classify", dict(json={"model": "good", "inputs": ["w" * (MAX_TEXT_CHARS + 1)]}),
     413, "text_too_long", (str(MAX_TEXT_CHARS),)),
    ("pair_over_char_limit", "post", "/v1/classify",
     dict(json={"model": "good", "inputs": [["w" * 1500, "w" * 1500]]}), 413, "text_too_long", (str(MAX_TEXT_CHARS),)),
    ("too_long_truncate_false", "post", "/v1/classify",
     dict(json={"model": "good", "inputs": ["w1", " ".join(["w5"] * 60)], "truncate": False}),
     413, "input_too_long", ("input 1", "truncate")),
    ("body_over_limit", "post", "/v1/classify", dict(json={"model": "good", "inputs": ["w1 " * (MAX_BODY // 3)]}),
     413, "payload_too_large", (str(MAX_BODY),)),
    ("body_over_limit_chunked", "post", "/v1/classify",
     dict(content=iter([b'{"model": "good", "inputs": ["'] + [b"w1 " * 2048] * 4 + [b'"]}']), headers=JSON_CT),
     413, "payload_too_large", (str(MAX_BODY),)),
    # invalid / tricky model names on read paths: 404 naming the model, never a file lookup
    ("unknown_model", "post", "/v1/classify", dict(json={"model": "nope", "inputs": ["w1"]}),
     404, "unknown_model", ("nope",)),
    ("classify_traversal_name", "post", "/v1/classify", dict(json={"model": "../good", "inputs": ["w1"]}),
     404, "unknown_model", ("../good",)),
    ("classify_absolute_path", "post", "/v1/classify", dict(json={"model": "/etc/passwd", "inputs": ["w1"]}),
     404, "unknown_model", ("/etc/passwd",)),
    ("classify_homoglyph_name", "post", "/v1/classify", dict(json={"model": "g\u043e\u043ed", "inputs": ["w1"]}),
     404, "unknown_model", ("g\u043e\u043ed",)),
    ("classify_nul_name", "post", "/v1/classify", dict(json={"model": "good\u0000", "inputs": ["w1"]}),
     404, "unknown_model", ("not registered",)),
    ("get_dotdot_encoded", "get", "/v1/models/%2E%2E", {}, 404, None, ()),
    ("get_300_chars", "get", "/v1/models/" + "a" * 300, {}, 404, "unknown_model", ("not registered",)),
    ("get_fullwidth_dots", "get", "/v1/models/%EF%BC%8E%EF%BC%8E", {}, 404, "unknown_model", ("not registered",)),
    ("delete_traversal_encoded", "delete", "/v1/models/..%2Fstore", dict(headers=AUTH), 404, None, ()),
    ("delete_unknown", "delete", "/v1/models/nope", dict(headers=AUTH), 404, "unknown_model", ("nope",)),
    ("wrong_method", "put", "/v1/classify", dict(json={}), 405, "method_not_allowed", ("put",)),
]


@pytest.mark.parametrize("case,method,path,kwargs,status,kind,needles", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(env, case, method, path, kwargs, status, kind, needles):
    before = _snapshot(env)
    r = getattr(env["c"], method)(path, **kwargs) if method != "post" else env["c"].post(path, **kwargs)
    _check_error(r, status, kind, needles)
    _check_unchanged(env, before)


# =============================================================================================
# upload cases
# =============================================================================================
BAD_NAMES = [
    ("name_traversal", "../x"),
    ("name_dotdot", ".."),
    ("name_dot", "."),
    ("name_absolute", "/tmp/evil"),
    ("name_slash", "a/b"),
    ("name_backslash", "a\\b"),
    ("name_homoglyph", "g\u043e\u043ed2"),  # Cyrillic o
    ("name_rtl_override", "x\u202egpj.exe"),
    ("name_nul", "x\u0000y"),
    ("name_fullwidth_dots", "\uff0e\uff0e\uff0fx"),
    ("name_300_chars", "a" * 300),
    ("name_trailing_newline", "abc\n"),
    ("name_leading_dash", "-rf"),
    ("name_space", "a b"),
    ("name_empty", ""),
]


@pytest.mark.parametrize("case,name", BAD_NAMES, ids=[c[0] for c in BAD_NAMES])
def test_upload_invalid_name(env, case, name):
    before = _snapshot(env)
    r = env["c"].post("/v1/models", data={"name": name}, files={"file": ("d.safetensors", env["good"])}, headers=AUTH)
    _check_error(r, 422, "invalid_name", ("invalid model name",))
    _check_unchanged(env, before)


UPLOAD_CASES = [
    ("truncated", _truncated, 400, "artifact_corrupt", ("truncated",)),
    ("random_bytes", _random, 400, "artifact_corrupt", ("safetensors",)),
    ("pickle_payload", _pickle_like, 400, "artifact_corrupt", ("safetensors",)),
    ("empty_file", lambda d: b"", 400, "artifact_corrupt", ("empty",)),
    ("seven_bytes", lambda d: b"\x01" * 7, 400, "artifact_corrupt", ("too short",)),
    ("header_len_absurd", _header_len_absurd, 400, "artifact_corrupt", ("header",)),
    ("header_not_json", _header_not_json, 400, "artifact_corrupt", ("json",)),
    ("safetensors_absurd_shape", _safetensors_absurd_shape, 400, "artifact_corrupt", ("safetensors",)),
    ("metadata_absurd_shape", _metadata_absurd_shape, 400, "invalid_artifact", ("signs",)),
    ("no_bitdelta_metadata", _no_bitdelta_metadata, 400, "artifact_corrupt", ("bitdelta",)),
    ("future_format_version", _future_version, 400, "artifact_version", ("999",)),
    ("unexpected_tensor", _unexpected_tensor, 400, "invalid_artifact", ("smuggled.payload",)),
    ("missing_tensor", _missing_tensor, 400, "invalid_artifact", ("missing",)),
    ("other_base", None, 400, "base_mismatch", ("base", "fingerprint")),
    ("nan_scale", _nan_scale, 400, "invalid_artifact", ("nan",)),
    ("inf_scale", _inf_scale, 400, "invalid_artifact", ("inf",)),
    ("nan_dense", _nan_dense, 400, "invalid_artifact", ("nan",)),
    ("signs_too_short", _signs_short, 400, "invalid_artifact", ("signs",)),
    ("shape_vs_metadata", _dense_shape_vs_metadata, 400, "invalid_artifact", ("shape",)),
    ("shape_vs_base", _dense_shape_vs_base, 400, "base_mismatch", ("shape",)),
    ("over_upload_limit", lambda d: d + b"\0" * MAX_UPLOAD, 413, "payload_too_large", (str(MAX_UPLOAD),)),
]


@pytest.mark.parametrize("case,make,status,kind,needles", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_upload_bad_artifact(env, case, make, status, kind, needles):
    data = env["other"] if make is None else make(env["good"])
    before = _snapshot(env)
    r = env["c"].post("/v1/models", data={"name": "victim"}, files={"file": ("d.safetensors", data)}, headers=AUTH)
    _check_error(r, status, kind, needles)
    _check_unchanged(env, before)
    # the same bytes as a *replacement* of the served model must leave it served as before
    before = _snapshot(env)
    r = env["c"].post("/v1/models", data={"name": GOOD, "replace": "true"}, files={"file": ("d.safetensors", data)},
                      headers=AUTH)
    _check_error(r, status, kind, needles)
    _check_unchanged(env, before)


UPLOAD_FORM_CASES = [
    ("upload_json_body", dict(json={"name": "x", "file": "AAAA"}), 422, ("multipart",)),
    ("upload_missing_file", dict(data={"name": "x"}), 422, ("file",)),
    ("upload_missing_name", dict(files={"file": ("d.safetensors", b"123")}), 422, ("name",)),
    ("upload_name_as_file", dict(files={"name": ("n.txt", b"x")}), 422, ("name",)),
    ("upload_file_as_text", dict(data={"name": "x", "file": "not a file"}), 422, ("file",)),
    ("upload_extra_field", dict(data={"name": "x", "owner": "me"}, files={"file": ("d.safetensors", b"123")}),
     422, ("owner",)),
    ("upload_two_files", dict(data={"name": "x"}, files=[("file", ("a", b"1")), ("file", ("b", b"2"))]), 422, ()),
    ("upload_broken_multipart", dict(content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xx"}),
     422, ("name",)),
    ("upload_replace_not_bool", dict(data={"name": "x", "replace": "perhaps"}, files={"file": ("d", b"123")}),
     422, ("replace",)),
]


@pytest.mark.parametrize("case,kwargs,status,needles", UPLOAD_FORM_CASES, ids=[c[0] for c in UPLOAD_FORM_CASES])
def test_upload_malformed_form(env, case, kwargs, status, needles):
    before = _snapshot(env)
    kwargs = dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = env["c"].post("/v1/models", headers=headers, **kwargs)
    _check_error(r, status, "invalid_request", needles)
    _check_unchanged(env, before)


def test_suite_covers_thirty_distinct_inputs():
    ids = [c[0] for c in API_CASES] + [c[0] for c in BAD_NAMES] + [c[0] for c in UPLOAD_CASES] + \
          [c[0] for c in UPLOAD_FORM_CASES] + [c[0] for c in RAW_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30, len(ids)


def test_good_model_still_answers_like_before(env):
    """After the whole table the registered model is the same one (same bytes, same answers)."""
    c = env["c"]
    info = c.get(f"/v1/models/{GOOD}").json()
    assert info["labels"] == ["neg", "pos"]
    entry = json.loads((env["store"] / "models" / f"{GOOD}.json").read_text())
    assert entry["sha256"] == hashlib.sha256(env["good"]).hexdigest()
    r = c.post("/v1/classify", json={"model": GOOD, "inputs": ["w1 w2", ["w3", "w4"]], "return_all_scores": True})
    assert r.status_code == 200
    for p in r.json()["predictions"]:
        assert p["label"] in ("neg", "pos") and math.isclose(sum(p["scores"].values()), 1.0, abs_tol=1e-5)


# =============================================================================================
# broken HTTP framing (httpx refuses to send these): raw sockets
# =============================================================================================
def _raw(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head + body)
        chunks = []
        for _ in range(1000):  # bounded read until the server closes or the answer is complete
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
            data = b"".join(chunks)
            if b"\r\n\r\n" in data:
                hdr, _, rest = data.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length: *(\d+)", hdr)
                if m and len(rest) >= int(m.group(1)):
                    break
    data = b"".join(chunks)
    hdr, _, rest = data.partition(b"\r\n\r\n")
    lines = hdr.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


RAW_CASES = [
    ("content_length_negative", b"Content-Length: -5\r\n", b'{"model": "good", "inputs": ["w1"]}'),
    ("content_length_not_a_number", b"Content-Length: lots\r\n", b'{"model": "good", "inputs": ["w1"]}'),
    ("content_length_twice_differs", b"Content-Length: 5\r\nContent-Length: 9\r\n", b'{"model"}'),
]


@pytest.mark.parametrize("case,extra,body", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_broken_framing(env, case, extra, body):
    """Rejected with 400 (by the HTTP server before the app, so the body may be plain text)."""
    before = _snapshot(env)
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + extra +
            b"Connection: close\r\n\r\n")
    status, headers, rest = _raw(str(env["c"].base_url).rstrip("/"), head, body)
    assert status == 400, (status, rest[:300])
    if headers.get("content-type", "").startswith("application/json"):
        assert json.loads(rest)["error"]["message"]
    _check_unchanged(env, before)
