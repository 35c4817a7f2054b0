"""klmon: monitor the KL divergence between an RLHF policy and its frozen reference.

``import monitor`` stays light (numpy only); the live client and the store load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monitor.errors import InvalidInput, KlmonError

__version__ = "0.1.0"

__all__ = [
    "InvalidInput",
    "KlmonError",
    "Run",
    "__version__",
    "init",
    "sequence_kl",
    "summarize",
]

if TYPE_CHECKING:  # pragma: no cover
    from monitor.divergence import sequence_kl, summarize
    from monitor.ingest.client import Run, init

_LAZY = {
    "sequence_kl": "monitor.divergence",
    "summarize": "monitor.divergence",
    "init": "monitor.ingest.client",
    "Run": "monitor.ingest.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
