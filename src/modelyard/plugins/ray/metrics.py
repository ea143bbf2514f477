"""Every replica's metrics in the ingress's scrape: renamed ``modelyard_replica_*`` and
labelled ``replica="model:version:pid"``, so one scrape of any ingress shows them all."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["relabel"]

_PREFIX = "modelyard_"
_REPLICA_PREFIX = "modelyard_replica_"


def relabel(bodies: dict[str, bytes]) -> bytes:
    """Merge the replicas' expositions, one family block per metric (Prometheus text)."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, body in sorted(bodies.items()):
        for family in text_string_to_metric_families(body.decode()):
            name = _renamed(family.name)
            help_text, kind, lines = families.setdefault(
                name, (family.documentation, family.type, [])
            )
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(
                    f'{key}="{_escape(value)}"' for key, value in sorted(labels.items())
                )
                lines.append(f"{_renamed(sample.name)}{{{rendered}}} {_number(sample.value)}")
    out: list[str] = []
    for name, (help_text, kind, lines) in families.items():
        out.append(f"# HELP {name} {_escape_help(help_text)}")
        out.append(f"# TYPE {name} {kind if kind != 'unknown' else 'untyped'}")
        out.extend(lines)
    return ("\n".join(out) + "\n").encode() if out else b""


def _renamed(name: str) -> str:
    return _REPLICA_PREFIX + name.removeprefix(_PREFIX)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
