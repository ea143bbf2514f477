"""Render the modelyard plugin template into a new package directory.

    python plugin-template/render.py --name mybackend --out ../modelyard-mybackend
"""

from __future__ import annotations

import argparse
import re
import string
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "template"


def render(name: str, out: Path) -> Path:
    """Copy the template to ``out``, substituting ``$name``, ``$package`` and ``$dist``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{1,40}", name):
        raise SystemExit(f"plugin name {name!r}: use lowercase letters, digits and _")
    values = {
        "name": name,
        "package": f"modelyard_{name}",
        "dist": f"modelyard-{name.replace('_', '-')}",
    }
    for src in sorted(TEMPLATE.rglob("*")):
        if src.is_dir():
            continue
        rel = str(src.relative_to(TEMPLATE)).replace("__package__", values["package"])
        dest = out / rel.removesuffix(".tmpl")
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        dest.write_text(string.Template(text).substitute(values) if src.suffix == ".tmpl" else text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--name", required=True, help="backend name used in config (backend = NAME)"
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to create")
    args = parser.parse_args()
    path = render(args.name, args.out)
    print(f"rendered plugin {args.name!r} into {path}")


if __name__ == "__main__":
    main()
