"""Face labels, connected regions and their merges (spec p3sam §5.2 steps 16–28, §5.3).

Vectorised building blocks with the official semantics:

* :func:`vote_faces` — per-face mode of its sample points' labels (ties: smallest label, so
  -1 "no mask" beats real labels); faces without samples get -2.  Sort/unique based, on the
  device of the labels.
* :func:`connected_regions` — ``get_connected_region``: connected components of the graph of
  adjacency edges between faces with **equal** labels, numbered by smallest face index (the
  official BFS scan order); faces without neighbours are singletons.
* :func:`region_areas`, :func:`group_boxes` — per-region sums and vertex boxes.
* :func:`neighbor_lists` — ``find_neighbor_part`` (with the optional label filter and the
  nearest-box fallback of unlabeled isolated regions, official ``aabb_distance`` formula and
  negative-index quirk).
* :func:`absorb_unlabeled` — step 25 (official ``aabb_increase`` score, divided by absolute
  coordinates; NaN never wins; strictly smaller wins).
* :func:`post_process` — ``do_post_process`` (and the discarded ``do_no_mask_process``).

Neighbour order.  The official lists are Python ``set`` iteration orders; the absorption and
the post-process keep the *first* strictly better candidate in that order, so the order only
matters for exact ties (none occur in the golden cases).  We use ascending region index (for
the post-process: ascending sorted position, i.e. larger regions first), deterministic and
documented; with no tie the result is the official one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.adjacency import FaceGraph
from ..geometry.components import connected_components

UNLABELED = (-1, -2)


# --------------------------------------------------------------------------- votes

def vote_faces(point_labels: torch.Tensor, face_index: torch.Tensor, num_faces: int
               ) -> np.ndarray:
    """Official face vote (step 16): ``argmax(bincount(labels + 2)) - 2`` per sampled face.

    Ties go to the smallest label (so -1 wins ties against real labels); faces without a
    sample get -2.  Returns int64 [F] on the host.
    """
    lab = point_labels.to(torch.int64)
    fi = face_index.to(device=lab.device, dtype=torch.int64)
    if lab.numel() == 0:
        return np.full(num_faces, -2, dtype=np.int64)
    width = int(lab.max()) + 3  # labels + 2 in [0, width)
    key = fi * width + (lab + 2)
    if lab.device.type == "cpu":  # NumPy's unique is much faster on the host
        uk_n, cnt_n = np.unique(key.numpy(), return_counts=True)
        uk, cnt = torch.from_numpy(uk_n), torch.from_numpy(cnt_n)
    else:
        uk, cnt = torch.unique(key, return_counts=True)
    face = uk // width
    val = uk % width - 2
    best = torch.zeros(num_faces, dtype=cnt.dtype, device=lab.device)
    best.scatter_reduce_(0, face, cnt, "amax", include_self=True)
    big = torch.iinfo(torch.int64).max
    cand = torch.where(cnt == best[face], val, torch.full_like(val, big))
    out = torch.full((num_faces,), big, dtype=torch.int64, device=lab.device)
    out.scatter_reduce_(0, face, cand, "amin", include_self=True)
    out = torch.where(out == big, torch.full_like(out, -2), out)
    return out.cpu().numpy()


# --------------------------------------------------------------------------- regions

def connected_regions(labels: np.ndarray, graph: FaceGraph) -> tuple[np.ndarray, int]:
    """(face → region id, number of regions); regions numbered by smallest face index."""
    u, v = graph.pairs[:, 0], graph.pairs[:, 1]
    eq = labels[u] == labels[v]
    reg = connected_components(graph.num_faces, u[eq], v[eq])
    n = int(reg.max()) + 1 if reg.size else 0
    return reg, n


def first_faces(face_region: np.ndarray, n: int) -> np.ndarray:
    """Smallest face index of every region (the official region's first element)."""
    first = np.full(n, face_region.size, dtype=np.int64)
    idx = np.arange(face_region.size, dtype=np.int64)
    t = torch.from_numpy(first)
    t.scatter_reduce_(0, torch.from_numpy(face_region.astype(np.int64)),
                      torch.from_numpy(idx), "amin", include_self=True)
    return t.numpy()


def region_areas(face_region: np.ndarray, face_areas: np.ndarray, n: int) -> np.ndarray:
    """Per-region area sums (float64; the official sums in BFS order may differ in the last
    bits, README tolerance 1e-12 relative)."""
    return np.bincount(face_region, weights=face_areas, minlength=n).astype(np.float64)


def face_vertex_bounds(vertices: np.ndarray, faces: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-face (min xyz, max xyz) over its three vertices, float64."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return np.minimum(np.minimum(a, b), c), np.maximum(np.maximum(a, b), c)


def group_boxes(group: np.ndarray, n: int, fmin: np.ndarray, fmax: np.ndarray
                ) -> np.ndarray:
    """Per-group vertex boxes ``[n, 2, 3]`` (min, max) from per-face bounds; groups with no
    face get (+inf, -inf).  One sort and two segment reductions (exact)."""
    group = np.asarray(group, dtype=np.int64).reshape(-1)
    lo = np.full((n, 3), np.inf)
    hi = np.full((n, 3), -np.inf)
    if group.size:
        order = np.argsort(group, kind="stable")
        gs = group[order]
        st = np.flatnonzero(np.concatenate(([True], gs[1:] != gs[:-1])))
        lo[gs[st]] = np.minimum.reduceat(np.asarray(fmin, dtype=np.float64)[order], st, axis=0)
        hi[gs[st]] = np.maximum.reduceat(np.asarray(fmax, dtype=np.float64)[order], st, axis=0)
    return np.stack([lo, hi], axis=1)


def label_boxes(labels: np.ndarray, fmin: np.ndarray, fmax: np.ndarray,
                exclude=UNLABELED) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of every distinct label in ascending order, minus ``exclude``
    (``get_aabb_from_face_ids`` / ``ids_aabb``).  Returns (labels [L], boxes [L, 2, 3])."""
    uniq, inv = np.unique(labels, return_inverse=True)
    boxes = group_boxes(inv.reshape(-1), uniq.size, fmin, fmax)
    keep = ~np.isin(uniq, np.asarray(exclude, dtype=uniq.dtype))
    return uniq[keep].astype(np.int64), boxes[keep]


# --------------------------------------------------------------------------- neighbours

def region_pairs(face_region: np.ndarray, graph: FaceGraph, n: int) -> np.ndarray:
    """Unique ordered pairs (a, b), a != b, of regions joined by an adjacency edge, sorted
    by (a, b); both directions present."""
    ru = face_region[graph.pairs[:, 0]]
    rv = face_region[graph.pairs[:, 1]]
    cross = ru != rv
    a = np.concatenate([ru[cross], rv[cross]]).astype(np.int64)
    b = np.concatenate([rv[cross], ru[cross]]).astype(np.int64)
    key = np.unique(a * max(n, 1) + b)
    return np.stack([key // max(n, 1), key % max(n, 1)], axis=1)


def aabb_distance(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Official ``aabb_distance(box, boxes[j])`` for every j (not a separation distance:
    per axis ``max(0, max_j - min_i, max_i - min_j)``, Euclidean norm unless all zero)."""
    d = np.maximum(0.0, np.maximum(boxes[:, 1] - box[0], box[1] - boxes[:, 0]))
    dist = np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2 + d[:, 2] ** 2)
    return np.where((d == 0).all(axis=1), 0.0, dist)


def aabb_volume(boxes: np.ndarray) -> np.ndarray:
    d = boxes[:, 1] - boxes[:, 0]
    return d[:, 0] * d[:, 1] * d[:, 2]


def neighbor_lists(face_region: np.ndarray, graph: FaceGraph, n: int,
                   labels: np.ndarray | None = None, boxes: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``find_neighbor_part`` as CSR (neighbors, offsets [n+1]).

    With ``labels``: neighbours labelled -1/-2 are skipped.  With ``labels`` and ``boxes``:
    an unlabeled region without neighbours gets the labelled region (j != i) of smallest
    official ``aabb_distance`` (ties: strictly smaller box volume replaces), or ``[-1]`` when
    no region is labelled (official quirk: the caller then reads it as Python index -1).
    """
    pr = region_pairs(face_region, graph, n)
    if labels is not None:
        pr = pr[~np.isin(labels[pr[:, 1]], UNLABELED)]
    counts = np.bincount(pr[:, 0], minlength=n) if pr.size else np.zeros(n, dtype=np.int64)
    nbrs = pr[:, 1].astype(np.int64)
    if labels is not None and boxes is not None:
        unl = np.isin(labels, UNLABELED)
        lonely = np.flatnonzero(unl & (counts == 0))
        if lonely.size:
            extra = {int(i): nearest_box_region(int(i), labels, boxes) for i in lonely}
            nb_list = np.split(nbrs, np.cumsum(counts)[:-1])
            for i, j in extra.items():
                nb_list[i] = np.array([j], dtype=np.int64)
            counts = np.array([len(x) for x in nb_list], dtype=np.int64)
            nbrs = np.concatenate(nb_list) if nb_list else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return nbrs, offsets


def nearest_box_region(i: int, labels: np.ndarray, boxes: np.ndarray) -> int:
    """The official fallback of ``find_neighbor_part`` for an isolated unlabeled region."""
    cand = np.flatnonzero(~np.isin(labels, UNLABELED))
    cand = cand[cand != i]
    if cand.size == 0:
        return -1
    dist = aabb_distance(boxes[i], boxes[cand])
    vol = aabb_volume(boxes[cand])
    # sequential official rule (scan in region order): a strictly smaller distance replaces
    # the best, an equal distance replaces it only with a strictly smaller volume, so the
    # winner is the first of the minimum-volume regions among those at minimum distance
    tie = np.flatnonzero(dist == dist.min())
    best = tie[int(np.argmin(vol[tie]))]
    return int(cand[best])


# --------------------------------------------------------------------------- merges

def aabb_increase_score(target: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Official step-25 score of growing each ``target`` box [K,2,3] by the box ``cur``
    [K,2,3]: relative change of the min and max corners divided by the **absolute
    coordinates** of the target corners; ``max(max(min part), max(max part))`` with NumPy
    NaN propagation and Python ``max`` order (NaN in the second argument is ignored)."""
    t_min, t_max = target[:, 0], target[:, 1]
    u_min = np.minimum(t_min, cur[:, 0])
    u_max = np.maximum(t_max, cur[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        inc_min = np.abs(u_min - t_min) / np.abs(t_min)
        inc_max = np.abs(u_max - t_max) / np.abs(t_max)
    a = np.max(inc_min, axis=1)   # NaN if any NaN (np.max)
    b = np.max(inc_max, axis=1)
    return np.where(b > a, b, a)  # Python max(a, b): b only if b > a


def absorb_unlabeled(region_labels: np.ndarray, nbrs: np.ndarray, offsets: np.ndarray,
                     region_box: np.ndarray, label_ids: np.ndarray, label_box: np.ndarray
                     ) -> np.ndarray:
    """Step 25: every -1/-2 region takes the label of the neighbour region whose label box
    grows least (strictly smaller wins, so the first in list order wins ties; NaN never
    wins; the running best starts at 1e10).  Returns the new region labels."""
    out = region_labels.copy()
    n = region_labels.size
    counts = np.diff(offsets)
    src = np.repeat(np.arange(n), counts)
    j = nbrs.copy()
    j = np.where(j < 0, j + n, j)  # official negative-index quirk (fallback [-1])
    unl = np.isin(region_labels, UNLABELED)
    sel = unl[src] & ~np.isin(region_labels[j], UNLABELED)
    src, j, pos = src[sel], j[sel], np.flatnonzero(sel)
    if src.size == 0:
        return out
    tar = region_labels[j]
    box_of = {int(l): k for k, l in enumerate(label_ids)}
    tb = label_box[np.array([box_of[int(t)] for t in tar])]
    score = aabb_increase_score(tb, region_box[src])
    ok = score < 1e10  # NaN and >= 1e10 never win
    src, tar, score, pos = src[ok], tar[ok], score[ok], pos[ok]
    if src.size == 0:
        return out
    # per source: minimum score, first in list order among equals
    order = np.lexsort((pos, score, src))
    first = np.ones(order.size, dtype=bool)
    first[1:] = src[order][1:] != src[order][:-1]
    win = order[first]
    out[src[win]] = tar[win]
    return out


@dataclass
class PostProcess:
    labels: np.ndarray          # new face labels
    sorted_regions: np.ndarray  # region ids by relative area, descending (stable)
    rel_area: np.ndarray        # in sorted order
    cum_area: np.ndarray        # in sorted order
    neighbors: np.ndarray       # CSR over sorted positions
    offsets: np.ndarray
    merged_into: np.ndarray     # sorted position absorbing sorted region i, or -1


def post_process(face_labels: np.ndarray, face_region: np.ndarray, n: int,
                 face_areas: np.ndarray, graph: FaceGraph, threshold: float = 0.95,
                 small: float = 0.01) -> PostProcess:
    """``do_post_process``: regions past the top-``threshold`` cumulative area and under
    ``small`` of the total merge into their largest neighbour among the top regions."""
    total = np.sum(face_areas)
    area = region_areas(face_region, face_areas, n) / total
    srt = np.argsort(-area, kind="stable")
    rel = area[srt]
    cum = np.cumsum(rel)
    pos_of = np.empty(n, dtype=np.int64)
    pos_of[srt] = np.arange(n)
    sorted_region = pos_of[face_region]
    nbrs, offsets = neighbor_lists(sorted_region, graph, n)
    counts = np.diff(offsets)
    src = np.repeat(np.arange(n), counts)
    source_ok = (cum > threshold) & (rel < small)
    sel = source_ok[src] & (cum[nbrs] <= threshold) & (rel[nbrs] > 0)
    src, j = src[sel], nbrs[sel]
    merged = np.full(n, -1, dtype=np.int64)
    if src.size:
        # largest area wins; equal areas: first in list order (ascending position)
        order = np.lexsort((j, -rel[j], src))
        first = np.ones(order.size, dtype=bool)
        first[1:] = src[order][1:] != src[order][:-1]
        win = order[first]
        merged[src[win]] = j[win]
    first_face = first_faces(sorted_region, n)
    target_label = np.where(merged >= 0, face_labels[first_face[np.maximum(merged, 0)]], 0)
    new = face_labels.copy()
    moved = merged[sorted_region] >= 0
    new[moved] = target_label[sorted_region[moved]]
    return PostProcess(new, srt, rel, cum, nbrs, offsets, merged)


def no_mask_process(face_labels: np.ndarray, face_region: np.ndarray, n: int) -> np.ndarray:
    """``do_no_mask_process`` (computed and discarded by the official code): every region
    whose first face is -1/-2 gets a new id above the maximum label, in region order."""
    first = first_faces(face_region, n)
    reg_lab = face_labels[first]
    unl = np.isin(reg_lab, UNLABELED)
    new_lab = reg_lab.copy()
    new_lab[unl] = int(face_labels.max()) + 1 + np.arange(int(unl.sum()))
    return new_lab[face_region]
