"""A :class:`serve.metrics.Sink` that records a replica's metrics with Ray's metrics API.

Each series goes to ``ray.util.metrics`` (Counter / Gauge / Histogram of the same name, help,
labels and buckets), tagged with the replica's id. Ray's metrics agent on the replica's node
serves it on that node's Prometheus endpoint (``--metrics-export-port``; the name gains Ray's
``ray_`` prefix, a counter also ``_total``), next to Ray's own ``Component``, ``NodeAddress``,
``SessionName`` and ``WorkerId`` labels, so the cluster's Prometheus scrape and Grafana see
every replica on every node without the service collecting anything itself.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("bitdelta.serve")

REPLICA_TAG = "replica"


class _Recorder:
    def __init__(self, kind: str, metric: Any):
        self.kind, self.metric = kind, metric
        self._warned = False

    def record(self, value: float, labels: dict[str, str]) -> None:
        try:
            if self.kind == "counter":
                if value > 0:
                    self.metric.inc(value, tags=labels)
            elif self.kind == "gauge":
                self.metric.set(value, tags=labels)
            else:
                self.metric.observe(value, tags=labels)
        except Exception as e:  # noqa: BLE001 - metrics never fail a request
            if not self._warned:
                self._warned = True
                logger.warning("recording %s into Ray metrics failed: %s", getattr(self.metric, "_name", "?"), e)


class RaySink:
    """Creates one Ray metric per registry metric; ``replica`` is a default tag of each."""

    def __init__(self, replica_id: str):
        self.replica_id = replica_id

    def metric(self, kind: str, name: str, help: str, labelnames: tuple[str, ...],
               buckets: tuple[float, ...] | None) -> _Recorder:
        from ray.util import metrics as rm

        tag_keys = tuple(labelnames) + (REPLICA_TAG,)
        if kind == "counter":
            m = rm.Counter(name, help, tag_keys=tag_keys)
        elif kind == "gauge":
            m = rm.Gauge(name, help, tag_keys=tag_keys)
        elif kind == "histogram":
            m = rm.Histogram(name, help, boundaries=list(buckets or ()), tag_keys=tag_keys)
        else:
            raise ValueError(f"unknown metric kind {kind!r}")
        m.set_default_tags({REPLICA_TAG: self.replica_id})
        return _Recorder(kind, m)


__all__ = ["RaySink", "REPLICA_TAG"]
