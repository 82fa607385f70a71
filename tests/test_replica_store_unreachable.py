"""A replica whose artifact store becomes unreachable (a network filesystem gone, a volume
unmounted) keeps answering from its pool in memory, counts it, refuses writes with an OSError
(HTTP 503 ``store_unavailable``), and catches up when the store is back. No Ray: the replica is
driven directly, the store is made unreachable by moving its directory away."""

from __future__ import annotations

import asyncio
import math

import pytest
from starlette.requests import Request

from bitdelta_core.apply import apply
from bitdelta_core.compress import compress
from serve.config import ServeConfig
from serve.replica import Replica
from serve_helpers import finetune, reference_predictions, save_base, texts, tiny_tokenizer

INPUTS = texts(3, seed=5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_unreachable")
    base = save_base(root / "base")
    data, expected = {}, {}
    for i, (name, labels) in enumerate({"a": ["neg", "pos"], "b": ["x", "y", "z"]}.items()):
        art = compress(base, finetune(base, root / f"ft_{name}", labels, seed=60 + i), progress=False)
        art.save(root / f"{name}.safetensors")
        data[name] = (root / f"{name}.safetensors").read_bytes()
        expected[name] = reference_predictions(apply(str(base), art), tiny_tokenizer(), INPUTS, art.id2label())
    cfg = ServeConfig(base=str(base), store=str(root / "store"), max_wait_ms=0)
    return {"root": root, "cfg": cfg, "data": data, "expected": expected}


def _check(res, want):
    for g, w in zip(res["predictions"], want, strict=True):
        assert g["label"] == w["label"] and math.isclose(g["score"], w["score"], abs_tol=1e-4)


def _sync_count(replica, action: str) -> float:
    fam = next(f for f in replica.metrics.snapshot() if f["name"] == "bitdelta_store_sync")
    return sum(v for _, labels, v in fam["samples"] if labels.get("action") == action)


def test_serves_from_memory_while_the_store_is_gone(env):
    async def scenario():
        cfg, data, expected = env["cfg"], env["data"], env["expected"]
        replica = Replica(cfg, "r1")
        other = Replica(cfg, "r2")  # a second replica writing to the same store
        await replica.register("a", data["a"])
        _check(await replica.classify("a", INPUTS), expected["a"])

        store = env["root"] / "store"
        away = env["root"] / "store-away"
        store.rename(away)  # unreachable: every stat/open below the store path fails
        try:
            _check(await replica.classify("a", INPUTS), expected["a"])
            _check(await replica.classify("a", INPUTS), expected["a"])
            assert _sync_count(replica, "store_unreachable") == 2
            with pytest.raises(OSError):
                await replica.register("b", data["b"])
            with pytest.raises(OSError):
                await replica.unregister("a")
        finally:
            away.rename(store)
        await other.register("b", data["b"])
        _check(await replica.classify("b", INPUTS), expected["b"])  # caught up at the next request
        _check(await replica.classify("a", INPUTS), expected["a"])

    asyncio.run(scenario())


def test_store_io_error_answers_503_without_a_path():
    from serve.http import _store_error, status_of

    scope = {"type": "http", "method": "POST", "path": "/v1/models", "headers": [], "query_string": b""}
    exc = FileNotFoundError(2, "No such file or directory", "/secret/store/models")
    res = asyncio.run(_store_error(Request(scope), exc))
    assert res.status_code == 503 and status_of(exc) == 503
    body = res.body.decode()
    assert '"store_unavailable"' in body and "/secret" not in body
