"""The README's commands and example config stay true."""

from __future__ import annotations

import re
from pathlib import Path

from modelyard.core.settings import decode_settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    assert test_command in ci.splitlines()


def test_readme_serve_command_installs_the_demo_and_serves() -> None:
    serve = next(b.strip() for b in _bash_blocks() if "modelyard serve" in b)
    assert "pip install -e '.[demo]'" in serve
    assert serve.endswith("modelyard serve")


def test_readme_config_example_decodes() -> None:
    block = re.search(r"## Configuration.*?```toml\n(.*?)```", README, flags=re.DOTALL)
    assert block is not None
    settings = decode_settings(block.group(1), env={})
    assert [m.name for m in settings.models] == ["minilm", "chat", "chat"]
    assert settings.models[0].batching.max_batch_size == 32


def test_echo_example_config_is_valid(plugin_host) -> None:
    from modelyard.core.settings import load_settings, resolve_models

    specs = resolve_models(
        load_settings(ROOT / "examples" / "echo.toml", env={}), plugin_host.backends
    )
    assert {s.name for s in specs} == {"echo", "echo-embed", "doubler"}
