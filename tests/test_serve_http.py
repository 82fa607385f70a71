"""End-to-end over real HTTP on 127.0.0.1 against a local Ray Serve (one Ray session for the module).

Tiny BERT base built from a config, real short fine-tunes compressed with ``compress()``; the
service's answers are compared with the offline ``apply()`` model of each fine-tune.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import re

import pytest
import torch

from bitdelta_core.apply import apply
from bitdelta_core.compress import compress
from serve import run
from serve.config import ServeConfig
from serve_helpers import (ADMIN, AUTH, client, finetune, free_port, metric, reference_predictions, save_base, texts,
                           tiny_tokenizer)

pytestmark = pytest.mark.slow

MAX_INPUTS = 8
MAX_BODY = 16 * 1024
MAX_UPLOAD = 512 * 1024
LABELS = {"two": ["neg", "pos"], "three": ["a", "b", "c"], "reg": None}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_http")
    base = save_base(root / "base")
    files, arts = {}, {}
    for i, (name, labels) in enumerate(LABELS.items()):
        ft = finetune(base, root / f"ft_{name}", labels, seed=10 + i)
        arts[name] = compress(base, ft, progress=False)
        files[name] = root / f"{name}.safetensors"
        arts[name].save(files[name])
    other = save_base(root / "other_base", seed=99)
    other_art = compress(other, finetune(other, root / "ft_other", ["x", "y"], seed=5), progress=False)
    files["other_base"] = root / "other.safetensors"
    other_art.save(files["other_base"])
    nan_art = compress(base, root / "ft_two", progress=False)
    name = next(n for n, e in nan_art.tensors.items() if e.sign is not None)
    nan_art.tensors[name].sign.scale[0] = float("nan")
    files["nan"] = root / "nan.safetensors"
    nan_art.save(files["nan"])

    store = root / "store"
    cfg = ServeConfig(base=str(base), store=str(store), admin_token=ADMIN, port=free_port(), max_inputs=MAX_INPUTS,
                      max_text_chars=2000, max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD, max_wait_ms=30,
                      max_batch_size=64, replica_num_cpus=0.5)
    url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    refs = {n: apply(str(base), arts[n]) for n in LABELS}
    with client(url) as c:
        yield {"url": url, "c": c, "files": files, "store": store, "refs": refs, "tok": tiny_tokenizer(),
               "base": base}
    run.stop()


def _register(c, name, path_or_bytes, *, token=ADMIN, replace=None, filename="delta.safetensors"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    form = {"name": name}
    if replace is not None:
        form["replace"] = "true" if replace else "false"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return c.post("/v1/models", data=form, files={"file": (filename, data, "application/octet-stream")},
                  headers=headers)


def _store_files(store):
    return sorted(str(p.relative_to(store)) + f":{p.stat().st_size}" for p in store.rglob("*")
                  if p.is_file() and p.parent.name in ("models", "objects"))


def _expected(env, name, inputs):
    id2label = dict(enumerate(LABELS[name])) if LABELS[name] else None
    return reference_predictions(env["refs"][name], env["tok"], inputs, id2label)


def _assert_same(got, want, all_scores=False):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["label"] == w["label"]
        assert math.isclose(g["score"], w["score"], rel_tol=1e-4, abs_tol=1e-4), (g, w)
        if all_scores and w.get("scores") is not None:
            assert g["scores"].keys() == w["scores"].keys()
            for k in w["scores"]:
                assert math.isclose(g["scores"][k], w["scores"][k], abs_tol=1e-4)
        elif not all_scores:
            assert g["scores"] is None


@pytest.fixture(scope="module")
def registered(env):
    c = env["c"]
    for name in LABELS:
        r = _register(c, name, env["files"][name])
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == name and body["bytes"] > 0
        assert body["labels"] == LABELS[name] and body["num_labels"] == (len(LABELS[name]) if LABELS[name] else 1)
    return env


# ---------------------------------------------------------------------------------------------
# happy paths
# ---------------------------------------------------------------------------------------------
def test_health_docs_openapi(env):
    c = env["c"]
    assert c.get("/healthz").json()["status"] == "ok"
    spec = c.get("/openapi.json").json()
    for path in ("/v1/classify", "/v1/models", "/v1/models/{name}", "/healthz", "/metrics"):
        assert path in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    docs = c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("name", list(LABELS))
def test_predictions_equal_offline_apply(registered, name):
    inputs = texts(5, seed=3) + [["w1 w2 w3", "w4 w5"]]
    for all_scores in (False, True):
        r = registered["c"].post("/v1/classify", json={"model": name, "inputs": inputs, "return_all_scores": all_scores})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name and r.headers.get("x-bitdelta-replica")
        _assert_same(body["predictions"], _expected(registered, name, inputs), all_scores and LABELS[name] is not None)
    if LABELS[name] is None:
        assert all(p["label"] is None and p["scores"] is None for p in body["predictions"])


def test_concurrent_mixed_models_are_batched_and_correct(registered):
    c = registered["c"]
    jobs = [(list(LABELS)[i % 3], texts(1 + i % 3, seed=100 + i)) for i in range(24)]

    def one(job):
        name, inputs = job
        return name, inputs, c.post("/v1/classify", json={"model": name, "inputs": inputs})

    before = metric(c, "bitdelta_batch_requests_count")
    with cf.ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, jobs))
    for name, inputs, r in results:
        assert r.status_code == 200, r.text
        _assert_same(r.json()["predictions"], _expected(registered, name, inputs))
    batches = metric(c, "bitdelta_batch_requests_count") - before
    assert 1 <= batches < len(jobs), f"{len(jobs)} concurrent requests ran in {batches} forwards"
    mixed = metric(c, "bitdelta_batch_models_count") - metric(c, 'bitdelta_batch_models_bucket', le="1")
    assert mixed >= 1, "no forward mixed two fine-tunes"


def test_list_and_get_models(registered):
    c = registered["c"]
    listing = c.get("/v1/models").json()
    assert listing["serving_path"] == "mixed"  # BERT: every fine-tune of a batch in one forward
    models = listing["models"]
    assert [m["name"] for m in models] == sorted(LABELS)
    for m in models:
        assert set(m) == {"name", "base", "num_labels", "labels", "bytes", "created"}
        assert c.get(f"/v1/models/{m['name']}").json() == m


def test_metrics_prometheus_text(registered):
    c = registered["c"]
    c.post("/v1/classify", json={"model": "two", "inputs": ["w1"]})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    # every replica's own series, labelled with its id (each replica is its own HTTP ingress)
    assert re.search(r'bitdelta_requests_total\{code="200",model="two",replica="[^"]+"\} \d+', text)
    assert re.search(r'bitdelta_request_latency_seconds_count\{model="two",replica="[^"]+"\} \d+', text)
    assert re.search(r'bitdelta_registrations_total\{replica="[^"]+",result="ok"\} [1-9]', text)
    assert metric(c, "bitdelta_pool_bytes") > 0 and metric(c, "bitdelta_base_bytes") > 0
    assert metric(c, "bitdelta_batch_size_count") >= 1 and metric(c, "bitdelta_replica_rss_bytes") > 0
    assert "bitdelta_cache_bytes" in text and "# TYPE bitdelta_batch_size histogram" in text
    # the replicas run the compiled CPU kernel wherever it builds (it does on the CI machines)
    from bitdelta_core import cpu_kernel

    assert (metric(c, "bitdelta_cpu_kernel") > 0) == (cpu_kernel.load() is not None)


def test_register_conflict_replace_and_delete(registered):
    c, files, store = registered["c"], registered["files"], registered["store"]
    assert _register(c, "tmp1", files["two"]).status_code == 201
    r = _register(c, "tmp1", files["three"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "model_exists" and "tmp1" in r.json()["error"]["message"]
    r = _register(c, "tmp1", files["three"], replace=True)
    assert r.status_code == 201 and r.json()["labels"] == LABELS["three"]
    got = c.post("/v1/classify", json={"model": "tmp1", "inputs": ["w3 w4"]}).json()["predictions"]
    _assert_same(got, _expected(registered, "three", ["w3 w4"]))
    r = c.delete("/v1/models/tmp1", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert not (store / "models" / "tmp1.json").exists()
    r = c.post("/v1/classify", json={"model": "tmp1", "inputs": ["w1"]})
    assert r.status_code == 404 and "tmp1" in r.json()["error"]["message"]
    assert c.get("/v1/models/tmp1").status_code == 404


# ---------------------------------------------------------------------------------------------
# bad input: documented status + JSON error; server healthy, models and store unchanged
# ---------------------------------------------------------------------------------------------
def _long_text(words):
    return " ".join(f"w{i % 100}" for i in range(words))


CLASSIFY_CASES = [
    ("malformed_json", dict(content=b'{"model": "two", "inputs": [', headers={"content-type": "application/json"}), 422, "invalid_request"),
    ("not_json_at_all", dict(content=b"\xff\xfe garbage", headers={"content-type": "application/json"}), 422, "invalid_request"),
    ("json_array_body", dict(json=["two", ["w1"]]), 422, "invalid_request"),
    ("model_wrong_type", dict(json={"model": 5, "inputs": ["w1"]}), 422, "invalid_request"),
    ("inputs_is_string", dict(json={"model": "two", "inputs": "w1 w2"}), 422, "invalid_request"),
    ("inputs_numbers", dict(json={"model": "two", "inputs": [1, 2]}), 422, "invalid_request"),
    ("pair_of_three", dict(json={"model": "two", "inputs": [["a", "b", "c"]]}), 422, "invalid_request"),
    ("truncate_not_bool", dict(json={"model": "two", "inputs": ["w1"], "truncate": "yes"}), 422, "invalid_request"),
    ("missing_inputs", dict(json={"model": "two"}), 422, "invalid_request"),
    ("extra_field", dict(json={"model": "two", "inputs": ["w1"], "temperature": 1}), 422, "invalid_request"),
    ("empty_inputs", dict(json={"model": "two", "inputs": []}), 422, "invalid_request"),
    ("null_input", dict(json={"model": "two", "inputs": [None]}), 422, "invalid_request"),
    ("too_many_inputs", dict(json={"model": "two", "inputs": ["w1"] * (MAX_INPUTS + 1)}), 413, "too_many_inputs"),
    ("text_over_char_limit", dict(json={"model": "two", "inputs": ["w" * 2001]}), 413, "text_too_long"),
    ("too_long_no_truncate", dict(json={"model": "two", "inputs": ["w1", _long_text(40)], "truncate": False}), 413, "input_too_long"),
    ("oversized_body", dict(json={"model": "two", "inputs": ["w1 " * (MAX_BODY // 3)]}), 413, "payload_too_large"),
    ("oversized_chunked_body", dict(content=iter([b'{"model": "two", "inputs": ["'] + [b"w1 " * 1024] * 8 + [b'"]}']),
                                    headers={"content-type": "application/json"}), 413, "payload_too_large"),
    ("unknown_model", dict(json={"model": "nope", "inputs": ["w1"]}), 404, "unknown_model"),
    ("traversal_model_name", dict(json={"model": "../two", "inputs": ["w1"]}), 404, "unknown_model"),
    ("wrong_content_type", dict(content=b'{"model": "two", "inputs": ["w1"]}', headers={"content-type": "text/plain"}), 422, "invalid_request"),
]


@pytest.mark.parametrize("case,kwargs,status,kind", CLASSIFY_CASES, ids=[c[0] for c in CLASSIFY_CASES])
def test_classify_bad_input(registered, case, kwargs, status, kind):
    c, store = registered["c"], registered["store"]
    before_store, before_models = _store_files(store), c.get("/v1/models").json()
    r = c.post("/v1/classify", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["message"]
    if case == "unknown_model":
        assert "nope" in err["message"]
    _assert_healthy_and_unchanged(c, store, before_store, before_models)


def test_long_input_is_truncated_by_default(registered):
    r = registered["c"].post("/v1/classify", json={"model": "two", "inputs": [_long_text(40)]})
    assert r.status_code == 200
    _assert_same(r.json()["predictions"], _expected(registered, "two", [_long_text(40)]))


def _assert_healthy_and_unchanged(c, store, before_store, before_models):
    assert c.get("/healthz").status_code == 200
    assert c.get("/v1/models").json() == before_models
    assert _store_files(store) == before_store


def _truncated(files):
    data = files["two"].read_bytes()
    return data[: len(data) // 2]


def _random_bytes(files):
    return torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()


def _header_absurd(files):
    return (10**15).to_bytes(8, "little") + b'{"a": 1}'


UPLOAD_CASES = [
    ("no_token", dict(name="x1", src="two", token=None), 401, "unauthorized"),
    ("wrong_token", dict(name="x1", src="two", token="not-the-admin-token"), 401, "unauthorized"),
    ("traversal_name", dict(name="../x", src="two"), 422, "invalid_name"),
    ("name_300_chars", dict(name="a" * 300, src="two"), 422, "invalid_name"),
    ("unicode_name", dict(name="caf\u00e9", src="two"), 422, "invalid_name"),
    ("dot_name", dict(name=".hidden", src="two"), 422, "invalid_name"),
    ("truncated_upload", dict(name="x1", src=_truncated), 400, "artifact_corrupt"),
    ("random_bytes", dict(name="x1", src=_random_bytes), 400, "artifact_corrupt"),
    ("absurd_header", dict(name="x1", src=_header_absurd), 400, "artifact_corrupt"),
    ("empty_file", dict(name="x1", src=lambda f: b""), 400, "artifact_corrupt"),
    ("other_base", dict(name="x1", src="other_base"), 400, "base_mismatch"),
    ("nan_scales", dict(name="x1", src="nan"), 400, "invalid_artifact"),
    ("over_upload_limit", dict(name="x1", src=lambda f: b"\0" * (MAX_UPLOAD + 1)), 413, "payload_too_large"),
    ("existing_name", dict(name="two", src="three"), 409, "model_exists"),
    ("replace_not_bool", dict(name="x1", src="two", replace="maybe"), 422, "invalid_request"),
]


@pytest.mark.parametrize("case,kw,status,kind", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_upload_bad_input(registered, case, kw, status, kind):
    c, store, files = registered["c"], registered["store"], registered["files"]
    before_store, before_models = _store_files(store), c.get("/v1/models").json()
    src = kw["src"]
    data = files[src].read_bytes() if isinstance(src, str) else src(files)
    form = {"name": kw["name"]}
    if "replace" in kw:
        form["replace"] = kw["replace"]
    token = kw.get("token", ADMIN)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = c.post("/v1/models", data=form, files={"file": ("f.safetensors", data)}, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["message"]
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"
    _assert_healthy_and_unchanged(c, store, before_store, before_models)


def test_upload_malformed_requests(registered):
    c, store = registered["c"], registered["store"]
    before_store, before_models = _store_files(store), c.get("/v1/models").json()
    cases = [
        c.post("/v1/models", json={"name": "x", "file": "AAAA"}, headers=AUTH),  # not multipart
        c.post("/v1/models", data={"name": "x2"}, files={"other": ("f", b"123")}, headers=AUTH),  # no 'file'
        c.post("/v1/models", files={"file": ("f", b"123")}, headers=AUTH),  # no 'name'
        c.post("/v1/models", content=b"--xx\r\nbroken", headers={**AUTH, "content-type": "multipart/form-data; boundary=xx"}),
    ]
    for r in cases:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "invalid_request"
    _assert_healthy_and_unchanged(c, store, before_store, before_models)


def test_delete_errors(registered):
    c, store = registered["c"], registered["store"]
    before_store, before_models = _store_files(store), c.get("/v1/models").json()
    assert c.delete("/v1/models/two").status_code == 401
    assert c.delete("/v1/models/two", headers={"Authorization": "Bearer wrong-token-123"}).status_code == 401
    assert c.delete("/v1/models/two", headers={"Authorization": f"Basic {ADMIN}"}).status_code == 401
    r = c.delete("/v1/models/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_model"
    r = c.delete("/v1/models/..%2Ftwo", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] in ("unknown_model", "not_found")
    _assert_healthy_and_unchanged(c, store, before_store, before_models)


def test_unknown_routes_and_methods_are_json(env):
    c = env["c"]
    r = c.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = c.put("/v1/classify", json={})
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = c.get("/v1/models/" + "a" * 300)
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_model"


def test_admin_disabled_without_token(tmp_path):
    """Config-level: no admin token means admin endpoints can never succeed."""
    cfg = ServeConfig.load({"base": "x", "admin_token": ""}, env={})
    assert cfg.admin_token is None
    with pytest.raises(ValueError, match="at least 8"):
        ServeConfig(base="x", admin_token="short")
    assert ServeConfig(base="x").host == "127.0.0.1"
    loaded = ServeConfig.load({"base": "x"}, env={"BITDELTA_ADMIN_TOKEN": "from-env-123", "BITDELTA_MAX_INPUTS": "5"})
    assert loaded.admin_token.get_secret_value() == "from-env-123" and loaded.max_inputs == 5
    assert "from-env-123" not in repr(loaded)


def test_cli_register_and_models(registered, capsys, monkeypatch):
    from serve.cli import main

    url, c = registered["url"], registered["c"]
    monkeypatch.delenv("BITDELTA_ADMIN_TOKEN", raising=False)
    assert main(["register", "--url", url, "--name", "cli1", str(registered["files"]["two"])]) == 1
    assert "401" in capsys.readouterr().err
    assert main(["register", "--url", url, "--name", "cli1", "--token", ADMIN, str(registered["files"]["two"])]) == 0
    assert "registered cli1" in capsys.readouterr().out
    monkeypatch.setenv("BITDELTA_ADMIN_TOKEN", ADMIN)
    assert main(["register", "--url", url, "--name", "cli1", str(registered["files"]["three"])]) == 1
    assert "409" in capsys.readouterr().err
    assert main(["register", "--url", url, "--name", "cli1", "--replace", str(registered["files"]["three"])]) == 0
    capsys.readouterr()
    assert main(["models", "--url", url, "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert "cli1" in names and "two" in names
    assert main(["models", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "cli1" in out and "a,b,c" in out
    assert c.delete("/v1/models/cli1", headers=AUTH).status_code == 204
