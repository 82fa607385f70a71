"""deploy/ files are valid: Ray Serve schema, ServeConfig args, KubeRay manifests; the builder
turns config into the right deployment options. No Ray cluster is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _validate_serve_config(doc: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    cfg = ServeConfig.load(app["args"], env={})  # every arg is a known ServeConfig field
    assert Path(cfg.base).is_dir(), "the base alias resolves to the packaged MiniLM folder"


def test_serve_config_yaml_is_valid_and_local_only():
    doc = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    _validate_serve_config(doc)
    assert doc["http_options"]["host"] == "127.0.0.1"
    assert "admin_token" not in doc["applications"][0]["args"], "tokens belong in the environment"


@pytest.mark.parametrize("name,device", [("rayservice-cpu.yaml", "cpu"), ("rayservice-gpu.yaml", "cuda")])
def test_kuberay_rayservice(name, device):
    doc = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    inner = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _validate_serve_config(inner)
    args = inner["applications"][0]["args"]
    assert args["device"] == device and args["store"] == "/store"
    assert args["autoscaling"]["min_replicas"] >= 1 and args["autoscaling"]["max_replicas"] >= args["autoscaling"]["min_replicas"]
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for g in groups:  # every pod mounts the shared store and gets the admin token from a Secret
        spec = g["template"]["spec"]
        assert {"name": "store", "mountPath": "/store"} in spec["containers"][0]["volumeMounts"]
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "bitdelta-store"
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert "secretKeyRef" in env["BITDELTA_ADMIN_TOKEN"]["valueFrom"]
    if device == "cuda":
        worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and args["replica_num_gpus"] == 1
    pvc = yaml.safe_load((DEPLOY / "kuberay" / "store-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_builder_options(tmp_path):
    from serve.app import build_app

    app = build_app({"base": "all-minilm-l6-v2", "store": str(tmp_path), "num_replicas": 3, "replica_num_cpus": 0.25})
    server = app._bound_deployment  # the one deployment: HTTP ingress and engine in each replica
    assert server.name == "BitDeltaServer" and server.num_replicas == 3
    assert server.ray_actor_options["num_cpus"] == 0.25
    assert server.init_args[0]["store"] == str(tmp_path)
    auto = build_app({"base": "all-minilm-l6-v2", "store": str(tmp_path),
                      "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}})
    assert auto._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4
