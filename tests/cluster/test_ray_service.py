"""The RayService path: modelyard's app as a Ray Serve ingress deployment behind Ray's proxy
(``modelyard.api.ray_ingress:build``, the import path of deploy/kuberay/rayservice.yaml).

Ray's proxy is started once per Ray instance, and the session's instance runs without one
(modelyard's own ingress needs none), so this module starts a Ray instance of its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import pytest

from _services import free_port, start_ray, stop_ray
from modelyard.testing import wait_until

pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def proxy_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    temp = tmp_path_factory.mktemp("ray-proxy")
    gcs, http = free_port(), free_port()
    address = start_ray(temp, port=gcs)
    config = temp / "modelyard.toml"
    config.write_text(textwrap.dedent('''
        [[models]]
        name = "echo"
        backend = "echo"
        source = "."
        task = "chat"
    '''))
    deploy = textwrap.dedent(f'''
        import ray
        from ray import serve
        from modelyard.api.ray_ingress import build
        ray.init(address="{address}", namespace="modelyard", log_to_driver=False)
        serve.start(http_options={{"host": "127.0.0.1", "port": {http}}})
        serve.run(build({{"config": "{config}", "ingress_replicas": 1}}), name="modelyard",
                  route_prefix="/")
    ''')
    try:
        subprocess.run([sys.executable, "-c", deploy], check=True, capture_output=True,
                       timeout=240)
        url = f"http://127.0.0.1:{http}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "the RayService-style ingress", timeout=180, interval=0.5)
        yield url
    finally:
        stop_ray(temp)


def test_the_app_serves_behind_rays_proxy(proxy_url: str) -> None:
    reply = httpx.post(f"{proxy_url}/v1/chat/completions", timeout=60, json={
        "model": "echo", "messages": [{"role": "user", "content": "through the proxy"}],
    })
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "through the proxy"
    missing = httpx.post(f"{proxy_url}/v1/chat/completions", timeout=60, json={
        "model": "nope", "messages": [{"role": "user", "content": "x"}],
    })
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
