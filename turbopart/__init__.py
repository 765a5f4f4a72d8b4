"""turbopart: a fast, checkpoint-compatible engine for Hunyuan3D-Part.

P3-SAM segments a mesh into parts; X-Part regenerates every part as its own mesh.
The public API is imported lazily so that ``import turbopart`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

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
