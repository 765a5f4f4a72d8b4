"""Farthest-point sampling replayed from a CUDA graph (same kernels, no launch overhead).

:func:`turbopart.geometry.fps.farthest_point_sampling` runs a few small kernels per pick:
4096 picks cost ~30 k kernel launches, i.e. a few hundred ms of host time for a conditioner
call while the GPU is nearly idle.  The loop has no host synchronisation, so it can be
captured once per input shape and replayed: the result is bit-identical (the same kernels
on the same inputs), only the launches disappear.

Policy: the first call of a shape runs eagerly (a one-shot process pays nothing extra); the
second call captures, later calls replay.  Any capture failure falls back to eager mode.
"""
from __future__ import annotations

import warnings

import torch

from ..geometry.fps import farthest_point_sampling


class GraphedFPS:
    """Callable like ``farthest_point_sampling(points, n, start, ties=..., init_dist=...)``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._seen: set = set()
        self._graphs: dict = {}

    def clear(self) -> None:
        self._seen.clear()
        self._graphs.clear()

    def __call__(self, points: torch.Tensor, n_samples: int, start: torch.Tensor, *,
                 ties: str = "first", init_dist: float = float("inf")) -> torch.Tensor:
        start = torch.as_tensor(start, device=points.device, dtype=torch.long).reshape(-1)
        if not (self.enabled and points.is_cuda and points.dim() == 3):
            return farthest_point_sampling(points, n_samples, start, ties=ties,
                                           init_dist=init_dist)
        start = start.expand(points.shape[0]).contiguous()
        key = (tuple(points.shape), points.dtype, points.device, int(n_samples), ties,
               float(init_dist))
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:
                self._seen.add(key)
                return farthest_point_sampling(points, n_samples, start, ties=ties,
                                               init_dist=init_dist)
            try:
                entry = self._capture(points, n_samples, start, ties, init_dist)
            except Exception as exc:  # keep working without graphs
                warnings.warn(f"CUDA-graph capture of FPS failed ({type(exc).__name__}: "
                              f"{exc}); running it eagerly")
                self.enabled = False
                return farthest_point_sampling(points, n_samples, start, ties=ties,
                                               init_dist=init_dist)
            self._graphs[key] = entry
        graph, s_points, s_start, s_out = entry
        s_points.copy_(points)
        s_start.copy_(start)
        graph.replay()
        return s_out.clone()

    @staticmethod
    def _capture(points, n_samples, start, ties, init_dist):
        s_points = points.detach().contiguous().clone()
        s_start = start.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = farthest_point_sampling(s_points, n_samples, s_start, ties=ties,
                                            init_dist=init_dist)
        return graph, s_points, s_start, s_out


#: Process-wide instance used by the conditioner.
GRAPHED_FPS = GraphedFPS()
