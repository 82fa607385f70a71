"""A small thread-safe metrics registry rendered as Prometheus text (exposition format 0.0.4),
optionally mirrored into an external metrics pipeline.

Every engine replica is its own process and keeps its own :class:`Registry`. Two ways out:

* an ``export`` sink (:class:`Sink`) given to the registry receives every update as it happens;
  :mod:`serve.ray_metrics` is the sink that records into Ray's metrics API, so every node's Ray
  metrics agent serves the replica's series to Prometheus (names prefixed ``ray_``);
* :meth:`Registry.snapshot` (plain JSON-able data) rendered by :func:`render`: a replica's own
  ``/metrics`` answer, or several replicas' snapshots side by side, labelled by ``replica``.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Iterable, Protocol, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)


class Sink(Protocol):
    """Where a registry mirrors its updates: ``metric(kind, name, help, labelnames, buckets)``
    returns a recorder whose ``record(value, labels)`` is called on every ``inc`` (the
    increment), ``set`` (the value) and ``observe`` (the observation)."""

    def metric(self, kind: str, name: str, help: str, labelnames: tuple[str, ...],
               buckets: tuple[float, ...] | None) -> Any: ...


def _key(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()
        self._mirror = None  # a Sink's recorder, bound by Registry

    def _export(self, value: float, labels: dict[str, str]) -> None:
        if self._mirror is not None:
            self._mirror.record(value, labels)

    def _labels(self, labels: dict[str, Any]) -> dict[str, str]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return {k: str(v) for k, v in labels.items()}


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        labels = self._labels(labels)
        key = _key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount
        self._export(amount, labels)

    def samples(self):
        with self._lock:
            return [("_total", dict(k), v) for k, v in self._values.items()]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._values: dict[tuple, float] = {}

    def set(self, value: float, **labels) -> None:
        labels = self._labels(labels)
        key = _key(labels)
        with self._lock:
            self._values[key] = float(value)
        self._export(float(value), labels)

    def samples(self):
        with self._lock:
            return [("", dict(k), v) for k, v in self._values.items()]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labelnames=(), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._values: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        labels = self._labels(labels)
        key = _key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            v = self._values.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            if i < len(self.buckets):
                v[i] += 1
            v[-2] += value
            v[-1] += 1
        self._export(value, labels)

    def samples(self):
        out = []
        with self._lock:
            for key, v in self._values.items():
                labels = dict(key)
                cum = 0
                for b, c in zip(self.buckets, v):
                    cum += c
                    out.append(("_bucket", {**labels, "le": _fmt(b)}, cum))
                out.append(("_bucket", {**labels, "le": "+Inf"}, v[-1]))
                out.append(("_sum", labels, v[-2]))
                out.append(("_count", labels, v[-1]))
        return out


class Registry:
    def __init__(self, prefix: str = "bitdelta_", export: Sink | None = None):
        self.prefix = prefix
        self.export = export
        self._metrics: list[_Metric] = []

    def _add(self, m):
        m.name = self.prefix + m.name
        if self.export is not None:
            m._mirror = self.export.metric(m.kind, m.name, m.help, m.labelnames, getattr(m, "buckets", None))
        self._metrics.append(m)
        return m

    def counter(self, name, help, labelnames=()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name, help, labelnames=()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))

    def histogram(self, name, help, labelnames=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))

    def snapshot(self) -> list[dict[str, Any]]:
        """JSON-able families: ``[{name, help, type, samples: [[suffix, labels, value], ...]}]``."""
        return [{"name": m.name, "help": m.help, "type": m.kind, "samples": [list(s) for s in m.samples()]}
                for m in self._metrics]


def render(snapshots: Iterable[tuple[dict[str, str], list[dict[str, Any]]]]) -> str:
    """Prometheus text for several snapshots, each with extra labels (e.g. ``{"replica": id}``)."""
    families: dict[str, dict[str, Any]] = {}
    for extra, snap in snapshots:
        for fam in snap:
            f = families.setdefault(fam["name"], {"help": fam["help"], "type": fam["type"], "lines": []})
            for suffix, labels, value in fam["samples"]:
                f["lines"].append(f"{fam['name']}{suffix}{_labels({**extra, **labels})} {_fmt(value)}")
    out = []
    for name, f in families.items():
        out.append(f"# HELP {name} {f['help']}")
        out.append(f"# TYPE {name} {f['type']}")
        out.extend(f["lines"])
    return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items(), key=lambda kv: (kv[0] == "le", kv[0])))
    return "{" + body + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return str(v)


__all__ = ["Registry", "Sink", "Counter", "Gauge", "Histogram", "render", "LATENCY_BUCKETS", "SIZE_BUCKETS", "TOKEN_BUCKETS"]
