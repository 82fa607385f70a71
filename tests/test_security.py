"""Security review as tests.

Static (source inspection with ``ast``, no service):
* no project ``.py`` file deserialises with pickle: ``torch.load``, ``pickle.load(s)``,
  ``Unpickler``, ``joblib``/``dill``/``cloudpickle``/``marshal``/``shelve``, ``numpy.load(
  allow_pickle=True)``, ``yaml.load`` without a safe loader, ``trust_remote_code=True``; the
  scanner is itself tested on snippets so it cannot silently pass;
* the bearer token is compared with ``hmac.compare_digest``/``secrets.compare_digest`` and never
  with ``==``; every mutating route checks the admin token;
* names: ``check_name`` refuses traversal/unicode tricks and no accepted name leaves the store.

Live (one local service with an admin and a classify token): missing/wrong/malformed tokens are
401, the right one works; body and upload limits are 413; a traversal name creates nothing; the
service listens on 127.0.0.1 only (the config default and the actual socket in /proc/net/tcp).
"""

from __future__ import annotations

import ast
import errno
import os
import random
import socket
from pathlib import Path

import httpx
import pytest

from bitdelta_core.compress import compress
from bitdelta_core.errors import InvalidInputError
from serve import run
from serve.config import ServeConfig
from serve.store import ArtifactStore, check_name
from serve_helpers import ADMIN, finetune, free_port, save_base

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", "venv", ".git", ".cache", "build", "dist", "node_modules", "__pycache__", "results"}
CLASSIFY_TOKEN = "classify-token-for-tests"
MAX_BODY = 8 * 1024
MAX_UPLOAD = 128 * 1024


# =============================================================================================
# unsafe deserialisation scanner
# =============================================================================================
# fully qualified callables that unpickle (or execute) what they read
UNSAFE_CALLS = {
    "torch.load", "torch.serialization.load", "torch.jit.load", "torch.package.PackageImporter",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle", "yaml.unsafe_load",
    "yaml.full_load", "jsonpickle.decode", "numpy.lib.format.read_array",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _project_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def find_unsafe(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe deserialisation calls in ``source`` (import aliases resolved)."""
    tree = ast.parse(source, filename)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    alias.setdefault("np", "numpy")
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}"
        if name:
            head, _, rest = name.partition(".")
            full = alias.get(head, head) + (f".{rest}" if rest else "")
            full = full.replace("numpy.", "numpy.", 1)
            if full in UNSAFE_CALLS:
                found.append(f"{where}: {full}")
            elif full == "numpy.load" and isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                found.append(f"{where}: numpy.load(allow_pickle=True)")
            elif full == "yaml.load":
                loader = kw.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or (_dotted(loader) or "").split(".")[-1] not in SAFE_YAML_LOADERS:
                    found.append(f"{where}: yaml.load without a safe Loader")
        trc = kw.get("trust_remote_code")
        if isinstance(trc, ast.Constant) and trc.value is True:
            found.append(f"{where}: trust_remote_code=True")
    return found


@pytest.mark.parametrize("snippet", [
    "import torch\nx = torch.load('f.pt')",
    "import torch as t\nx = t.load('f.pt', weights_only=False)",
    "from torch import load\nx = load('f.pt')",
    "import pickle\nx = pickle.loads(b'')",
    "from pickle import Unpickler as U\nU(f).load()",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import yaml\nyaml.load(s)",
    "import joblib\njoblib.load('m.pkl')",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)",
], ids=["torch.load", "alias", "from-import", "pickle.loads", "Unpickler", "np.load", "yaml.load", "joblib",
        "trust_remote_code"])
def test_scanner_catches_unsafe_snippets(snippet):
    assert find_unsafe(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "from safetensors.torch import load_file\nload_file('a.safetensors')",
    "import json\njson.loads('{}')",
    "import numpy as np\nnp.load('a.npy')",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "x = {'torch.load': 1}  # a string, not a call",
], ids=["safetensors", "json", "np.load-default", "yaml-safe", "string"])
def test_scanner_accepts_safe_snippets(snippet):
    assert find_unsafe(snippet) == []


def test_no_unsafe_deserialisation_in_the_project():
    files = _project_files()
    assert len(files) >= 20 and any(p.name == "artifact.py" for p in files), files[:5]
    problems = []
    for p in files:
        problems += find_unsafe(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    assert problems == [], "unsafe deserialisation:\n" + "\n".join(problems)


def test_artifacts_are_read_with_safetensors_only():
    src = (ROOT / "bitdelta_core" / "artifact.py").read_text()
    assert "safetensors" in src and "from_bytes" in src
    tree = ast.parse(src)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}, imported


# =============================================================================================
# constant-time token comparison, admin checks on every mutating route
# =============================================================================================
def _serve_sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT / "serve")): ast.parse(p.read_text(), str(p))
            for p in sorted((ROOT / "serve").rglob("*.py"))}


COMPARE = {"hmac.compare_digest", "secrets.compare_digest", "compare_digest"}
# serve.access: the functions that decide on a presented token (each must compare in constant time)
ACCESS_CHECKERS = {"control.py": ["_is"], "keys.py": ["verify", "authenticate"]}
# what http.py may hand the Authorization header to instead of comparing it itself
ACCESS_CALLS = {"self.access.principal", "self.access.admin", "self.access.manager", "self.access.manager_precheck",
                "self.access.metrics_guard", "self.access.refusal", "access_http.create_key", "access_http.list_keys",
                "access_http.revoke_key", "access_http.read_audit",
                "refuse_early"}  # the middleware's early 429: Routes.refuse_early, which asks self.access.refusal


def _functions(tree) -> dict[str, ast.AST]:
    return {f.name: f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_bearer_token_compared_in_constant_time():
    sources = _serve_sources()
    tree = sources["http.py"]
    checkers = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                and "authorization" in ast.unparse(f).lower() and "headers" in ast.unparse(f)]
    assert checkers, "no function reads the Authorization header"
    for f in checkers:
        calls = {_dotted(n.func) for n in ast.walk(f) if isinstance(n, ast.Call)}
        assert calls & (COMPARE | ACCESS_CALLS), f"{f.name} neither compares in constant time nor asks serve.access"
    early = _functions(tree)["refuse_early"]  # what the middleware delegates to
    assert "self.access.refusal" in {_dotted(n.func) for n in ast.walk(early) if isinstance(n, ast.Call)}
    for fname, names in ACCESS_CHECKERS.items():
        funcs = _functions(sources[f"access/{fname}"])
        for name in names:
            calls = {_dotted(n.func) for n in ast.walk(funcs[name]) if isinstance(n, ast.Call)}
            assert calls & COMPARE, f"serve/access/{fname}:{name} does not use hmac/secrets.compare_digest"


def test_no_token_compared_with_equality():
    bad = []
    for fname, tree in _serve_sources().items():
        for n in ast.walk(tree):
            if isinstance(n, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in n.ops):
                operands = [n.left, *n.comparators]
                if any(isinstance(o, ast.Constant) for o in operands):
                    continue  # e.g. == "" / == None
                text = ast.unparse(n).lower()
                if any(w in text for w in ("token", "secret", "authorization", "password")):
                    bad.append(f"serve/{fname}:{n.lineno}: {ast.unparse(n)}")
    assert bad == [], bad


def test_every_mutating_route_checks_the_admin_token():
    tree = _serve_sources()["http.py"]
    api = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Routes")
    routes = 0
    for f in api.body:
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for d in f.decorator_list:
            if isinstance(d, ast.Call) and _dotted(d.func) in ("app.post", "app.put", "app.patch", "app.delete"):
                path = d.args[0].value if d.args and isinstance(d.args[0], ast.Constant) else "?"
                if path == "/v1/classify":
                    continue
                routes += 1
                src = ast.unparse(f)
                assert any(c in src for c in ("_check_bearer(request, self.cfg.admin_token", "self.access.admin(",
                                              "self.access.manager_precheck(", "access_http.create_key(self.access",
                                              "access_http.revoke_key(self.access")), \
                    f"{path} ({f.name}) skips the admin check"
    assert routes >= 4
    # the key endpoints' logic checks the admin token before anything else
    http = _functions(_serve_sources()["access/http.py"])
    for name in ("create_key", "list_keys", "revoke_key", "read_audit"):
        first = http[name].body[0]
        assert "access.admin(authorization)" in ast.unparse(first), f"serve/access/http.py:{name} skips the admin check"
    # manage keys and the metrics guard end in the admin check unless a key is presented
    control = _functions(_serve_sources()["access/control.py"])
    for name in ("manager", "metrics_guard"):
        assert "self.admin(authorization)" in ast.unparse(control[name]), name


# =============================================================================================
# names
# =============================================================================================
BAD_NAMES = ["../x", "..", ".", "/abs", "a/b", "a\\b", "x\x00y", "g\u043e\u043ed", "x\u202egpj.exe",
             "\uff0e\uff0e\uff0fx", "a" * 65, "a" * 300, "abc\n", "-x", "_x", " x", "", "caf\u00e9", "\u0661\u0662"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[ascii(n)[:24] for n in BAD_NAMES])
def test_check_name_refuses(name):
    with pytest.raises(InvalidInputError, match="invalid model name"):
        check_name(name)


def test_no_accepted_name_leaves_the_store(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    rng = random.Random(0)
    alphabet = "aA0._-/\\\x00 \u2024\uff0e\u202e\u0430\n%~"
    accepted = 0
    for _ in range(3000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        try:
            check_name(name)
        except InvalidInputError:
            continue
        accepted += 1
        path = store._record_path(name).resolve()
        assert path.parent == (tmp_path / "store" / "models").resolve(), name
        assert all(ord(ch) < 128 for ch in name) and not name.startswith(".")
    assert accepted > 50


# =============================================================================================
# live service: tokens, limits, names, bind address
# =============================================================================================
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_security")
    base = save_base(root / "base")
    art = compress(base, finetune(base, root / "ft", ["neg", "pos"], seed=41), progress=False).to_bytes()
    store = root / "store"
    port = free_port()
    cfg = ServeConfig(base=str(base), store=str(store), admin_token=ADMIN, classify_token=CLASSIFY_TOKEN, port=port,
                      max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD, max_wait_ms=2, replica_num_cpus=0.5)
    assert cfg.host == "127.0.0.1"  # not configured: the default
    url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield {"c": c, "url": url, "port": port, "art": art, "root": root, "store": store}
    finally:
        run.stop()


def _bearer(t):
    return {"Authorization": f"Bearer {t}"}


def _upload(c, name, data, headers):
    return c.post("/v1/models", data={"name": name}, files={"file": ("d.safetensors", data)}, headers=headers)


WRONG_AUTH = [
    ("missing", {}),
    ("wrong_same_length", _bearer("x" * len(ADMIN))),
    ("wrong_short", _bearer("nope")),
    ("prefix_of_token", _bearer(ADMIN[:-1])),
    ("token_plus_char", _bearer(ADMIN + "x")),
    ("empty_bearer", {"Authorization": "Bearer"}),
    ("basic_scheme", {"Authorization": f"Basic {ADMIN}"}),
    ("token_without_scheme", {"Authorization": ADMIN}),
    ("classify_token_for_admin", _bearer(CLASSIFY_TOKEN)),
    ("token_in_query_only", {}),
]


@pytest.mark.parametrize("case,headers", WRONG_AUTH, ids=[c[0] for c in WRONG_AUTH])
def test_admin_endpoints_refuse_without_the_right_token(env, case, headers):
    c = env["c"]
    before = sorted(p.name for p in env["store"].rglob("*"))
    params = {"token": ADMIN} if case == "token_in_query_only" else None
    r = c.post("/v1/models", data={"name": "sec1"}, files={"file": ("d", env["art"])}, headers=headers, params=params)
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate") == "Bearer" and r.json()["error"]["type"] == "unauthorized"
    assert ADMIN not in r.text
    r = c.delete("/v1/models/sec1", headers=headers)
    assert r.status_code == 401, r.text
    assert sorted(p.name for p in env["store"].rglob("*")) == before


def test_right_admin_token_registers_and_deletes(env):
    c = env["c"]
    r = _upload(c, "sec2", env["art"], {"Authorization": f"bearer {ADMIN}"})  # scheme is case-insensitive
    assert r.status_code == 201, r.text
    assert c.get("/v1/models/sec2", headers=_bearer(CLASSIFY_TOKEN)).status_code == 200
    assert c.delete("/v1/models/sec2", headers=_bearer("wrong-token-xyz")).status_code == 401
    assert c.get("/v1/models/sec2", headers=_bearer(CLASSIFY_TOKEN)).status_code == 200
    assert c.delete("/v1/models/sec2", headers=_bearer(ADMIN)).status_code == 204
    assert c.get("/v1/models/sec2", headers=_bearer(CLASSIFY_TOKEN)).status_code == 404


def test_classify_token_when_configured(env):
    c = env["c"]
    assert _upload(c, "sec3", env["art"], _bearer(ADMIN)).status_code == 201
    body = {"model": "sec3", "inputs": ["w1 w2"]}
    for headers in ({}, _bearer("wrong-classify-token"), _bearer(CLASSIFY_TOKEN + "x")):
        r = c.post("/v1/classify", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
        assert c.get("/v1/models", headers=headers).status_code == 401
    r = c.post("/v1/classify", json=body, headers=_bearer(CLASSIFY_TOKEN))
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("neg", "pos")
    assert c.get("/healthz").status_code == 200  # liveness stays open for probes
    metrics = c.get("/metrics").text
    assert ADMIN not in metrics and CLASSIFY_TOKEN not in metrics
    assert c.delete("/v1/models/sec3", headers=_bearer(ADMIN)).status_code == 204


def test_body_and_upload_limits(env):
    c = env["c"]
    h = _bearer(CLASSIFY_TOKEN)
    r = c.post("/v1/classify", json={"model": "x", "inputs": ["w1 " * MAX_BODY]}, headers=h)
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["error"]["message"]
    chunks = iter([b'{"model": "x", "inputs": ["'] + [b"w" * 4096] * 4 + [b'"]}'])
    r = c.post("/v1/classify", content=chunks, headers={**h, "content-type": "application/json"})
    assert r.status_code == 413
    r = _upload(c, "big", b"\0" * (MAX_UPLOAD + 1), _bearer(ADMIN))
    assert r.status_code == 413 and str(MAX_UPLOAD) in r.json()["error"]["message"]
    # an upload just under the body limit of other routes but over nothing: limits are per route
    r = _upload(c, "mid", env["art"][: MAX_BODY * 2], _bearer(ADMIN))
    assert r.status_code == 400  # reached validation (truncated artifact), not cut off by the JSON body limit
    # unauthenticated oversized uploads are refused without being stored
    r = c.post("/v1/models", content=iter([b"--b\r\n"] + [b"\0" * 65536] * 4), headers={
        "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code in (401, 413), r.text
    assert c.get("/healthz").status_code == 200


def test_traversal_names_create_nothing(env):
    c = env["c"]
    root = env["root"]
    before_root = sorted(p.name for p in root.iterdir())
    before_outside = sorted(p.name for p in root.parent.iterdir())
    before_store = sorted(str(p) for p in env["store"].rglob("*"))
    for name in ("../evil", "../../evil", "/tmp/evil", "..", "models/../../evil", "evil\x00.json"):
        r = _upload(c, name, env["art"], _bearer(ADMIN))
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_name", (name, r.text)
    assert sorted(p.name for p in root.iterdir()) == before_root
    assert sorted(p.name for p in root.parent.iterdir()) == before_outside
    assert sorted(str(p) for p in env["store"].rglob("*")) == before_store
    assert not Path("/tmp/evil").exists()


def _listening(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].split(":")
            if int(p, 16) == port and f[3] == "0A":  # 0A = LISTEN
                if len(addr) == 8:
                    out.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = bytes.fromhex(addr)
                    out.append(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return out


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_service_binds_to_loopback_only(env):
    assert ServeConfig.model_fields["host"].default == "127.0.0.1"
    assert ServeConfig.load({"base": "x"}, env={}).host == "127.0.0.1"
    assert ServeConfig.load({"base": "x"}, env={"BITDELTA_HOST": "0.0.0.0"}).host == "0.0.0.0"  # only if asked
    addrs = _listening(env["port"])
    assert addrs and set(addrs) == {"127.0.0.1"}, addrs
    ip = _non_loopback_ip()
    if ip is not None:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((ip, env["port"])) in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EAGAIN)
