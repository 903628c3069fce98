"""l2ul: make a trained image classifier forget, or relabel, specific images without retraining.

The library API; the ``l2ul`` command line is a thin layer over these functions. Names are
imported lazily so that ``l2ul --help`` and shell completion do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "forget": "workflow",
    "relabel": "workflow",
    "evaluate_checkpoint": "workflow",
    "load_model": "models",
    "read_checkpoint": "checkpoint",
    "write_checkpoint": "checkpoint",
    "unlearn": "unlearn",
    "AttackConfig": "config",
    "UnlearnConfig": "config",
    "L2ULError": "errors",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'l2ul_cli' has no attribute {name!r}")
