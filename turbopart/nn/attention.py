"""Attention dispatch: every attention in turbopart goes through here (PyTorch SDPA).

:func:`backend_context` pins PyTorch's SDPA backend for a region (``"auto"``: PyTorch's own
choice; ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``: that backend first, the others
after it, so an unsupported input still runs).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

#: Backend names accepted by :func:`backend_context`.
BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: float | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over [..., heads, tokens, head_dim] tensors, no mask.

    ``dtype`` casts q/k/v first (the official Sonata flash path runs in fp16); the result
    comes back in the dtype of ``q`` as given.
    """
    out_dtype = q.dtype
    if dtype is not None and dtype != q.dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # CPU kernels for half types are slow or missing: compute in fp32, round once,
        # which is what a fused GPU kernel with fp32 accumulation returns.
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        return out.to(q.dtype).to(out_dtype)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.to(out_dtype)


def _order(name: str) -> list:
    from torch.nn.attention import SDPBackend
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    rest = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [first] + [b for b in rest if b != first]


def backend_context(name: str | None):
    """A context manager that makes SDPA try backend ``name`` first (``None``/``"auto"``:
    no change).  Where PyTorch cannot set a priority order, only that backend is allowed."""
    if name is None or name == "auto":
        return contextlib.nullcontext()
    if name not in BACKENDS:
        raise ValueError(f"SDPA backend must be one of {BACKENDS}, got {name!r}")
    from torch.nn.attention import sdpa_kernel
    try:
        return sdpa_kernel(_order(name), set_priority=True)
    except TypeError:  # PyTorch without priorities: that backend only
        return sdpa_kernel(_order(name)[:1])
