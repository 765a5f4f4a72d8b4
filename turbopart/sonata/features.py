"""Per-point Sonata features: the official ``get_feat`` path (spec p3sam §2.5, §3, §3.6).

``get_feat`` (P3-SAM) and ``SonataFeatureExtractor.forward`` (X-Part conditioner, spec xpart
§4.4) both do: transform (CenterShift, GridSample, colour 1/255, feat = [coord, colour,
normal]) → PTv3 encoder → concatenate the stage outputs back to stage-0 voxels → a head MLP
per voxel → gather to the input points with the GridSample inverse.  :func:`point_features`
does all of it on one device; the random decisions (voxel representatives, curve-order
shuffles) are explicit arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..runtime.precision import Numerics, compute_dtype
from .model import Sonata
from .structure import StagePlan, build_plan
from .transform import SonataInput, as_tensor, prepare_input


@dataclass
class SonataFeatures:
    point_feat: torch.Tensor      # [N, C_out] per input point
    voxel_feat: torch.Tensor      # [M0, C_out] per stage-0 voxel
    inverse: torch.Tensor         # [N] int64: input point -> stage-0 voxel row
    shifted_points: torch.Tensor  # [N, 3] the input points after CenterShift
    debug: dict[str, torch.Tensor] = field(default_factory=dict)


def draw_perms(n_stages: int, n_orders: int, shuffle: bool,
               generator: torch.Generator | None) -> list[list[int]]:
    """The official shuffles: ``torch.randperm(n_orders)`` once per stage, or identities."""
    if not shuffle:
        return [list(range(n_orders)) for _ in range(n_stages)]
    if generator is None:  # never the hidden global generator
        generator = torch.Generator().manual_seed(0)
    return [torch.randperm(n_orders, generator=generator, device=generator.device).tolist()
            for _ in range(n_stages)]


def _device_of(sonata: Sonata, points) -> torch.device:
    try:
        dev = sonata.device
    except StopIteration:
        dev = None
    if dev is not None and dev.type != "meta":
        return dev
    if isinstance(points, torch.Tensor):
        return points.device
    return torch.device("cpu")


def _head_dtype(head: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in head.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


@torch.no_grad()
def point_features(sonata: Sonata, points, normals, *, head: nn.Module | None = None,
                   numerics: Numerics | str = "fast",
                   voxel_choice: torch.Tensor | None = None,
                   perms: Sequence[torch.Tensor] | None = None,
                   generator: torch.Generator | None = None,
                   debug: bool = False) -> SonataFeatures:
    """Sonata features of a point cloud, per input point (official ``get_feat``).

    ``points``/``normals``: [N, 3] (float64 or float32 tensors or NumPy arrays).  The work runs
    on the model's device (the points' device for a model on ``meta``).

    * ``head``: applied per voxel to the multi-scale feature (P3-SAM's ``mlp``, the
      conditioner's seg-feature MLP); None returns the sum(enc_channels) feature.
    * ``voxel_choice``: [M0] representative point of every voxel, voxels in ascending
      unsigned FNV-64 key order (golden ``rng.gridsample_index``); None draws one per voxel
      with ``generator``.
    * ``perms``: the per-stage curve permutations (golden ``rng.shuffle_orders_perm.*``);
      None draws ``torch.randperm`` with ``generator`` when ``shuffle_orders`` is on.
    * ``generator``: a ``torch.Generator`` for the draws above (the permutations first, so a
      CPU generator seeded with s gives the official CLI's shuffles after
      ``torch.manual_seed(s)``; then the voxel representatives); None uses a fresh CPU
      generator seeded with 0 (deterministic, never the global one).

    Output dtype: fp32 in ``exact`` and on the CPU; the compute dtype (bf16) in ``fast`` on
    CUDA, or the head's output dtype.  ``shifted_points`` keep the input dtype (the official
    in-place CenterShift side effect, returned instead of applied).
    """
    numerics = Numerics.parse(numerics)
    cfg = sonata.config
    dev = _device_of(sonata, points)
    if generator is None and (voxel_choice is None or (perms is None and cfg.shuffle_orders)):
        generator = torch.Generator().manual_seed(0)
    # Shuffles first: a CPU generator seeded like the official CLI (torch.manual_seed(seed)
    # right before get_feat) then gives the official permutations.
    if perms is None:
        perm_list = draw_perms(cfg.num_stages, len(cfg.order), cfg.shuffle_orders, generator)
    else:
        perm_list = [as_tensor(p).reshape(-1).tolist() for p in perms]
    inp = prepare_input(points, normals, grid_size=cfg.grid_size, voxel_choice=voxel_choice,
                        generator=generator, device=dev)
    ct = compute_dtype(numerics, dev)
    plans = build_plan(inp.grid_coord, cfg, perm_list, ct)
    enc = sonata(inp.feat, plans, numerics, debug=debug)
    feat = sonata.multiscale(enc.feats, plans, ct)
    if head is not None:
        voxel = head(feat.to(_head_dtype(head, ct)))
    else:
        voxel = feat
    point = voxel.index_select(0, inp.inverse)
    dbg: dict[str, torch.Tensor] = {}
    if debug:
        dbg = _debug_outputs(inp, plans, enc.feats, enc.debug, feat)
    return SonataFeatures(point, voxel, inp.inverse, inp.shifted_points, dbg)


def _debug_outputs(inp: SonataInput, plans: list[StagePlan], feats, enc_dbg: dict,
                   multiscale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Intermediates named like the golden ``sonata`` case (without ``output.``)."""
    d: dict[str, torch.Tensor] = {
        "transform.coord": inp.coord, "transform.grid_coord": inp.grid_coord,
        "transform.color": inp.color, "transform.feat": inp.feat,
        "transform.inverse": inp.inverse, "transform.offset": inp.offset,
        "transform.index": inp.index,
    }
    d.update(enc_dbg)
    coord = inp.coord
    for s, plan in enumerate(plans):
        if s > 0:
            # Official segment mean of the children's coords (unused by any feature).
            acc = torch.zeros(plan.n, 3, dtype=torch.float32, device=coord.device)
            acc.index_add_(0, plan.pooling_inverse, coord)
            coord = acc / plan.pooling_counts[:, None].to(torch.float32)
            d[f"stage{s}.pooling_inverse"] = plan.pooling_inverse
        d[f"stage{s}.coord"] = coord
        d[f"stage{s}.grid_coord"] = plan.grid_coord
        d[f"stage{s}.serialized_code"] = plan.code
        d[f"stage{s}.serialized_order"] = plan.order
        d[f"stage{s}.perm"] = torch.tensor(plan.perm, dtype=torch.int64)
        d[f"stage{s}.feat"] = feats[s]
    d["multiscale"] = multiscale
    d["feat_per_input_point"] = multiscale.index_select(0, inp.inverse)
    d["points_after_get_feat"] = inp.shifted_points
    return d
