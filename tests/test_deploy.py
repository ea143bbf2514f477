"""deploy/ stays true: its config decodes and builds, and the RayService points at it."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest
import yaml

from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings, resolve_models

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def test_the_cluster_config_decodes_and_names_installed_backends() -> None:
    text = (DEPLOY / "kuberay" / "modelyard.toml").read_text()
    settings = decode_settings(text, env={"MODELYARD_CACHE__SECRET": "s" * 32})
    assert settings.cluster.engine == "ray"
    assert settings.cache.secret == "s" * 32
    host = PluginHost()
    host.load_entry_points()
    specs = resolve_models(settings, host.backends)
    chat = next(s for s in specs if s.name == "chat")
    assert chat.placement.replicas == 2
    minilm = next(s for s in specs if s.name == "minilm")
    assert minilm.placement.autoscaling is not None
    assert {t.tier for t in settings.cache.tiers} <= set(host.cache_tiers)


def test_the_rayservice_imports_the_builder_with_the_mounted_config() -> None:
    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    mounts = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["volumeMounts"]
    assert any(app["args"]["config"].startswith(m["mountPath"]) for m in mounts)
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == _ray_version()


def _ray_version() -> str:
    ray = pytest.importorskip("ray")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile  # the image matches the cluster
    return str(ray.__version__)


def test_the_dockerfile_installs_the_extras_the_config_needs() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("ray", "onnx", "gguf", "cache"):
        assert extra in extras
        assert extra in dockerfile.split("pip install", 1)[1].split("\n", 1)[0]
