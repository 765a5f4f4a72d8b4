"""Farthest-point sampling on the device, batched, with the official tie rules.

Two official flavours:

* ``fpsample.fps_sampling`` (P3-SAM prompts): float32 squared distances, running minimum
  starting at +inf, start index given, ties go to the **last** index.
* ``torch_cluster.fps`` (ShapeVAE encoders): running minimum starting at 5e4, start index
  floor(u·n), ties go to the **first** index.

On CUDA one persistent Triton kernel does all picks (:mod:`.fps_triton`); elsewhere the loop
runs ``n_samples`` iterations of a few whole-tensor kernels and never syncs with the host.
"""
from __future__ import annotations

import torch

from ..runtime.switches import switch
from . import fps_triton

#: The one-kernel Triton path on CUDA (``TURBOPART_FPS_TRITON=0`` forces the PyTorch loop).
USE_TRITON = switch("TURBOPART_FPS_TRITON")


def farthest_point_sampling(points: torch.Tensor, n_samples: int, start: torch.Tensor | int,
                            *, ties: str = "first", init_dist: float = float("inf")
                            ) -> torch.Tensor:
    """Indices [B, n_samples] (or [n_samples] for unbatched input) of FPS picks.

    ``points``: [N, 3] or [B, N, 3] (any float dtype; distances in float32).
    ``start``: start index per batch item ([B] tensor or an int for all).
    ``ties``: ``"first"`` or ``"last"`` index among equal maxima.
    """
    if ties not in ("first", "last"):
        raise ValueError("ties must be 'first' or 'last'")
    squeeze = points.dim() == 2
    pts = (points[None] if squeeze else points).float()
    b, n, _ = pts.shape
    if n_samples > n:
        raise ValueError(f"cannot pick {n_samples} points out of {n}")
    dev = pts.device
    cur = torch.as_tensor(start, device=dev, dtype=torch.long).reshape(-1).expand(b).clone()
    if USE_TRITON and fps_triton.available(pts):
        out = fps_triton.fps_triton(pts, n_samples, cur, ties=ties, init_dist=init_dist)
        return out[0] if squeeze else out
    out = torch.empty(b, n_samples, dtype=torch.long, device=dev)
    dist = torch.full((b, n), init_dist, dtype=torch.float32, device=dev)
    rows = torch.arange(b, device=dev)
    flip = ties == "last"
    for i in range(n_samples):
        out[:, i] = cur
        d = (pts - pts[rows, cur][:, None, :]).square().sum(-1)
        torch.minimum(dist, d, out=dist)
        if i + 1 < n_samples:
            if flip:
                cur = (n - 1) - torch.argmax(dist.flip(-1), dim=-1)
            else:
                cur = torch.argmax(dist, dim=-1)
    return out[0] if squeeze else out
