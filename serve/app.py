"""Ray Serve application: one deployment whose replicas are both the HTTP ingress and the model.

::

    client --HTTP--> Serve proxy (or HAProxy / a replica's own port with direct ingress)
                       |
                       v
                     BitDeltaServer x num_replicas          (one process each)
                       HTTP layer (serve.http): routes, limits, auth, errors
                       Replica (serve.replica): MultiTenantEngine (one base + packed delta pool),
                         continuous batcher (mixes fine-tunes in one forward), store sync

A request costs one hop (proxy -> replica); the replica validates, tokenizes (batched with the
other requests of its round) and runs the forward in the same process. Registrations and
deletions go to whichever replica the proxy picks; the artifact store directory carries them to
every other replica (each checks it before every request) and a broadcast through this
deployment's own handle tells idle replicas at once. ``/healthz`` gathers every replica the same
way.

Metrics: each replica records its series with Ray's metrics API (:mod:`serve.ray_metrics`), so
the Ray metrics agent of the replica's node exports them to the cluster's Prometheus; the
replica's ``/metrics`` answers its own registry (``?scope=all``: every replica's, by broadcast,
for a single machine without Prometheus). Ray Serve's periodic health check also refreshes the
replica's memory gauges.

Placement across nodes: ``max_replicas_per_node`` (at most that many replicas on one node, so
losing a node loses at most that many) and ``replica_resources`` (custom node resources a
replica needs, e.g. ``{"bitdelta": 1}`` declared only on the nodes meant to run replicas).

Run it with ``bitdelta serve`` (:mod:`serve.run`), ``serve run deploy/serve_config.yaml`` or
``serve.run(build_app({...}))``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve import Application

from .config import ServeConfig
from .http import Routes, app
from .ray_metrics import RaySink
from .replica import Replica

logger = logging.getLogger("bitdelta.serve")

DEPLOYMENT = "BitDeltaServer"


class _OwnDeployment:
    """:class:`serve.http.Peers` over this deployment's own handle (every replica, this one too)."""

    def __init__(self) -> None:
        self._handle = None

    async def broadcast(self, method: str, timeout_s: float = 10.0) -> list[Any]:
        if self._handle is None:
            ctx = serve.get_replica_context()
            self._handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        res = self._handle.broadcast(method)
        return await res.results_async(timeout_s=timeout_s, return_exceptions=True)


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256,
                  health_check_period_s=10, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class BitDeltaServer(Routes):
    def __init__(self, args: dict[str, Any]):
        self.cfg = ServeConfig.load(args)
        try:
            replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - constructed outside a Serve replica (unit use)
            replica_id = None
        self.replica = Replica(self.cfg, replica_id, metrics_export=RaySink(replica_id) if replica_id else None)
        self.peers = _OwnDeployment()
        self.init_http()

    # called through this deployment's handle by peers (broadcast) -------------------------------
    async def sync(self) -> dict[str, Any]:
        return await self.replica.sync()

    async def health(self) -> dict[str, Any]:
        return await self.replica.health()

    async def stats(self) -> dict[str, Any]:
        return await self.replica.stats()

    async def check_health(self) -> None:  # Ray Serve's periodic health check
        if self.replica.engine is None:
            raise RuntimeError("engine not loaded")
        await asyncio.to_thread(self.replica.refresh_gauges)  # the gauges Ray exports


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application from config values (``args``; ``BITDELTA_*`` env fills the rest)."""
    cfg = ServeConfig.load(dict(args or {}))
    # Replica settings from Ray's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED), the
    # ones that act inside a replica:
    # * the routes never block the event loop (tokenization and the forward run in the batcher's
    #   worker thread, store I/O in to_thread), so user code runs on the replica's main event loop:
    #   one cross-thread hop less per request;
    # * the objects that exist once the replica is up (the model's modules, the engine, the pool)
    #   are frozen out of the garbage collector, so a full collection triggered by requests does
    #   not walk them: fewer and shorter GC pauses in the request path;
    # * Serve's own request-path log records are written in batches.
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}
    actor: dict[str, Any] = {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus,
                             "runtime_env": {"env_vars": env}}
    if cfg.replica_resources:
        actor["resources"] = dict(cfg.replica_resources)
    opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": cfg.max_ongoing_requests}
    if cfg.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = cfg.max_replicas_per_node
    if cfg.autoscaling:
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.num_replicas
    return BitDeltaServer.options(**opts).bind(cfg.to_args())


__all__ = ["app", "BitDeltaServer", "build_app", "DEPLOYMENT"]
