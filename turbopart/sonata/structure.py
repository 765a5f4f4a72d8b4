"""The integer skeleton of one Sonata forward, computed before any feature work.

Everything the PTv3 encoder does that depends only on voxel coordinates (not on features) is
planned here, stage by stage, in one pass at the start of the forward:

* per stage: voxel grid coordinates, serialization depth, the codes/orders/inverses of the
  curves (permuted by that stage's shuffle, spec p3sam §2.6-2.7), the 27-neighbour table of
  the submanifold convolution (§1.5, one per stage like spconv's ``indice_key``), and the
  attention patch gather/scatter indices of every curve a block uses (§2.8);
* between stages: the grid pooling clusters (``grid_coord // stride``, unique rows in
  lexicographic order, §3.4) and the child→cluster ``pooling_inverse``.

The only host synchronisations of a forward are here: the number of voxels of each stage
(output sizes of ``unique``) and the stage-0 maximum coordinate (the depth of every stage
follows from it, since max(g // s) = max(g) // s).  The feature pass then runs without any
host round-trip.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SonataConfig
from .serialization import depth_for, serialize
from .sparse_conv import build_neighbour_table, conv_rows_per_chunk, neighbour_pairs


@dataclass
class AttentionPatches:
    """Patch layout of one curve: gather rows into [P, K] slots, read voxel outputs back."""
    gather: torch.Tensor     # [P*K] voxel row of every slot (official ``order[pad]``)
    out_patch: torch.Tensor  # [n] patch of the slot that owns voxel v
    out_pos: torch.Tensor    # [n] position in that patch
    patches: int
    size: int


def patch_partition(n: int, patch_size: int, device=None) -> tuple[torch.Tensor, int, int]:
    """Slot → serialized position map of the official padding (spec p3sam §2.8).

    One cloud: the patch size is min(n, patch_size) (the non-flash rule; the flash path has
    the same partition for one cloud).  With q = ceil(n / K) patches, slots 0..(q-1)K-1 hold
    positions 0..(q-1)K-1; the last patch holds the last K positions: its first r = n mod K
    slots hold positions (q-1)K.. n-1, and its remaining slots repeat the positions
    (q-2)K+r .. (q-1)K-1 (the official ``pad`` array).  Position i < n reads its output from
    slot i (the official ``unpad`` is the identity for one cloud).
    Returns (pad [q*K], q, K).
    """
    if n <= 0:
        raise ValueError("cannot partition an empty stage")
    k = min(n, patch_size)
    q = -(-n // k)
    pad = torch.arange(q * k, device=device)
    r = n % k
    if r:
        pad[(q - 1) * k + r:] = pad[(q - 2) * k + r:(q - 1) * k].clone()
    return pad, q, k


@dataclass
class StagePlan:
    stage: int
    n: int
    grid_coord: torch.Tensor          # [n, 3] int64
    depth: int
    perm: list[int]
    code: torch.Tensor                # [k, n] codes of the permuted curve list
    order: torch.Tensor               # [k, n]
    inverse: torch.Tensor             # [k, n]
    neighbours: torch.Tensor          # [n, 27]
    conv_rows: int                    # rows per sparse-conv chunk (memory budget)
    pooling_inverse: torch.Tensor | None = None   # [n_prev] child -> cluster (s >= 1)
    pooling_counts: torch.Tensor | None = None    # [n] children per cluster (s >= 1)
    conv_pairs: list | None = None    # per-offset pair lists (CPU formulation), else None
    patches: dict[int, AttentionPatches] = field(default_factory=dict)  # by curve position


def _attention_patches(order: torch.Tensor, inverse: torch.Tensor, patch_size: int
                       ) -> AttentionPatches:
    n = order.shape[0]
    pad, q, k = patch_partition(n, patch_size, order.device)
    gather = order[pad]
    slot = inverse  # position i reads slot i (identity unpad for one cloud)
    return AttentionPatches(gather, torch.div(slot, k, rounding_mode="floor"), slot % k, q, k)


def grid_pool(grid_coord: torch.Tensor, stride: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official GridPooling clusters: unique rows of grid_coord // stride, lexicographic.

    Returns (cluster grid coords [m, 3], child → cluster [n], children per cluster [m]).
    Rows are packed into one int64 (16 bits per axis, coordinates < 2^16) so a 1-D unique
    gives the same lexicographic (x, y, z) order as ``torch.unique(dim=0)``.
    """
    g = torch.div(grid_coord.long(), stride, rounding_mode="floor")
    key = (g[:, 0] << 32) | (g[:, 1] << 16) | g[:, 2]
    uniq, inverse, counts = torch.unique(key, sorted=True, return_inverse=True,
                                         return_counts=True)
    coords = torch.stack([uniq >> 32, (uniq >> 16) & 0xFFFF, uniq & 0xFFFF], dim=1)
    return coords, inverse, counts


def build_plan(grid_coord: torch.Tensor, config: SonataConfig, perms,
               compute_dtype: torch.dtype = torch.float32,
               max_coord: int | None = None, conv_pairs: bool | None = None
               ) -> list[StagePlan]:
    """Plan every stage of the encoder from the stage-0 voxel coordinates.

    ``perms``: one permutation of ``config.order`` per stage (the official shuffles, drawn at
    the embedding and at every pooling); a permutation is a sequence of ints.  Official
    quirk reproduced: ``Point.serialization`` stores the order list it was *given* (not the
    shuffled one) and GridPooling passes that list on, so every stage's permutation indexes
    the original ``config.order``, never the previous stage's shuffled list.
    ``conv_pairs``: use the per-offset sparse-conv formulation (default: on the CPU only).
    """
    dev = grid_coord.device
    if conv_pairs is None:
        conv_pairs = dev.type == "cpu"
    k = len(config.order)
    if len(perms) != config.num_stages:
        raise ValueError(f"need {config.num_stages} order permutations, got {len(perms)}")
    if max_coord is None:
        max_coord = int(grid_coord.max())  # host sync (one per forward)
    plans: list[StagePlan] = []
    g = grid_coord.long()
    pool_inv = pool_cnt = None
    for s in range(config.num_stages):
        if s > 0:
            stride = config.stride[s - 1]
            g, pool_inv, pool_cnt = grid_pool(g, stride)
            max_coord //= stride
        n = g.shape[0]
        depth = depth_for(max_coord)
        if depth > 16:
            raise ValueError(f"stage {s}: grid coordinates up to {max_coord} exceed the "
                             "official 16-bit serialization limit")
        perm = [int(i) for i in perms[s]]
        if sorted(perm) != list(range(k)):
            raise ValueError(f"stage {s}: {perm} is not a permutation of {k} orders")
        code, order, inverse = serialize(g, depth, config.order, perm)
        c = config.enc_channels[s]
        table = build_neighbour_table(g)
        plan = StagePlan(
            stage=s, n=n, grid_coord=g, depth=depth, perm=perm, code=code, order=order,
            inverse=inverse, neighbours=table,
            conv_rows=conv_rows_per_chunk(n, c, c, compute_dtype, dev),
            pooling_inverse=pool_inv, pooling_counts=pool_cnt,
            conv_pairs=neighbour_pairs(table) if conv_pairs else None)
        for j in sorted({i % k for i in range(config.enc_depths[s])}):
            plan.patches[j] = _attention_patches(order[j], inverse[j],
                                                 config.enc_patch_size[s])
        plans.append(plan)
    return plans
