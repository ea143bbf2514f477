"""Configuration: one TOML file decoded into msgspec Structs, plus ``MODELYARD_*`` overrides."""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import platformdirs
from msgspec import Meta, Struct, field

from modelyard.core.auth_settings import AuthSettings
from modelyard.core.backend import Backend
from modelyard.core.breaker import BreakerSettings
from modelyard.core.cache_settings import CacheSettings
from modelyard.core.cluster_settings import AutoscalingSettings, ClusterSettings, Placement
from modelyard.core.cors_settings import CorsSettings
from modelyard.core.errors import ConfigError
from modelyard.core.integrity import with_pin
from modelyard.core.jobs.settings import BatchSettings
from modelyard.core.limits import LimitSettings
from modelyard.core.probes import ProbeSettings
from modelyard.core.types import Task
from modelyard.core.ui_settings import UiSettings

__all__ = [
    "AliasSettings",
    "BatchingSettings",
    "ModelSettings",
    "ModelSpec",
    "ServerSettings",
    "Settings",
    "anchor_sources",
    "cache_dir_of",
    "decode_settings",
    "load_settings",
    "resolve_models",
]

ENV_PREFIX = "MODELYARD_"
#: Variables with the prefix that are not settings paths.
RESERVED_ENV = frozenset({"MODELYARD_PLUGINS", "MODELYARD_CONFIG"})

ModelName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
VersionLabel = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class ServerSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    #: Largest request body accepted; larger bodies get 413.
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    #: How long a request may wait for its answer before 504.
    request_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    #: Time in-flight requests get to finish on SIGTERM.
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 25.0
    log_level: str = "info"
    #: ``json``: one JSON object per line (for collectors); ``text``: for a terminal.
    log_format: Literal["json", "text"] = "json"
    #: Put prompt text in access log lines; off by default (prompts may hold personal data).
    log_prompts: bool = False
    #: A swap needs the target's health score (0-1) at least this high.
    swap_health_threshold: Annotated[float, Meta(ge=0, le=1)] = 1.0
    #: Previously active versions kept loaded (deprecated) for rollback.
    keep_deprecated: Annotated[int, Meta(ge=0)] = 1
    #: A canary is judged once it has answered this many requests.
    canary_min_calls: Annotated[int, Meta(ge=1)] = 20
    #: Roll a canary back when its error rate exceeds the active's by more than this (0-1).
    canary_error_margin: Annotated[float, Meta(ge=0, le=1)] = 0.1
    #: Which loads send the warm-up probe before a version is ``ready`` (a failure: ``failed``):
    #: ``added`` — versions added to a running server (candidates for a swap); ``all`` — also
    #: the configured ones at startup and v2 repository loads; ``off`` — none.
    #: ``[models.probe] warmup`` overrides it per model.
    warmup: Literal["added", "all", "off"] = "added"
    #: How long a probe (warm-up, swap safety, periodic) may take before it counts as failed.
    probe_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    #: Probe every serving version this often (seconds); 0 turns periodic probes off.
    probe_interval_s: Annotated[float, Meta(ge=0)] = 0.0
    #: Bytes every loaded version together may hold (as backends report it, see
    #: ``Backend.memory_bytes``); an on-demand load evicts idle models to stay within it, or
    #: is refused with 503. None: no limit.
    memory_budget_bytes: Annotated[int, Meta(ge=1)] | None = None
    #: Versions loaded at once, startup ones included; None: no limit.
    max_loaded_models: Annotated[int, Meta(ge=1)] | None = None
    #: How long a request waits for an on-demand model to load before 503 (the load goes on).
    load_timeout_s: Annotated[float, Meta(gt=0)] = 300.0


class BatchingSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    #: Requests merged into one backend call; None takes the backend's own limit; 1 disables.
    max_batch_size: Annotated[int, Meta(ge=1, le=4096)] | None = None
    #: Longest a lone request waits for company; 0 runs it at once (batches still form
    #: from whatever queues while the backend is busy).
    max_queue_delay_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0
    #: After a batch of k, wait up to this long for k queued requests before running fewer
    #: (keeps batches whole under steady load; an idle model never waits).
    refill_wait_ms: Annotated[float, Meta(ge=0, le=1_000)] = 2.0
    #: Requests waiting beyond this are refused with 503 + Retry-After.
    max_queue_size: Annotated[int, Meta(ge=1)] = 1024
    #: Per-request deadline for this model (queue wait included); default server.request_timeout_s.
    timeout_ms: Annotated[int, Meta(ge=1)] | None = None


class ModelSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    name: ModelName
    backend: str
    #: A path (relative to the config file), or ``SCHEME:REFERENCE`` for a registered source
    #: scheme: ``demo:``, ``pypi:``, ``hf:``, ``https:``, ``store:`` (docs/models.md).
    source: str
    version: VersionLabel = "1"
    task: Task | None = None
    #: Which of several versions of one name serves; defaults to the first listed.
    active: bool | None = None
    #: ``/v2/health/ready`` waits for required models only.
    required: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    #: The request that warms up, checks and watches this model's versions.
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    #: Periodic probes of this model; None takes ``server.probe_interval_s``, 0 turns them off.
    probe_interval_s: Annotated[float, Meta(ge=0)] | None = None
    #: Pins the content (a file's sha256, or a folder's listing digest); a mismatch fails the
    #: load naming both digests. Same as ending ``source`` with ``#sha256=HEX``.
    sha256: Annotated[str, Meta(pattern=r"^[0-9A-Fa-f]{64}$")] | None = None
    #: ``startup``: loaded when the server starts, never evicted. ``on_demand``: loaded by the
    #: first request for it, unloaded when idle for ``keep_alive_s`` or to make room.
    load: Literal["startup", "on_demand"] = "startup"
    #: On-demand models: idle seconds before unloading; 0 unloads as soon as it is idle; a
    #: negative value keeps it loaded until its room is needed (as ollama's keep_alive).
    keep_alive_s: float = 300.0
    #: On-demand models: once loaded, never evicted nor unloaded when idle.
    pinned: bool = False
    #: Cluster mode: replicas of each version (or ``[models.autoscaling]``) and Ray's actor
    #: options for each replica; ignored with a warning when serving from one process.
    replicas: Annotated[int, Meta(ge=1)] | None = None
    autoscaling: AutoscalingSettings | None = None
    ray_actor_options: dict[str, Any] = field(default_factory=dict)


class AliasSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[[aliases]]``: one name answered by the first of its targets that can."""

    name: ModelName
    #: ``model`` (its active version) or ``model:version``, tried in order.
    targets: Annotated[list[str], Meta(min_length=1)]


class Settings(Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = field(default_factory=ServerSettings)
    #: Where ``demo:`` and ``pypi:`` sources are prepared; defaults to the user cache dir.
    cache_dir: str | None = None
    models: list[ModelSettings] = field(default_factory=list)
    aliases: list[AliasSettings] = field(default_factory=list)
    cache: CacheSettings = field(default_factory=CacheSettings)
    #: Providers, rate limits, audit log; no providers = auth off (loopback only).
    auth: AuthSettings = field(default_factory=AuthSettings)
    #: Request limits per model (422) and slow-client timeouts.
    limits: LimitSettings = field(default_factory=LimitSettings)
    #: Browser origins allowed to call the API (CORS); none by default.
    cors: CorsSettings = field(default_factory=CorsSettings)
    #: The OpenAI Files and Batch API: data directory, limits, retries, quotas, expiry.
    batches: BatchSettings = field(default_factory=BatchSettings)
    #: One process (``local``, the default) or a Ray cluster; a shared store for rate limits.
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: The operators' web console at ``/ui``.
    ui: UiSettings = field(default_factory=UiSettings)


class ModelSpec(Struct, frozen=True, kw_only=True):
    """A validated model version entry, its options converted by its backend."""

    name: str
    version: str
    backend: type[Backend]
    source: str
    task: Task | None
    options: Any
    active: bool
    required: bool
    batching: BatchingSettings
    config_path: str
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    probe_interval_s: float | None = None
    load: Literal["startup", "on_demand"] = "startup"
    keep_alive_s: float = 300.0
    pinned: bool = False
    placement: Placement = field(default_factory=Placement)

    @property
    def on_demand(self) -> bool:
        return self.load == "on_demand"


def cache_dir_of(settings: Settings) -> Path:
    """Where sources are prepared: ``cache_dir``, else the user cache directory."""
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    return Path(platformdirs.user_cache_dir("modelyard"))


def decode_settings(
    raw: Mapping[str, Any] | bytes | str, *, env: Mapping[str, str] | None = None
) -> Settings:
    """Decode TOML text (or an already parsed table) plus env overrides into Settings."""
    if isinstance(raw, bytes | str):
        try:
            table: dict[str, Any] = tomllib.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from None
    else:
        table = dict(raw)
    _apply_env(table, os.environ if env is None else env)
    try:
        return msgspec.convert(table, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_path_first(str(exc))) from None


def load_settings(path: str | Path | None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Read and decode a config file; None means an empty config (the caller may add demos)."""
    if path is None:
        return decode_settings({}, env=env)
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    return anchor_sources(decode_settings(text, env=env), p.resolve().parent)


def anchor_sources(settings: Settings, base: Path) -> Settings:
    """Relative local model sources resolve against ``base`` (the config file's directory),
    not the working directory; ``scheme:`` sources are left to their scheme."""
    models = [
        msgspec.structs.replace(m, source=_anchored(m.source, base)) for m in settings.models
    ]
    return msgspec.structs.replace(settings, models=models)


def _anchored(source: str, base: Path) -> str:
    scheme, sep, rest = source.partition(":")
    if sep and len(scheme) > 1 and scheme != "file":
        return source  # pypi:, demo:, hf:, https:, ... (one letter is a Windows drive)
    local = rest if sep and scheme == "file" else source
    path = Path(local).expanduser()
    if path.is_absolute():
        return source
    return str(base / path)


def resolve_models(
    settings: Settings,
    backends: Mapping[str, type[Backend]],
    *,
    unavailable: Mapping[str, str] | None = None,
) -> list[ModelSpec]:
    """Check every model entry against the installed backends and convert its options."""
    specs: list[ModelSpec] = []
    seen: set[tuple[str, str]] = set()
    active_of: dict[str, int] = {}
    for i, entry in enumerate(settings.models):
        where = f"$.models[{i}]"
        cls = backends.get(entry.backend)
        if cls is None:
            installed = ", ".join(sorted(backends)) or "none"
            broken = "; ".join(f"{name} ({why})" for name, why in (unavailable or {}).items())
            raise ConfigError(
                f"{where}.backend: unknown backend {entry.backend!r}; installed: {installed}"
                + (f"; plugins that did not load: {broken}" if broken else "")
            )
        if (entry.name, entry.version) in seen:
            raise ConfigError(
                f"{where}.version: {entry.name!r} version {entry.version!r} listed twice"
            )
        seen.add((entry.name, entry.version))
        if entry.task is not None and entry.task not in cls.tasks:
            served = ", ".join(sorted(cls.tasks))
            raise ConfigError(
                f"{where}.task: backend {entry.backend!r} cannot serve {entry.task.value!r}; "
                f"it serves: {served}"
            )
        if entry.active:
            if entry.name in active_of:
                raise ConfigError(
                    f"{where}.active: {entry.name!r} already has an active version "
                    f"($.models[{active_of[entry.name]}])"
                )
            active_of[entry.name] = i
        try:
            options = msgspec.convert(entry.options, cls.options_type)
        except msgspec.ValidationError as exc:
            raise ConfigError(_path_first(str(exc), prefix=f"{where}.options")) from None
        specs.append(
            ModelSpec(
                name=entry.name,
                version=entry.version,
                backend=cls,
                source=with_pin(entry.source, entry.sha256, f"{where}.sha256"),
                task=entry.task,
                options=options,
                active=bool(entry.active),
                required=entry.required,
                batching=entry.batching,
                config_path=where,
                breaker=entry.breaker,
                probe=entry.probe,
                probe_interval_s=entry.probe_interval_s,
                load=entry.load,
                keep_alive_s=entry.keep_alive_s,
                pinned=entry.pinned,
                placement=Placement(
                    replicas=entry.replicas, autoscaling=entry.autoscaling,
                    ray_actor_options=entry.ray_actor_options,
                ),
            )
        )
    # A name with no version marked active serves its first listed version.
    first_of: dict[str, int] = {}
    for i, spec in enumerate(specs):
        first_of.setdefault(spec.name, i)
    for name, i in first_of.items():
        if name not in active_of:
            specs[i] = msgspec.structs.replace(specs[i], active=True)
    return specs


def _apply_env(table: dict[str, Any], env: Mapping[str, str]) -> None:
    """``MODELYARD_SERVER__PORT=9000`` sets ``server.port``; values parse as TOML when they can."""
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in RESERVED_ENV:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        _check_env_path(key, path)
        node = table
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {'.'.join(path)} does not name a setting")
            node = child
        node[path[-1]] = _parse_env_value(value)


def _check_env_path(key: str, path: list[str]) -> None:
    """Name the variable when it names no setting; msgspec alone would blame the config file."""
    node: Any = Settings
    for i, part in enumerate(path):
        if typing.get_origin(node) is dict:
            return  # a free-form table: its owner validates it
        fields = (
            {f.encode_name: f.type for f in msgspec.structs.fields(node)}
            if isinstance(node, type) and issubclass(node, Struct)
            else {}
        )
        if part not in fields:
            raise ConfigError(f"{key}: {'.'.join(path[: i + 1])} does not name a setting")
        node = fields[part]


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


_AT_PATH = re.compile(r"^(?P<msg>.*) - at `(?P<path>\$[^`]*)`$", re.DOTALL)


def _path_first(message: str, prefix: str = "$") -> str:
    """msgspec says 'Problem - at `$.a.b`'; we say '$.a.b: Problem' (with ``$`` re-rooted)."""
    # msgspec's message layout is documented and stable; this only reorders it.
    match = _AT_PATH.match(message)
    path, msg = (prefix, message) if match is None else (prefix + match["path"][1:], match["msg"])
    msg = msg.replace("Object contains unknown field", "unknown field")
    return f"{path}: {msg}"
