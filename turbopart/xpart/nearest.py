"""Nearest object point of query points, as ``argmin(torch.cdist(q, p), -1)`` without the
[K, Q, N] distance tensor.

The official conditioner (spec xpart §4.5) matches its 4096 query points per part to the
81 920 object points with ``torch.cdist`` + ``argmin``: K × 1.34 GB of fp32 distances per
call.  :func:`nearest_neighbors` computes the same thing in row chunks sized from free memory:
the same matrix-multiplication formula PyTorch's cdist uses when either side has more than
25 points (``[-2q, |q|², 1] · [p, 1, |p|²]``, then ``clamp_min(0).sqrt()``), in fp32 with TF32
off, and ``argmin`` (first index among equal minima).  Up to GEMM accumulation order it is
the official answer, ties included (the sqrt can map distinct squared distances to one value;
the first index then wins, as in cdist).
"""
from __future__ import annotations

import contextlib

import torch

from ..runtime import memory

#: cdist switches to the matrix-multiplication formula above this many rows on either side.
CDIST_MM_THRESHOLD = 25
#: Working-set bound of one distance chunk (more gives no speed, only memory pressure).
MAX_CHUNK_BYTES = 1 << 30


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """cdist under autocast runs in fp32; make sure no TF32 rounding sneaks into the GEMM."""
    if device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def nearest_neighbors(queries: torch.Tensor, points: torch.Tensor, *,
                      max_rows: int | None = None, fused: bool = False) -> torch.Tensor:
    """Index [..., Q] (int64) of the nearest of ``points`` [N, 3] for every query [..., Q, 3].

    ``max_rows`` caps the query rows per chunk (default: what fits the memory budget).
    ``fused`` (``fast``): one Triton kernel without the distance matrix where Triton runs
    (:mod:`.nearest_triton`; the same formula, accumulated in a fixed order).
    """
    lead = queries.shape[:-1]
    q = queries.reshape(-1, queries.shape[-1]).float()
    p = points.float()
    n = p.shape[0]
    out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    if q.shape[0] == 0:
        return out.reshape(lead)
    if n == 0:
        raise ValueError("no points to match against")
    q_rows = queries.shape[-2] if queries.dim() >= 2 else 1
    if q_rows <= CDIST_MM_THRESHOLD and n <= CDIST_MM_THRESHOLD:
        # cdist's direct formula for tiny inputs: sqrt(sum((q - p)^2)).
        d = (q[:, None, :] - p[None, :, :]).square().sum(-1).sqrt()
        return d.argmin(-1).reshape(lead)
    pn = p.pow(2).sum(-1, keepdim=True)
    p_ = torch.cat([p, torch.ones_like(pn), pn], dim=-1)               # [N, 5]

    def chunked() -> torch.Tensor:
        p_t = p_.t()
        rows = memory.items_that_fit(4 * n + 64, q.device, cap_bytes=MAX_CHUNK_BYTES,
                                    maximum=max_rows or q.shape[0])
        with _no_tf32(q.device):
            for s in range(0, q.shape[0], rows):
                qc = q[s:s + rows]
                qn = qc.pow(2).sum(-1, keepdim=True)
                q_ = torch.cat([qc.mul(-2), qn, torch.ones_like(qn)], dim=-1)  # [r, 5]
                d = q_.matmul(p_t)
                d.clamp_min_(0).sqrt_()
                out[s:s + rows] = d.argmin(-1)
        return out
    if fused and q.is_cuda:
        from ..nn import kernels  # imports Triton: on first use, not at start-up
        if kernels.available(q.device):
            from . import nearest_triton
            return kernels.run_or_fallback(
                "nearest", lambda: nearest_triton.nearest(q, p_), chunked).reshape(lead)
    return chunked().reshape(lead)
