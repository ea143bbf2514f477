"""The operators' web console at ``/ui`` (docs/console.md).

Server-rendered page shells (Jinja templates) and a few ES modules, shipped in the wheel under
``templates/`` and ``static/`` (vendored libraries and their licences: ``static/vendor``,
listed in ``static/vendor/VENDORED.md``). No build step, no CDN.
"""

from __future__ import annotations

from modelyard.api.ui.console import Console

__all__ = ["Console"]
