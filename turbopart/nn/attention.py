"""Attention dispatch: every attention in turbopart goes through here (PyTorch SDPA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
