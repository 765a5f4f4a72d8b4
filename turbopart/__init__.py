"""turbopart: a fast, checkpoint-compatible engine for Hunyuan3D-Part.

P3-SAM segments a mesh into parts; X-Part regenerates every part as its own mesh.
The public API is imported lazily so that ``import turbopart`` stays cheap.
"""
from __future__ import annotations

import importlib
import types

__version__ = "0.1.0"


class _LazyModule(types.ModuleType):
    """Stands for a module that is imported on its first attribute access (start-up time:
    trimesh pulls in scipy and networkx, ~0.4 s, which model loading does not need)."""

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)

    def __dir__(self):
        return dir(importlib.import_module(self.__name__))


def _lazy_import(name: str) -> types.ModuleType:
    """``name`` itself when already imported, else a :class:`_LazyModule` for it."""
    import sys
    mod = sys.modules.get(name)
    return mod if mod is not None else _LazyModule(name)

_LAZY = {
    "Numerics": "turbopart.runtime.precision",
    "segment": "turbopart.p3sam.segmenter",
    "Segmenter": "turbopart.p3sam.segmenter",
    "generate": "turbopart.xpart.pipeline",
    "XPartPipeline": "turbopart.xpart.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'turbopart' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
