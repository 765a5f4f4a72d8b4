"""Runtime services: numerics, memory budget, profiling, loading, start-up read-ahead.

The names below are imported lazily (PEP 562): ``turbopart.runtime.prefetch`` must be
importable before torch (the CLI starts its read-ahead helper first).
"""
from __future__ import annotations

import importlib

__all__ = ["Numerics", "autocast", "compute_dtype", "param_dtypes"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".precision", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
