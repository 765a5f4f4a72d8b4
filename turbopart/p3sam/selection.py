"""Automatic mask selection over prompt masks, on the device (spec p3sam §5.2 steps 8–15).

Input: the best-of-3 mask of every prompt as a ``[P, N]`` bool tensor (prompt order) and
its predicted IoU.  Steps, each the official rule:

8.  sort by predicted IoU, descending, stable (equal IoUs keep prompt order);
9.  greedy "NMS": mask ``i`` joins the **first** existing cluster (creation order) whose
    representative has IoU > 0.9 with it, else it founds a cluster; IoU = |A∧B| / |A∨B|, an
    empty union gives NaN, which never passes;
10. keep clusters with more than 2 members;
11. merge by 3-D box IoU > 0.5 of the masks' point boxes (CenterShift-ed normalised points),
    greedy in creation order; **absorbed masks are discarded, not unioned** (official quirk);
12. uncovered points = not in any surviving head;
13. recovery in IoU order: a non-head mask whose coverage |m∧U|/|m| exceeds 0.7 becomes a head
    and its points leave U (an empty mask gives 0/0 = NaN: never recovered);
14. heads sorted by point count, descending, stable;
15. point labels: each final mask paints its sorted index, smaller masks last (they win).

All pairwise intersections come from one matrix product of the ``[P, N]`` 0/1 matrix with
itself (fp32 accumulation: counts < 2**24 are exact), chunked over points by the memory
budget.  Only ``P × P`` matrices and per-mask numbers go to the host, where the greedy loops
(one pass over 400 rows of a 400×400 matrix) run.  Recovery needs one matrix–vector product
per recovered mask, not one per visited mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..runtime import memory


@dataclass
class SelectionConfig:
    nms_iou: float = 0.9
    min_cluster_members: int = 3
    box_merge_iou: float = 0.5
    recovery_coverage: float = 0.7


@dataclass
class Selection:
    """Everything the selection decided; prompt indices are IoU-sorted positions ``s``
    (``order[s]`` = prompt index) unless named otherwise."""

    order: np.ndarray               # [P] prompt index at sorted position s
    counts: np.ndarray              # [P] mask sizes, sorted order
    rep_of: np.ndarray              # [P] representative (sorted pos) of the cluster s joined
    representatives: np.ndarray     # [C] creation order
    cluster_size: np.ndarray        # [C]
    kept: np.ndarray                # [K] representatives with > 2 members
    heads: np.ndarray               # [H] merge heads (creation order)
    head_of: np.ndarray             # [K] head absorbing kept[k] (itself for heads)
    evaluated_pairs: np.ndarray     # [E, 2] (cur, tar) in loop order
    box_iou: np.ndarray             # [E] float64
    coverage: np.ndarray            # [P] float64, NaN where not visited
    visited: np.ndarray             # [P] bool
    added: np.ndarray               # [R] recovered masks in order
    uncovered: np.ndarray           # [N] uint8: 0 head, 1 recovered, 2 left uncovered
    final: np.ndarray               # [Q] final masks (sorted positions), largest first
    final_area: np.ndarray          # [Q] int64
    point_labels: torch.Tensor      # [N] int64 on the device: sorted pos of painter, -1
    extra: dict = field(default_factory=dict)


def sort_by_iou(iou: torch.Tensor) -> torch.Tensor:
    """Prompt indices by predicted IoU, descending; equal IoUs keep prompt order (Python's
    stable ``sorted(..., reverse=True)``)."""
    iou = torch.as_tensor(iou)
    # stable ascending sort of -iou keeps the original order of equal values
    return torch.sort(-iou.float(), stable=True).indices


#: Cap of the transient working memory of the selection (bytes); the budget is otherwise
#: a fraction of the free device memory (``runtime.memory``).
WORK_CAP = 1 << 30


def _chunk_points(p: int, n: int, device, extra_per_point: int = 0) -> int:
    per_point = 4 * p + extra_per_point  # fp32 copy of one point column for all masks
    return memory.items_that_fit(per_point, device, cap_bytes=WORK_CAP, minimum=1024,
                                 maximum=max(n, 1))


class MaskMatrix:
    """``[P, N]`` bool masks with exact counting products (fp32 accumulation; every count is
    < 2**24, so fp32 — and TF32, whose inputs are 0/1 — give exact integers).

    The fp32 copy is made once when it fits the memory budget, else per point chunk.
    """

    def __init__(self, masks: torch.Tensor):
        self.masks = masks
        p, n = masks.shape
        self.chunk = min(_chunk_points(p, n, masks.device), 1 << 23)
        self._f32 = masks.to(torch.float32) if self.chunk >= n else None

    def _blocks(self):
        n = self.masks.shape[1]
        if self._f32 is not None:
            yield 0, n, self._f32
            return
        for a in range(0, n, self.chunk):
            yield a, min(a + self.chunk, n), self.masks[:, a:a + self.chunk].to(torch.float32)

    def gram(self) -> torch.Tensor:
        """All pairwise intersection counts [P, P] (int64)."""
        p = self.masks.shape[0]
        out = torch.zeros(p, p, dtype=torch.int64, device=self.masks.device)
        for _, _, m in self._blocks():
            out += torch.mm(m, m.t()).round_().to(torch.int64)
        return out

    def counts_with(self, keep: torch.Tensor, start: int = 0) -> np.ndarray:
        """|m ∧ keep| for rows ``start:`` (int64, host)."""
        p = self.masks.shape[0]
        out = torch.zeros(p - start, dtype=torch.int64, device=self.masks.device)
        kf = keep.to(torch.float32)
        for a, b, m in self._blocks():
            out += torch.mv(m[start:], kf[a:b]).round_().to(torch.int64)
        return out.cpu().numpy()


def mask_gram(masks: torch.Tensor) -> torch.Tensor:
    """All pairwise intersection counts ``[P, P]`` (int64) of ``[P, N]`` bool masks."""
    return MaskMatrix(masks).gram()


def greedy_nms(inter: np.ndarray, counts: np.ndarray, thr: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Official first-match clustering on a sorted IoU matrix.

    Returns (rep_of [P], representatives [C], cluster_size [C]).
    """
    p = counts.shape[0]
    cnt = counts.astype(np.int64)
    union = cnt[:, None] + cnt[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union  # float64; 0/0 = NaN never passes (official NumPy division)
    passes = iou > thr
    reps: list[int] = []
    rep_of = np.empty(p, dtype=np.int64)
    for i in range(p):
        if reps:
            hit = np.flatnonzero(passes[i, reps])
            if hit.size:
                rep_of[i] = reps[int(hit[0])]
                continue
        reps.append(i)
        rep_of[i] = i
    reps_a = np.asarray(reps, dtype=np.int64)
    size = np.bincount(rep_of, minlength=p)[reps_a]
    return rep_of, reps_a, size


def mask_boxes(masks: torch.Tensor, points: torch.Tensor) -> np.ndarray:
    """Per mask (min xyz, max xyz) of its points, float64 ``[K, 2, 3]`` (host).

    Empty masks give (+inf, -inf) (the official code never boxes an empty mask)."""
    k, n = masks.shape
    dev = masks.device
    pts = points.to(device=dev, dtype=torch.float64)
    out = torch.empty(k, 2, 3, dtype=torch.float64, device=dev)
    per_mask = n * 3 * 8 * 2
    step = memory.items_that_fit(per_mask, dev, cap_bytes=WORK_CAP, minimum=1,
                                 maximum=max(k, 1))
    for a in range(0, k, step):
        m = masks[a:a + step, :, None]
        out[a:a + step, 0] = torch.where(m, pts[None], torch.inf).amin(dim=1)
        out[a:a + step, 1] = torch.where(m, pts[None], -torch.inf).amax(dim=1)
    return out.cpu().numpy()


def box_iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """``iou[b, a] = iou_3d(box b, box a)`` with the official arithmetic (float64).

    Intersection extents by max/min; no overlap (``>=`` on any axis) gives 0; volumes as
    ``(dx * dy) * dz``; union ``(v_b + v_a) - inter``; ``inter / union`` if union > 0 else 0.
    """
    mn, mx = boxes[:, 0], boxes[:, 1]
    lo = np.maximum(mn[:, None, :], mn[None, :, :])
    hi = np.minimum(mx[:, None, :], mx[None, :, :])
    overlap = (lo < hi).all(axis=2)
    with np.errstate(invalid="ignore", over="ignore"):  # (+inf, -inf) boxes of empty masks
        ext = hi - lo
        inter = ext[..., 0] * ext[..., 1] * ext[..., 2]
        d = mx - mn
        vol = d[:, 0] * d[:, 1] * d[:, 2]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        union = vol[:, None] + vol[None, :] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.where(overlap, iou, 0.0)


def merge_by_boxes(boxes: np.ndarray, thr: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Official greedy box merge over kept clusters (indices into ``boxes``).

    Returns (heads, head_of [K], evaluated pairs [E, 2] as (cur, tar) indices, box IoUs [E]).
    """
    k = boxes.shape[0]
    biou = box_iou_matrix(boxes)  # [tar, cur]
    absorbed = np.zeros(k, dtype=bool)
    head_of = np.arange(k)
    heads, pairs, vals = [], [], []
    for a in range(k):
        if absorbed[a]:
            continue
        heads.append(a)
        b = np.flatnonzero(~absorbed[a + 1:]) + a + 1
        pairs.append(np.stack([np.full(b.size, a), b], axis=1))
        v = biou[b, a]
        vals.append(v)
        take = b[v > thr]
        absorbed[take] = True
        head_of[take] = a
    pairs_a = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    vals_a = np.concatenate(vals) if vals else np.zeros(0)
    return np.asarray(heads, dtype=np.int64), head_of, pairs_a, vals_a


def recover(masks: torch.Tensor | MaskMatrix, counts: np.ndarray, heads: np.ndarray,
            thr: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Official recovery loop (sorted order), one mat-vec per recovered mask.

    Returns (added, coverage [P] float64 (NaN = not visited), visited [P],
    uncovered-before [N] bool, uncovered-after [N] bool) — the last two on the device.
    """
    mm = masks if isinstance(masks, MaskMatrix) else MaskMatrix(masks)
    masks = mm.masks
    p, n = masks.shape
    dev = masks.device
    is_head = np.zeros(p, dtype=bool)
    is_head[heads] = True
    if heads.size:
        covered = masks[torch.as_tensor(heads, device=dev)].any(dim=0)
    else:
        covered = torch.zeros(n, dtype=torch.bool, device=dev)
    unc0 = ~covered
    unc = unc0.clone()
    coverage = np.full(p, np.nan)
    visited = ~is_head
    added: list[int] = []
    cnt = counts.astype(np.int64)
    pos = 0
    while pos < p:
        inter = mm.counts_with(unc, pos)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = inter / cnt[pos:]  # float64; 0/0 = NaN (official NumPy division)
        ok = (cov > thr) & ~is_head[pos:]
        hit = np.flatnonzero(ok)
        stop = p if hit.size == 0 else pos + int(hit[0]) + 1
        seg = slice(pos, stop)
        coverage[seg] = np.where(is_head[seg], np.nan, cov[: stop - pos])
        if hit.size == 0:
            break
        i = pos + int(hit[0])
        added.append(i)
        unc &= ~masks[i]
        pos = i + 1
    return np.asarray(added, dtype=np.int64), coverage, visited, unc0, unc


def paint_points(masks: torch.Tensor, final: np.ndarray) -> torch.Tensor:
    """Point labels: for every point the sorted position of the LAST final mask (in final
    order) containing it, -1 if none (official painting loop, later masks overwrite)."""
    p, n = masks.shape
    dev = masks.device
    if final.size == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=dev)
    f = torch.as_tensor(final, device=dev)
    stack = masks[f.flip(0)]                   # reversed: first hit = last painter
    hit = stack.any(dim=0)
    first = torch.argmax(stack.to(torch.uint8), dim=0)
    lab = f.flip(0)[first]
    return torch.where(hit, lab, torch.full_like(lab, -1))


def select_masks(masks: torch.Tensor, iou: torch.Tensor, points: torch.Tensor,
                 cfg: SelectionConfig | None = None) -> Selection:
    """Steps 8–15 on ``masks`` [P, N] bool (prompt order), ``iou`` [P], ``points`` [N, 3]
    (the CenterShift-ed normalised points, float64 for the official box arithmetic)."""
    cfg = cfg or SelectionConfig()
    dev = masks.device
    order_t = sort_by_iou(iou.to(dev))
    ms = masks[order_t].contiguous()                    # sorted order
    order = order_t.cpu().numpy()
    mm = MaskMatrix(ms)
    inter = mm.gram().cpu().numpy()
    counts = np.diagonal(inter).copy()  # |m_i| = |m_i ∧ m_i|
    rep_of, reps, size = greedy_nms(inter, counts, cfg.nms_iou)
    kept = reps[size >= cfg.min_cluster_members]
    if kept.size:
        boxes = mask_boxes(ms[torch.as_tensor(kept, device=dev)], points)
    else:
        boxes = np.zeros((0, 2, 3))
    h, head_of, pairs, biou = merge_by_boxes(boxes, cfg.box_merge_iou)
    heads = kept[h]
    added, coverage, visited, unc0, unc1 = recover(mm, counts, heads, cfg.recovery_coverage)
    del mm
    uncovered = torch.where(unc1, 2, torch.where(unc0, 1, 0)).to(torch.uint8).cpu().numpy()
    allh = np.concatenate([heads, added])
    area = counts[allh]
    srt = np.argsort(-area, kind="stable")
    final = allh[srt]
    labels = paint_points(ms, final)
    return Selection(order=order, counts=counts, rep_of=rep_of, representatives=reps,
                     cluster_size=size, kept=kept, heads=heads, head_of=kept[head_of],
                     evaluated_pairs=kept[pairs] if pairs.size else pairs.reshape(0, 2),
                     box_iou=biou, coverage=coverage, visited=visited, added=added,
                     uncovered=uncovered, final=final, final_area=area[srt],
                     point_labels=labels, extra={"boxes": boxes})
