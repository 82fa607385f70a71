"""Start and stop the service on a local Ray instance (used by ``bitdelta serve``/``demo`` and tests)."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from typing import Any

from .config import ServeConfig

logger = logging.getLogger(__name__)

APP_NAME = "bitdelta"


def free_local_port() -> int:
    """A free port on 127.0.0.1 between 20000 and 32000: outside the kernel's ephemeral range
    (32768+ on Linux, 49152+ on macOS and Windows) and Ray's default worker ports (10002-19999).
    A port that ``bind(0)`` hands out comes from the ephemeral range, and the processes Ray
    starts before Serve binds its HTTP port take ports from that range too."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000 on 127.0.0.1")


def start(cfg: ServeConfig, *, ray_num_cpus: int | None = None, wait_s: float = 300.0,
          ray_address: str | None = None, proxy_location: str | None = None) -> str:
    """Start local Ray (if not running), Serve on ``cfg.host:cfg.port`` and the app; wait until
    ``/healthz`` answers 200 (at most ``wait_s``). Returns the base URL.

    ``proxy_location``: Serve's HTTP proxies, ``EveryNode`` (Serve's default) or ``HeadOnly``
    (one proxy; needed where several Ray nodes share one host and so one port)."""
    import ray
    from ray import serve

    from .app import build_app

    os.makedirs(cfg.store, exist_ok=True)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                  "log_to_driver": bool(os.environ.get("BITDELTA_RAY_LOGS"))}
        if ray_address:
            kwargs["address"] = ray_address
        else:
            kwargs["num_cpus"] = ray_num_cpus or max(2, os.cpu_count() or 2)
            kwargs["runtime_env"] = {"env_vars": worker_env()}
        ray.init(**kwargs)
    # no per-request access log lines: they cost CPU on every request of a small machine
    extra: dict[str, Any] = {"proxy_location": proxy_location} if proxy_location else {}
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": "WARNING", "enable_access_log": False}, **extra)
    serve.run(build_app(cfg.to_args()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{_client_host(cfg.host)}:{cfg.port}"
    wait_ready(url, wait_s)
    return url


def worker_env() -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k, v in os.environ.items():
        if k.startswith("BITDELTA_") or k in ("HF_HOME", "OMP_NUM_THREADS"):
            env[k] = v
    return env


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def wait_ready(url: str, timeout_s: float = 300.0, interval_s: float = 0.5) -> None:
    """Poll ``url/healthz`` until it answers 200; bounded in time and attempts."""
    import httpx

    deadline = time.monotonic() + timeout_s
    attempts = int(timeout_s / interval_s) + 1
    last = "no answer"
    for _ in range(attempts):
        try:
            r = httpx.get(f"{url}/healthz", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            break
        time.sleep(interval_s)
    raise TimeoutError(f"the service at {url} was not ready within {timeout_s:.0f} s ({last})")


def stop() -> None:
    """Shut Serve and Ray down (idempotent)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            logger.warning("serve.shutdown failed: %s", e)
        ray.shutdown()


def serve_forever(cfg: ServeConfig, *, ray_num_cpus: int | None = None, banner=None) -> None:
    """``start``; call ``banner(url)``; block until Ctrl-C (SIGINT) or SIGTERM; ``stop``."""
    import signal

    def _term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        url = start(cfg, ray_num_cpus=ray_num_cpus)
        if banner is not None:
            banner(url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        stop()
        signal.signal(signal.SIGTERM, old)
        print("stopped.", flush=True)


__all__ = ["start", "stop", "wait_ready", "serve_forever", "APP_NAME"]
