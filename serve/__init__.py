"""Ray Serve service for bitdelta: classify by fine-tune name, register 1-bit deltas at runtime.

Modules: :mod:`serve.config` (settings), :mod:`serve.schemas` (HTTP models), :mod:`serve.store`
(artifact store on disk), :mod:`serve.reconcile` (store -> pool), :mod:`serve.batching`
(continuous batcher), :mod:`serve.metrics` (Prometheus text), :mod:`serve.replica` (the model
worker: engine + batcher + store sync), :mod:`serve.http` (routes, limits, auth, error mapping),
:mod:`serve.access` (API keys, rate limits, audit trail), :mod:`serve.app` (the Ray Serve
deployment that joins them), :mod:`serve.run` (start/stop a local service), :mod:`serve.demo`
(the one-command demo), :mod:`serve.demo_build` (the recipe of the demo's shipped deltas in
``serve/demo_data``), :mod:`serve.cli` (the ``bitdelta`` command: the core's commands plus
serve/demo/register/models/keys/audit).
Nothing is imported here: ``import serve.store`` must not pull in Ray or torch.
"""
