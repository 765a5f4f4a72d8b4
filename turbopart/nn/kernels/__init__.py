"""Triton kernels of the fast paths (CUDA; the Triton interpreter runs them on the CPU).

Every kernel here has a PyTorch formulation at its call site that computes the same function;
callers fall back to it (with a warning) when Triton is missing or a kernel fails.
"""
from __future__ import annotations

import os

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
