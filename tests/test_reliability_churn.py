"""Load and churn: the short CI version of ``python -m benchmarks.soak``.

Six classify clients hit 7 tenants over real HTTP while two churn threads register, replace (A<->B)
and delete the churned ones. Every 200 must equal the offline ``apply`` model of the named
tenant, in a version the tenant could have had while the request was in flight (old or new
around a replace, never another tenant's); 404 only while the tenant may have been absent; no
5xx, no transport errors. The timeline logic itself is unit-tested below so the check can fail.
"""

from __future__ import annotations

import pytest

from benchmarks.soak import ABSENT, Op, Sample, Timeline, build_fixture, run_load, verdicts
from serve import run
from serve.config import ServeConfig
from serve_helpers import ADMIN, free_port

pytestmark = pytest.mark.slow

DURATION_S = 12.0


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("rel_churn"), n_stable=4, n_churned=3, pool_size=12)


@pytest.fixture(scope="module")
def service(fx, tmp_path_factory):
    store = tmp_path_factory.mktemp("rel_churn_store")
    cfg = ServeConfig(base=str(fx.base), store=str(store), admin_token=ADMIN, port=free_port(), max_wait_ms=2,
                      replica_num_cpus=0.5)
    url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    yield url
    run.stop()


def test_classify_under_churn_is_always_the_named_tenants_answer(fx, service):
    res = run_load(service, fx, duration_s=DURATION_S, clients=6, churners=2, churn_pause_s=0.05, seed=1)
    assert not res["threads_still_running"], res
    assert res["churn_errors"] == [], res["churn_errors"]
    assert res["problems"] == [], "\n".join(res["problems"])
    v = res["verdicts"]
    assert v["server_error"] == 0 and v["transport_error"] == 0 and v["cross_tenant"] == 0 and v["wrong_answer"] == 0
    assert res["errors"] == 0
    # the run really exercised what it claims: many answers, and every kind of churn operation
    assert v["ok"] >= 50, res
    ops = res["churn_ops"]
    assert ops["replace"] >= 3 and ops["delete"] >= 1 and ops["register"] >= 1, ops
    assert set(fx.stable) <= set(res["models_at_end"])


def test_restored_to_initial_versions_after_churn(fx, service):
    """After the churn every churned tenant can be put back and answers exactly like version A."""
    import httpx

    from benchmarks.soak import register

    with httpx.Client(base_url=service, timeout=60) as c:
        for t in fx.churned:
            assert register(c, t, fx.artifacts[(t, "A")], replace=True).status_code == 201
        for t in fx.stable + fx.churned:
            r = c.post("/v1/classify", json={"model": t, "inputs": fx.pool})
            assert r.status_code == 200, r.text
            want = fx.expected[(t, "A")]
            got = r.json()["predictions"]
            assert [p["label"] for p in got] == [w["label"] for w in want]
            assert all(abs(p["score"] - w["score"]) <= 1e-4 for p, w in zip(got, want))


# ---------------------------------------------------------------------------------------------
# the verdict logic (no service): wrong answers are caught
# ---------------------------------------------------------------------------------------------
def _answer(fx, key, idx):
    return {"predictions": [fx.expected[key][i] for i in idx]}


def test_timeline_possible_states():
    tl = Timeline(initial={"c0": "A"})
    tl.record("c0", Op(10.0, 11.0, "B"))
    tl.record("c0", Op(20.0, 21.0, ABSENT))
    assert tl.possible("c0", 0.0, 5.0) == {"A"}
    assert tl.possible("c0", 10.5, 10.6) == {"A", "B"}  # during the replace: old or new
    assert tl.possible("c0", 12.0, 19.0) == {"B"}
    assert tl.possible("c0", 12.0, 20.5) == {"B", ABSENT}
    assert tl.possible("c0", 22.0, 30.0) == {ABSENT}
    assert tl.possible("s0", 0.0, 99.0) == {ABSENT}


def test_verdicts_catch_wrong_and_cross_tenant_answers(fx):
    tl = Timeline(initial={t: "A" for t in fx.stable + fx.churned})
    c0 = fx.churned[0]
    tl.record(c0, Op(10.0, 11.0, "B"))
    idx = [0, 3]
    samples = [
        Sample(fx.stable[0], idx, 1.0, 2.0, 200, _answer(fx, (fx.stable[0], "A"), idx)),  # ok
        Sample(c0, idx, 10.2, 10.4, 200, _answer(fx, (c0, "A"), idx)),  # ok: old version during replace
        Sample(c0, idx, 10.2, 10.4, 200, _answer(fx, (c0, "B"), idx)),  # ok: new version during replace
        Sample(c0, idx, 12.0, 13.0, 200, _answer(fx, (c0, "A"), idx)),  # stale after the replace finished
        Sample(fx.stable[0], idx, 1.0, 2.0, 200, _answer(fx, (fx.stable[1], "A"), idx)),  # another tenant's
        Sample(fx.stable[0], idx, 1.0, 2.0, 404, {"error": {"message": f"model {fx.stable[0]!r} is not registered"}}),
        Sample(fx.stable[0], idx, 1.0, 2.0, 500, {"error": {"message": "boom"}}),
        Sample(fx.stable[0], idx, 1.0, 2.0, 0, {"transport": "reset"}),
    ]
    mixed = _answer(fx, (c0, "A"), idx)
    mixed["predictions"][1] = fx.expected[(c0, "B")][idx[1]]  # rows from two versions in one answer
    samples.append(Sample(c0, idx, 10.2, 10.4, 200, mixed))
    counts = verdicts(fx, tl, samples)["counts"]
    assert counts == {"ok": 3, "ok_404": 0, "server_error": 1, "wrong_answer": 2, "cross_tenant": 1,
                      "unexpected_404": 1, "other_status": 0, "transport_error": 1}
