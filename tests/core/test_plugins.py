"""PluginHost: entry-point discovery, isolation of broken plugins, the allow-list."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest

from modelyard import Backend, PluginUnavailable, Task, hookimpl
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import ALLOW_ENV, PluginHost, PluginRecord
from modelyard.core.settings import decode_settings, resolve_models


def _record(host: PluginHost, name: str) -> PluginRecord:
    found = {r.name: r for r in host.records}
    assert name in found, f"no record for {name!r}; have {sorted(found)}"
    return found[name]


def test_entry_point_plugin_registers_its_backend(tiny_plugins: None) -> None:
    host = PluginHost()
    host.load_entry_points()

    assert host.backends["tiny"].__module__ == "tinyplug"
    record = _record(host, "tiny")
    assert (record.status, record.source, record.version) == ("loaded", "modelyard-tiny", "1.2.3")
    assert record.backends == ["tiny"]
    assert record.error == ""
    # First-party plugins come through the same group.
    assert _record(host, "sources").source_schemes == ["pypi", "demo"]
    assert {"pypi", "demo"} <= set(host.source_schemes)
    # The fakes are no production plugin: a server lists them only when its config names one.
    assert "testing" not in {r.name for r in host.records}
    assert "echo" not in host.backends


def test_plugin_that_fails_to_import_is_reported_and_skipped(tiny_plugins: None) -> None:
    host = PluginHost()
    host.load_entry_points()  # must not raise

    broken = _record(host, "broken")
    assert broken.status == "failed"
    assert broken.source == "modelyard-broken"
    assert "import failed" in broken.error
    assert "ImportError: tinybroken needs libfoo.so" in broken.error
    assert "Traceback" not in broken.error
    assert _record(host, "tiny").status == "loaded"


def test_hookimpl_with_a_wrong_argument_name_is_rejected(install_plugin: Any) -> None:
    install_plugin("modelyard-badarg", modules={"badargplug": """
        from modelyard import Backend, hookimpl

        class BadArg(Backend):
            name = "badarg"

        @hookimpl
        def register_backends(registrar):
            registrar(BadArg)
    """}, entry_points={"badarg": "badargplug"})
    host = PluginHost()
    host.load_entry_points()

    record = _record(host, "badarg")
    assert record.status == "failed"
    assert "rejected" in record.error
    assert "registrar" in record.error
    assert "badarg" not in host.backends
    assert _record(host, "sources").status == "loaded"


def test_unknown_hook_is_caught_by_check_pending(install_plugin: Any) -> None:
    install_plugin("modelyard-typo", "2.0", modules={"typoplug": """
        from modelyard import Backend, hookimpl

        class Typo(Backend):
            name = "typo"

        @hookimpl
        def register_backends(register):
            register(Typo)

        @hookimpl
        def register_backend(register):  # not a hookspec: a typo
            register(Typo)
    """}, entry_points={"typo": "typoplug"})
    host = PluginHost()
    host.load_entry_points()

    record = _record(host, "typo")
    assert record.status == "failed"
    assert "unknown hook" in record.error
    assert "register_backend" in record.error
    # The record keeps naming the distribution the plugin came from.
    assert (record.source, record.version) == ("modelyard-typo", "2.0")
    # What it registered before check_pending ran is withdrawn with it.
    assert "typo" not in host.backends
    assert _record(host, "sources").status == "loaded"


def test_allow_list_env_restricts_which_entry_points_load(
    tiny_plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_ENV, "tiny, sources")
    host = PluginHost()
    host.load_entry_points()

    assert _record(host, "tiny").status == "loaded"
    assert _record(host, "sources").status == "loaded"
    broken = _record(host, "broken")
    assert broken.status == "skipped"
    assert ALLOW_ENV in broken.error
    assert "tinybroken" not in sys.modules  # never imported
    assert _record(host, "onnx").status == "skipped"


def test_an_allow_listed_name_that_is_not_installed_is_reported(
    tiny_plugins: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ALLOW_ENV, "tiny,tinny")  # a typo: the server must not be silent
    host = PluginHost()
    host.load_entry_points()

    assert _record(host, "tiny").status == "loaded"
    missing = _record(host, "tinny")
    assert missing.status == "missing"
    assert ALLOW_ENV in missing.error and "'tinny'" in missing.error
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("tinny" in r.getMessage() for r in warnings)
    # Registering a plugin of that name later (the fakes join this way) replaces the record.
    host.register(object(), name="tinny")
    assert _record(host, "tinny").status == "loaded"


def test_explicit_allow_overrides_env(tiny_plugins: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_ENV, "broken")
    host = PluginHost(allow=["tiny"])
    host.load_entry_points()

    assert set(host.backends) == {"tiny"}
    assert _record(host, "broken").status == "skipped"


def test_plugin_unavailable_from_the_registration_hook_means_skipped(
    install_plugin: Any,
) -> None:
    install_plugin("modelyard-needs-extra", modules={"needsextra": """
        from modelyard import PluginUnavailable, hookimpl

        @hookimpl
        def register_backends(register):
            raise PluginUnavailable("install modelyard[needs] to use this backend")
    """}, entry_points={"needs": "needsextra"})
    host = PluginHost()
    host.load_entry_points()

    record = _record(host, "needs")
    assert record.status == "skipped"
    assert record.error == "install modelyard[needs] to use this backend"
    assert record.backends == []


# -- register() with in-process plugin objects ----------------------------------------------


class _Named(Backend):
    name = "named"
    tasks = frozenset({Task.CHAT})


def _plugin(**hooks: Callable[..., None]) -> object:
    """A plugin object whose attributes are hookimpls."""
    return type("Plugin", (), {k: staticmethod(hookimpl(v)) for k, v in hooks.items()})()


def test_register_collects_backends_and_unregister_withdraws_them() -> None:
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(_Named)

    host = PluginHost(allow=())
    assert host.register(_plugin(register_backends=register_backends), name="p", source="dist")
    assert host.backends == {"named": _Named}
    assert _record(host, "p").source == "dist"

    host.unregister("p")
    assert host.backends == {}
    assert host.records == []


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        (object, "is not a named Backend subclass"),
        (type("Anonymous", (Backend,), {}), "is not a named Backend subclass"),
    ],
)
def test_registering_a_non_backend_fails_the_plugin(registered: Any, expected: str) -> None:
    def register_backends(register: Callable[[Any], None]) -> None:
        register(registered)

    host = PluginHost(allow=())
    assert not host.register(_plugin(register_backends=register_backends), name="p")
    record = _record(host, "p")
    assert record.status == "failed"
    assert "registration hook failed" in record.error
    assert expected in record.error


def test_a_backend_name_taken_by_another_plugin_fails_the_second() -> None:
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(_Named)

    host = PluginHost(allow=())
    assert host.register(_plugin(register_backends=register_backends), name="first")
    assert not host.register(_plugin(register_backends=register_backends), name="second")
    assert "registered twice" in _record(host, "second").error
    assert host.backends == {"named": _Named}
    assert _record(host, "first").status == "loaded"


def test_a_raising_registration_hook_leaves_nothing_behind() -> None:
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(_Named)
        raise RuntimeError("half-way")

    host = PluginHost(allow=())
    assert not host.register(_plugin(register_backends=register_backends), name="p")
    assert host.backends == {}
    assert "RuntimeError: half-way" in _record(host, "p").error


def test_a_raising_lifecycle_observer_does_not_break_the_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def server_startup(server: Any) -> None:
        raise RuntimeError("observer bug")

    def server_shutdown(server: Any) -> None:
        seen.append("shutdown")

    host = PluginHost(allow=())
    host.register(_plugin(server_startup=server_startup, server_shutdown=server_shutdown), name="o")
    host.server_startup(object())  # type: ignore[arg-type]
    host.server_shutdown(object())  # type: ignore[arg-type]
    assert seen == ["shutdown"]
    assert "lifecycle hook raised" in caplog.text


def test_plugin_unavailable_is_public_api() -> None:
    assert issubclass(PluginUnavailable, Exception)


def test_a_model_whose_plugin_failed_names_the_plugin_and_its_error(tiny_plugins: None) -> None:
    host = PluginHost()
    host.load_entry_points()
    settings = decode_settings(
        {"models": [{"name": "m", "backend": "tinybroken", "source": "."}]}, env={}
    )
    with pytest.raises(ConfigError) as caught:
        resolve_models(settings, host.backends, unavailable=host.unavailable())
    detail = caught.value.detail
    assert "unknown backend 'tinybroken'" in detail
    assert "broken (failed: import failed: ImportError: tinybroken needs libfoo.so)" in detail
