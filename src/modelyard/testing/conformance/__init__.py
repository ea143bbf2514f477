"""Contract tests a plugin author subclasses in their own tests, one class per plugin kind.

```python
from modelyard import Task
from modelyard.testing import BackendConformance

class TestMyBackend(BackendConformance):
    entry_point = "mybackend"          # [project.entry-points.modelyard] in pyproject.toml
    tasks = (Task.EMBEDDINGS,)
    source = "tests/model"
    embedding_dim = 384
```

Every check fails with a message that says what is wrong ("returned 1 embedding for 2
inputs", "infer blocked the event loop for 230 ms"). modelyard runs the same classes on its
own plugins. Needs pytest (``pip install 'modelyard[test]'``).
"""

from __future__ import annotations

from modelyard.testing.conformance._auth import AuthProviderConformance
from modelyard.testing.conformance._backend import BackendConformance
from modelyard.testing.conformance._cache import CacheTierConformance
from modelyard.testing.conformance._common import ConformanceError
from modelyard.testing.conformance._sources import SourceSchemeConformance

__all__ = [
    "AuthProviderConformance",
    "BackendConformance",
    "CacheTierConformance",
    "ConformanceError",
    "SourceSchemeConformance",
]
