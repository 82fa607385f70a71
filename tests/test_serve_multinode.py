"""The service on a multi-node Ray cluster: a head and worker nodes (separate raylets) on this
host, started with ``ray.cluster_utils.Cluster``, every node bound to 127.0.0.1.

* placement: ``max_replicas_per_node=1`` puts the two engine replicas on two different nodes
  (checked in Ray's actor table);
* consistency: a registration, a replacement and a deletion made through whichever replica the
  proxy picks are served (or 404) by every replica, on every node, with answers equal to offline
  ``apply``;
* Ray metrics: each replica's per-model counters reach the Prometheus endpoint of its node's Ray
  metrics agent (scraped, summed over nodes, equal to the requests sent);
* node loss: a worker node hosting a replica is killed under classify load; the failed requests
  and the time until the deployment has its replicas back (on the remaining nodes, every model
  served) are measured;
* a node added later receives the replica that autoscaling asks for, and it serves every model.

All nodes share one host, so the service runs with one HTTP proxy (``proxy_location=HeadOnly``).
Every wait is bounded in count and time. Figures: ``BITDELTA_MULTINODE_OUT`` (a JSON-lines file
that gets one line per node-loss run) and ``BITDELTA_SCRAPE_OUT`` (a scrape excerpt), when set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import httpx
import pytest

from bitdelta_core.apply import apply
from bitdelta_core.compress import compress
from serve import run
from serve.app import DEPLOYMENT
from serve.config import ServeConfig
from serve_helpers import (AUTH, ADMIN, finetune, free_port, reference_predictions, save_base, texts, tiny_tokenizer,
                           wait_until)

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

INPUTS = texts(3, seed=11)
LABELS = {"a": ["neg", "pos"], "b": ["x", "y", "z"], "c": ["p", "q"]}
# Ray's GCS marks a node dead after health_check_failure_threshold missed checks; the defaults
# (3 s x 5) suit real networks, a CI host can decide in about a second.
SYSTEM_CONFIG = {"metrics_report_interval_ms": 1000, "health_check_period_ms": 500,
                 "health_check_failure_threshold": 4}
LOCAL_ROUTING = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"
# Load is paced (each client waits PACE_S between requests) so that it leaves CPU to the replica
# that starts meanwhile on a small shared machine; REPLICA_START_S bounds a replica's start-up
# (a new worker process importing torch and transformers, then the base and every model).
PACE_S = 0.02
REPLICA_START_S = 300
AUTOSCALING = {"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
               "downscale_delay_s": 600, "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # every raylet, GCS and worker on the loopback address (not the host's network address)
    old_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    old_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    # The one proxy lives on the head; Serve's proxy prefers replicas on its own node, which
    # would send every request to the head's replica (a real cluster has a proxy per node).
    old_local = os.environ.get(LOCAL_ROUTING)
    os.environ[LOCAL_ROUTING] = "0"
    if ray.is_initialized():
        run.stop()

    root = tmp_path_factory.mktemp("multinode")
    base = save_base(root / "base")
    files, expected = {}, {}
    tok = tiny_tokenizer()
    for i, (name, labels) in enumerate(LABELS.items()):
        art = compress(base, finetune(base, root / f"ft_{name}", labels, seed=40 + i), progress=False)
        files[name] = root / f"{name}.safetensors"
        art.save(files[name])
        expected[name] = reference_predictions(apply(str(base), art), tok, INPUTS, art.id2label())

    ports: dict[str, int] = {}

    def node_args(name: str) -> dict:
        ports[name] = free_port()
        return {"num_cpus": 1, "metrics_export_port": ports[name], "include_dashboard": False}

    # Cluster records its address in /tmp/ray/ray_current_cluster, where a plain ray.init() of any
    # other process on this host would find it and join it; this cluster stays private.
    private = [mock.patch("ray._private.utils.write_ray_address"), mock.patch("ray._common.utils.reset_ray_address")]
    for p in private:
        p.start()
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={**node_args("head"), "_system_config": SYSTEM_CONFIG})
        workers = {"w1": c.add_node(**node_args("w1")), "w2": c.add_node(**node_args("w2"))}
        cfg = ServeConfig(base=str(base), store=str(root / "store"), admin_token=ADMIN, port=free_port(),
                          replica_num_cpus=0.25, max_replicas_per_node=1, autoscaling=AUTOSCALING, max_wait_ms=2)
        ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": run.worker_env()})
        url = run.start(cfg, ray_address=c.address, wait_s=REPLICA_START_S, proxy_location="HeadOnly")
        with httpx.Client(base_url=url, timeout=30.0) as http:
            yield {"c": c, "workers": workers, "ports": ports, "http": http, "url": url, "files": files,
                   "expected": expected, "node_args": node_args, "head_id": c.head_node.node_id}
    finally:
        run.stop()
        if c is not None:
            c.shutdown()
        for p in private:
            p.stop()
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        for key, old in ((ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, old_env), (LOCAL_ROUTING, old_local)):
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# ---- helpers ----------------------------------------------------------------------------------
def replica_nodes() -> dict[str, str]:
    """Alive engine replicas from Ray's actor table: replica id -> node id."""
    from ray._private import state

    out = {}
    for a in state.actors().values():
        name = a.get("Name") or ""
        if a.get("State") == "ALIVE" and name.startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT}#" in name:
            out[name.rsplit("#", 1)[-1]] = a["Address"]["NodeID"]
    return out


def alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(run.APP_NAME)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return int(app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def wait_for(fn, timeout_s: float, what: str, interval_s: float = 0.25):
    return wait_until(fn, timeout_s=timeout_s, interval_s=interval_s, what=what)


def classify(http, name):
    return http.post("/v1/classify", json={"model": name, "inputs": INPUTS})


def matches(r, want) -> bool:
    if r.status_code != 200:
        return False
    got = r.json()["predictions"]
    return len(got) == len(want) and all(
        g["label"] == w["label"] and math.isclose(g["score"], w["score"], abs_tol=1e-4) for g, w in zip(got, want))


def register(http, name, path, replace=False):
    with open(path, "rb") as f:
        r = http.post("/v1/models", params={"replace": str(replace).lower()}, headers=AUTH,
                      files={"file": (f"{name}.safetensors", f.read())}, data={"name": name})
    assert r.status_code == 201, r.text


def on_every_replica(http, name, check, replicas: set[str], max_rounds=50, concurrency=4) -> None:
    """Requests ``concurrency`` at a time until each of ``replicas`` answered; ``check`` every answer."""
    seen: set[str] = set()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(max_rounds):
            for r in pool.map(lambda _: classify(http, name), range(concurrency)):
                assert check(r), f"{name}: HTTP {r.status_code} {r.text[:300]}"
                seen.add(r.headers.get("x-bitdelta-replica"))
            if replicas <= seen:
                return
    raise AssertionError(f"{name}: only replicas {sorted(seen)} of {sorted(replicas)} answered")


def check_placement(expect: int) -> dict[str, str]:
    nodes = wait_for(lambda: (lambda rn: rn if len(rn) == expect else None)(replica_nodes()), 60,
                     f"{expect} alive replicas in the actor table")
    assert len(set(nodes.values())) == expect, f"replicas share a node: {nodes}"
    assert set(nodes.values()) <= alive_nodes()
    return nodes


def scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


# ---- tests ------------------------------------------------------------------------------------
def test_builder_placement_options(tmp_path):
    from serve.app import build_app

    app = build_app({"base": "x", "store": str(tmp_path), "num_replicas": 2, "max_replicas_per_node": 1,
                     "replica_resources": {"bitdelta": 1}})
    server = app._bound_deployment
    assert server._replica_config.max_replicas_per_node == 1
    assert server.ray_actor_options["resources"] == {"bitdelta": 1.0}
    plain = build_app({"base": "x", "store": str(tmp_path)})._bound_deployment
    assert plain._replica_config.max_replicas_per_node is None and "resources" not in plain.ray_actor_options
    env = {"BITDELTA_REPLICA_RESOURCES": '{"gpu_node": 0.5}', "BITDELTA_MAX_REPLICAS_PER_NODE": "2"}
    cfg = ServeConfig.load({"base": "x"}, env=env)
    assert cfg.replica_resources == {"gpu_node": 0.5} and cfg.max_replicas_per_node == 2


def test_replicas_on_different_nodes(cluster):
    nodes = check_placement(2)
    logger.info("replica placement: %s", nodes)
    assert len(alive_nodes()) == 3


def test_registration_replace_delete_seen_on_every_node(cluster):
    http, files, expected = cluster["http"], cluster["files"], cluster["expected"]
    replicas = set(check_placement(2))
    register(http, "m1", files["a"])
    on_every_replica(http, "m1", lambda r: matches(r, expected["a"]), replicas)
    register(http, "m1", files["b"], replace=True)
    on_every_replica(http, "m1", lambda r: matches(r, expected["b"]), replicas)
    r = http.delete("/v1/models/m1", headers=AUTH)
    assert r.status_code == 204, r.text
    on_every_replica(http, "m1", lambda r: r.status_code == 404 and r.json()["error"]["type"] == "unknown_model",
                     replicas)


def test_per_model_counters_reach_ray_metrics_endpoints(cluster):
    http, ports = cluster["http"], cluster["ports"]
    register(http, "scraped", cluster["files"]["c"])
    n_ok, n_404 = 10, 3
    for _ in range(n_ok):
        assert matches(classify(http, "scraped"), cluster["expected"]["c"])
    for _ in range(n_404):
        assert classify(http, "never-registered").status_code == 404
    pattern = re.compile(r'^ray_bitdelta_requests_total\{([^}]*)\} (\S+)$', re.M)

    def totals():
        ok = unknown = 0.0
        texts_ = {}
        for node, port in ports.items():
            if node in cluster["workers"] and cluster["workers"][node] not in cluster["c"].worker_nodes:
                continue
            texts_[node] = t = scrape(port)
            for labels, value in pattern.findall(t):
                if 'model="scraped"' in labels and 'code="200"' in labels:
                    ok += float(value)
                if 'model="_unknown"' in labels and 'code="404"' in labels:
                    unknown += float(value)
        pool = re.search(r"^ray_bitdelta_pool_bytes\{.*\} [1-9]", "\n".join(texts_.values()), re.M)
        return (ok, unknown, texts_) if ok == n_ok and unknown >= n_404 and pool else None

    ok, unknown, texts_ = wait_for(totals, 60, f"{n_ok} requests of model 'scraped' on the nodes' Ray endpoints", 1.0)
    lines = [line for t in texts_.values() for line in t.splitlines() if "bitdelta" in line]
    assert any(re.match(r'ray_bitdelta_request_latency_seconds_count\{.*model="scraped".*replica="', x) for x in lines)
    assert any(x.startswith("ray_bitdelta_batch_size_bucket") for x in lines)
    # each node's endpoint carries only the replicas placed on that node
    nodes = replica_nodes()
    node_ids = {"head": cluster["head_id"], **{k: w.node_id for k, w in cluster["workers"].items()}}
    seen = set()
    for node, t in texts_.items():
        tagged = set(re.findall(r'ray_bitdelta_requests_total\{[^}]*replica="([^"]+)"', t))
        assert all(nodes.get(rid) == node_ids[node] for rid in tagged), (node, tagged, nodes)
        seen |= tagged
    assert seen == set(nodes), f"series of replicas {sorted(seen)}, replicas {sorted(nodes)}"
    out = os.environ.get("BITDELTA_SCRAPE_OUT")
    if out:
        with open(out, "w") as f:
            for node, t in texts_.items():
                keep = [x for x in t.splitlines() if re.match(r"(# (HELP|TYPE) )?ray_bitdelta_(requests_total|"
                                                              r"request_latency_seconds_count|pool_bytes|"
                                                              r"registrations_total)", x)]
                if keep:
                    f.write(f"# scraped from node {node}: GET http://127.0.0.1:{ports[node]}/metrics "
                            f"(the service's request, latency-count, pool and registration series)\n")
                    f.write("\n".join(keep) + "\n")


def test_node_loss_under_load(cluster):
    c, http, files, expected = cluster["c"], cluster["http"], cluster["files"], cluster["expected"]
    for name in ("a", "b"):
        register(http, name, files[name])
    before = check_placement(2)
    victim_id = next(n for n in before.values() if n != cluster["head_id"])
    victim = next(w for w in c.worker_nodes if w.node_id == victim_id)

    stop = threading.Event()
    stats = {"ok": 0, "failed": 0, "wrong": 0, "fail_times": [], "ok_times": [], "first_answer": {}}
    lock = threading.Lock()

    def load(k: int) -> None:
        with httpx.Client(base_url=cluster["url"], timeout=20.0) as h:
            for i in range(100_000):
                if stop.is_set():
                    return
                name = "ab"[(i + k) % 2]
                rid = None
                try:
                    r = classify(h, name)
                    good, failed = matches(r, expected[name]), r.status_code != 200
                    rid = r.headers.get("x-bitdelta-replica")
                except httpx.HTTPError:
                    good, failed = False, True
                with lock:
                    if good:
                        stats["ok"] += 1
                        stats["ok_times"].append(time.monotonic())
                        stats["first_answer"].setdefault(rid, time.monotonic())
                    elif failed:
                        stats["failed"] += 1
                        stats["fail_times"].append(time.monotonic())
                    else:
                        stats["wrong"] += 1
                time.sleep(PACE_S)

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(3.0)
        ok_before = stats["ok"]
        t_kill = time.monotonic()
        c.remove_node(victim, allow_graceful=False)  # a crash: raylet and its workers killed
        wait_for(lambda: victim_id not in alive_nodes(), 30, "the GCS to mark the node dead")
        t_dead = time.monotonic() - t_kill

        def recovered():
            """The replacement replica (not on the dead node) answered a request of the load."""
            rn = replica_nodes()
            new = [rid for rid, node in rn.items() if rid not in before and node != victim_id]
            with lock:
                t = [stats["first_answer"][rid] for rid in new if rid in stats["first_answer"]]
            return min(t) if t and len(rn) >= 2 and victim_id not in rn.values() else None

        t_recovered = wait_for(recovered, 120, "a replacement replica answering on a remaining node") - t_kill
        time.sleep(3.0)  # load keeps running on the recovered deployment
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    after = check_placement(2)
    last_fail = max(stats["fail_times"], default=None)
    ok_after = [t for t in stats["ok_times"] if t >= t_kill]
    gaps = [b - a for a, b in zip([t_kill] + ok_after, ok_after)]
    figures = {"requests_ok": stats["ok"], "requests_failed": stats["failed"], "wrong_answers": stats["wrong"],
               "ok_before_kill": ok_before, "node_dead_s": round(t_dead, 2),
               "replacement_serving_s": round(t_recovered, 2),
               "longest_gap_between_answers_s": round(max(gaps, default=0.0), 2),
               "last_failure_after_kill_s": round(last_fail - t_kill, 2) if last_fail else None,
               "replicas_before": before, "replicas_after": after}
    logger.warning("node loss: %s", json.dumps(figures))
    out = os.environ.get("BITDELTA_MULTINODE_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(figures) + "\n")
    assert stats["wrong"] == 0, "a request was answered with wrong predictions"
    assert ok_before > 0 and stats["ok"] > ok_before, "no load was served around the node loss"
    assert stats["failed"] <= 0.5 * (stats["ok"] + stats["failed"]), figures
    assert victim_id not in after.values()
    for name in ("a", "b"):
        on_every_replica(http, name, lambda r, n=name: matches(r, expected[n]), set(after))


def test_added_node_receives_autoscaled_replica(cluster):
    c, http, expected = cluster["c"], cluster["http"], cluster["expected"]
    check_placement(2)
    new = c.add_node(**cluster["node_args"]("w3"))
    cluster["workers"]["w3"] = new
    wait_for(lambda: new.node_id in alive_nodes(), 30, "the new node to join")
    stop = threading.Event()

    def load(k: int) -> None:
        with httpx.Client(base_url=cluster["url"], timeout=20.0) as h:
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    classify(h, "ab"[(i + k) % 2])
                except httpx.HTTPError:
                    pass

    def replica_actors() -> int:
        from ray._private import state

        return sum(1 for a in state.actors().values() if a.get("State") != "DEAD"
                   and (a.get("Name") or "").startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT}#" in a["Name"])

    # 8 clients against target_ongoing_requests=2 per replica: autoscaling asks for max_replicas=3.
    # The load stops once the third replica exists (downscale_delay_s keeps it); it then starts
    # without competing with the load for CPU.
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(load, k) for k in range(8)]
        try:
            wait_for(lambda: replica_actors() >= 3, 120, "autoscaling to create a third replica", 0.5)
        finally:
            stop.set()
            for f in futs:
                f.result(timeout=60)
    wait_for(lambda: running_replicas() >= 3, REPLICA_START_S, "the third replica to run", 0.5)
    nodes = check_placement(3)
    assert new.node_id in nodes.values(), f"no replica on the added node: {nodes}"
    assert len(set(nodes.values())) == 3
    for name in ("a", "b"):
        on_every_replica(http, name, lambda r, n=name: matches(r, expected[n]), set(nodes))
