"""Triton kernels of the fast paths (CUDA; the Triton interpreter runs them on the CPU).

Every kernel here has a PyTorch formulation at its call site that computes the same function;
callers fall back to it (with a warning) when Triton is missing or a kernel fails.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

try:  # pragma: no cover - depends on the installation
    import triton  # noqa: F401  (availability probe)
    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of ``device``."""
    if not HAVE_TRITON:
        return False
    if interpreting():
        return True
    return torch.device(device).type == "cuda"


#: Kernels switched off for the process after a compile / launch failure: {name: reason}.
_DISABLED: dict[str, str] = {}


def disabled() -> dict[str, str]:
    """Kernels switched off after a failure: ``{name: reason}``."""
    return dict(_DISABLED)


def reset() -> None:
    """Forget earlier failures (benchmarks re-try every variant)."""
    _DISABLED.clear()


def run_or_fallback(name: str, fn: Callable, fallback: Callable):
    """``fn()``; on any compile / launch failure warn once, switch kernel ``name`` off for
    the process and return ``fallback()`` (also used from then on)."""
    if name in _DISABLED:
        return fallback()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any compile/launch failure → PyTorch path
        msg = f"{type(exc).__name__}: {exc}"
        _DISABLED[name] = msg[:500]
        warnings.warn(f"turbopart: Triton kernel '{name}' failed ({msg[:300]}); "
                      f"using the PyTorch path for it from now on", RuntimeWarning, stacklevel=3)
        return fallback()
