"""Render the modelyard plugin template into a new backend package for one task.

    python plugin-template/render.py --name mybackend --task embeddings --out ../modelyard-mybackend

The package holds a working example backend for the task, a toy model, and tests that are the
conformance kit (``modelyard.testing.BackendConformance``) configured for it.
"""

from __future__ import annotations

import argparse
import re
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "template"
#: task -> the directory under ``tasks/`` holding its backend, tests and toy model
TASKS = {
    "embeddings": "embeddings",
    "classification": "classification",
    "chat": "generation",
    "completion": "generation",
    "tensor": "tensor",
}


def render(name: str, out: Path, task: str = "completion") -> Path:
    """Copy the common files and the task's files to ``out``, substituting ``$name``,
    ``$package``, ``$dist``, ``$task`` and ``$task_member`` in ``*.tmpl`` files."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{1,40}", name):
        raise SystemExit(f"plugin name {name!r}: use lowercase letters, digits and _")
    if task not in TASKS:
        raise SystemExit(f"task {task!r}: choose one of {', '.join(TASKS)}")
    values = {
        "name": name,
        "package": f"modelyard_{name}",
        "dist": f"modelyard-{name.replace('_', '-')}",
        "task": task,
        "task_member": task.upper(),
    }
    for root in (TEMPLATE, HERE / "tasks" / TASKS[task]):
        for src in sorted(root.rglob("*")):
            if src.is_dir() or "__pycache__" in src.parts:
                continue
            rel = str(src.relative_to(root)).replace("__package__", values["package"])
            dest = out / rel.removesuffix(".tmpl")
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = src.read_text()
            if src.suffix == ".tmpl":
                text = string.Template(text).substitute(values)
            dest.write_text(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--name", required=True, help="backend name used in config (backend = NAME)"
    )
    parser.add_argument(
        "--task", default="completion", choices=sorted(TASKS),
        help="the task the example backend serves (default: completion)",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to create")
    args = parser.parse_args()
    path = render(args.name, args.out, args.task)
    print(f"rendered {args.task} plugin {args.name!r} into {path}")


if __name__ == "__main__":
    main()
