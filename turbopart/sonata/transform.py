"""The Sonata input transform of ``get_feat`` (spec p3sam §2.5), on the device.

Official pipeline (``sonata.transform.default()``): CenterShift(apply_z) → GridSample(0.005,
fnv, train, grid_coord, inverse) → NormalizeColor → ToTensor → Collect(feat = coord, color,
normal).  Reproduced here with whole-tensor torch ops:

* CenterShift subtracts ((xmin+xmax)/2, (ymin+ymax)/2, zmin) in the dtype of the points
  (NumPy does it in float64 for P3-SAM's float64 points and in float32 for the conditioner's
  float32 points).  The official code shifts the caller's array in place; we return the
  shifted copy (``shifted_points``) instead of mutating the input.
* GridSample: g = floor(shifted / grid_size) in float64 (NumPy promotes the division by
  ``np.array(grid_size)`` to float64 even for float32 points), minus its per-axis minimum;
  FNV-64 hash (multiply-then-xor per axis on whole 64-bit words) in wrapping int64
  arithmetic; voxels in ascending *unsigned* key order (int64 order after flipping the sign
  bit).  One representative point per voxel: given (``voxel_choice``, the official random
  draw recorded by the golden data) or drawn from an explicit ``torch.Generator``.
* Colour is the constant 1/255 (``get_feat`` passes ones, NormalizeColor divides by 255).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FNV_OFFSET = 14695981039346656037
FNV_PRIME = 1099511628211
_SIGN = -(1 << 63)


def _as_signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def as_tensor(x, device: torch.device | None = None) -> torch.Tensor:
    """numpy or tensor → tensor (no copy when already on ``device``)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if device is not None and x.device != torch.device(device):
        x = x.to(device, non_blocking=True)
    return x


def center_shift(points: torch.Tensor) -> torch.Tensor:
    """Official CenterShift(apply_z=True): subtract ((xmin+xmax)/2, (ymin+ymax)/2, zmin).

    Computed in the dtype of ``points`` like the NumPy original.  Returns a new tensor.
    """
    mn = points.amin(0)
    mx = points.amax(0)
    shift = (mn + mx) / 2
    shift = torch.cat([shift[:2], mn[2:3]])
    return points - shift


def voxel_coords(shifted: torch.Tensor, grid_size: float) -> torch.Tensor:
    """int64 grid coordinates: floor(p / grid_size) in float64, minus the per-axis minimum."""
    g = torch.floor(shifted.double() / grid_size).long()
    return g - g.amin(0)


def fnv64(grid_coord: torch.Tensor) -> torch.Tensor:
    """Official ``fnv_hash_vec`` as int64 (bit pattern of the uint64 key), wrapping arithmetic."""
    g = grid_coord.long()
    h = torch.full((g.shape[0],), _as_signed64(FNV_OFFSET), dtype=torch.int64, device=g.device)
    for j in range(g.shape[1]):
        h = h * FNV_PRIME  # int64 multiply wraps modulo 2^64 (two's complement)
        h = h ^ g[:, j]
    return h


@dataclass
class GridSampleResult:
    grid_coord: torch.Tensor   # [M, 3] int64 voxel coordinates (of the representatives)
    index: torch.Tensor        # [M] int64 representative point of every voxel
    inverse: torch.Tensor      # [N] int64 point -> voxel row
    counts: torch.Tensor       # [M] int64 points per voxel
    sort_index: torch.Tensor   # [N] points grouped by voxel (key order, stable)


def grid_sample(shifted: torch.Tensor, grid_size: float, *,
                voxel_choice: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> GridSampleResult:
    """Official GridSample (mode "train") on the device.

    Voxels come in ascending unsigned FNV-64 key order (NumPy ``unique`` of the uint64
    keys).  ``voxel_choice`` [M] gives the representative point of every voxel (golden
    ``rng.gridsample_index``); otherwise one point per voxel is drawn uniformly with
    ``generator`` (deterministic given the generator).
    """
    dev = shifted.device
    g_all = voxel_coords(shifted, grid_size)
    key = fnv64(g_all) ^ _SIGN  # unsigned order == signed order after flipping the sign bit
    skey, sort_index = torch.sort(key, stable=True)
    n = skey.shape[0]
    new = torch.ones(n, dtype=torch.bool, device=dev)
    if n > 1:
        new[1:] = skey[1:] != skey[:-1]
    vox_sorted = torch.cumsum(new, 0) - 1
    inverse = torch.empty_like(vox_sorted)
    inverse[sort_index] = vox_sorted
    starts = torch.nonzero(new).squeeze(1)  # host sync: number of voxels
    m = starts.shape[0]
    counts = torch.diff(starts, append=torch.tensor([n], device=dev))
    if voxel_choice is not None:
        index = as_tensor(voxel_choice, dev).long().reshape(-1)
        if index.shape[0] != m:
            raise ValueError(f"voxel_choice has {index.shape[0]} entries for {m} voxels")
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        u = torch.rand(m, generator=generator, device=generator.device,
                       dtype=torch.float64).to(dev)
        pick = starts + (u * counts).long().minimum(counts - 1)
        index = sort_index[pick]
    return GridSampleResult(g_all[index], index, inverse, counts, sort_index)


@dataclass
class SonataInput:
    """Output of the official transform (the ``Collect`` dict), all on one device."""
    coord: torch.Tensor        # [M, 3] float32 centre-shifted representative coordinates
    grid_coord: torch.Tensor   # [M, 3] int64
    color: torch.Tensor        # [M, 3] float32 (1/255)
    feat: torch.Tensor         # [M, 9] float32: coord, color, normal
    inverse: torch.Tensor      # [N] int64 input point -> voxel row
    offset: torch.Tensor       # [1] int64 = [M]
    shifted_points: torch.Tensor  # [N, 3] the input after CenterShift (input dtype)
    index: torch.Tensor        # [M] representative point per voxel


def prepare_input(points, normals, *, grid_size: float = 0.005,
                  voxel_choice: torch.Tensor | None = None,
                  generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> SonataInput:
    """``get_feat``'s transform: CenterShift → GridSample → colour 1/255 → feat [M, 9]."""
    pts = as_tensor(points, device)
    dev = pts.device
    nrm = as_tensor(normals, dev)
    if pts.dim() != 2 or pts.shape[1] != 3 or nrm.shape != pts.shape:
        raise ValueError(f"points/normals must be [N, 3] (got {tuple(pts.shape)}, "
                         f"{tuple(nrm.shape)})")
    if not pts.is_floating_point():
        pts = pts.double()
    shifted = center_shift(pts)
    gs = grid_sample(shifted, grid_size, voxel_choice=voxel_choice, generator=generator)
    coord = shifted[gs.index].float()
    m = coord.shape[0]
    color = torch.full((m, 3), 1.0 / 255.0, dtype=torch.float32, device=dev)
    feat = torch.cat([coord, color, nrm[gs.index].float()], dim=1)
    offset = torch.tensor([m], dtype=torch.int64, device=dev)
    return SonataInput(coord, gs.grid_coord, color, feat, gs.inverse, offset, shifted, gs.index)
