"""Distances between results: tensors, part labelings, boxes, meshes.

One home for the measures that golden parity, the fidelity report and the tests share.
"""
from __future__ import annotations

import numpy as np
import torch


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ (Frobenius, float64)."""
    o = torch.as_tensor(ours).detach().double().cpu()
    r = torch.as_tensor(ref).detach().double().cpu()
    den = float(r.norm())
    return float((o - r).norm()) / den if den > 0 else float((o - r).norm())


def max_abs_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    o = torch.as_tensor(ours).detach().double().cpu()
    r = torch.as_tensor(ref).detach().double().cpu()
    return float((o - r).abs().max()) if r.numel() else 0.0


def best_matching(ours: np.ndarray, ref: np.ndarray) -> tuple[dict[int, int], int]:
    """One-to-one label matching ref → ours maximising the number of agreeing elements.

    Returns ({ref label: our label}, agreeing count).  Negative labels (-1/-2, unlabeled)
    are matched only to themselves."""
    from scipy.optimize import linear_sum_assignment
    ours = np.asarray(ours).astype(np.int64).reshape(-1)
    ref = np.asarray(ref).astype(np.int64).reshape(-1)
    ru, ri = np.unique(ref, return_inverse=True)
    ou, oi = np.unique(ours, return_inverse=True)
    cont = np.zeros((ru.size, ou.size), dtype=np.int64)
    np.add.at(cont, (ri.reshape(-1), oi.reshape(-1)), 1)
    neg_r = ru < 0
    neg_o = ou < 0
    weight = cont.copy()
    weight[neg_r[:, None] | neg_o[None, :]] = 0
    for a in np.flatnonzero(neg_r):
        b = np.flatnonzero(ou == ru[a])
        if b.size:
            weight[a, b] = cont[a, b]
    r, c = linear_sum_assignment(-weight)
    mapping = {int(ru[a]): int(ou[b]) for a, b in zip(r, c) if weight[a, b] > 0}
    agree = int(sum(weight[a, b] for a, b in zip(r, c)))
    return mapping, agree


def label_agreement(ours: np.ndarray, ref: np.ndarray, weights: np.ndarray | None = None
                    ) -> float:
    """Fraction of elements (or of ``weights``, e.g. face areas) whose labels agree after the
    best one-to-one renumbering."""
    ours = np.asarray(ours).reshape(-1)
    ref = np.asarray(ref).reshape(-1)
    if ours.shape != ref.shape:
        raise ValueError(f"{ours.size} labels vs {ref.size}")
    mapping, agree = best_matching(ours, ref)
    if weights is None:
        return agree / max(ref.size, 1)
    ru, inv = np.unique(ref.astype(np.int64), return_inverse=True)
    target = np.array([mapping.get(int(v), v if v < 0 else np.iinfo(np.int64).min)
                       for v in ru], dtype=np.int64)
    ok = target[inv.reshape(-1)] == ours.astype(np.int64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    return float(w[ok].sum() / max(w.sum(), 1e-300))


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two axis-aligned boxes [2, 3] (min, max)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    inter = np.clip(np.minimum(a[1], b[1]) - np.maximum(a[0], b[0]), 0, None).prod()
    va = np.clip(a[1] - a[0], 0, None).prod()
    vb = np.clip(b[1] - b[0], 0, None).prod()
    union = va + vb - inter
    return float(inter / union) if union > 0 else 0.0


def chamfer_distance(a, b, samples: int = 50000, seed: int = 0) -> float:
    """Symmetric mean nearest-neighbour distance between two surfaces (trimesh meshes),
    from ``samples`` area-weighted points on each."""
    from scipy.spatial import cKDTree
    pa = _surface_samples(a, samples, seed)
    pb = _surface_samples(b, samples, seed + 1)
    if len(pa) == 0 or len(pb) == 0:
        return float("inf") if len(pa) != len(pb) else 0.0
    da, _ = cKDTree(pb).query(pa)
    db, _ = cKDTree(pa).query(pb)
    return float(0.5 * (da.mean() + db.mean()))


def _surface_samples(mesh, n: int, seed: int) -> np.ndarray:
    import trimesh
    if mesh is None or len(mesh.faces) == 0:
        return np.zeros((0, 3))
    pts, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts)
