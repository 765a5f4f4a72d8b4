"""Golden runner for the automatic-segmentation cases (``automask``, ``automask_xpart``).

The cases replace the network by synthetic predictions (``input.pred_iou`` plus the
``input.synth.*`` tensors and the JSON's ``synthetic_prediction_recipe``); everything else
is the official ``mesh_sam``.  We rebuild the three heads' masks with the recipe (integer
rules over the few points of the prompt's parts, ball tests with a k-d tree: every radius
sits in a gap of the distances, so exact), count all three (``mask_count``), keep the best
head per prompt (first index on ties) as a [400, N] matrix, inject the recorded samples
(``rng.sample_points`` / ``rng.sample_face_index``) and prompts (``rng.fps_index``), and run
our clean-up, adjacency, selection and face labelling.  The variant comes from
``config.variant`` ("p3sam" or "xpart"); sizes come from the tensors, so other meshes, seeds
and synthetic parameters work unchanged.

``COMPARE`` rules: face labels after the best one-to-one renumbering (≥ 99.5 % of faces),
boxes within 1e-4 of the mesh extent with rows matched through that renumbering, and
neighbour lists as sets per region (the official order is a CPython ``set`` order).
"""
from __future__ import annotations

import numpy as np
import torch
import trimesh
from scipy.optimize import linear_sum_assignment

from . import Case, Check, compare_tensor
from ..p3sam.automask import AutomaskConfig, prepare_points, run_automask
from ..mesh import clean_mesh
from ..metrics import best_matching

AGREEMENT = 0.995
BOX_TOL = 1e-4

#: outputs of the last run per case path (the COMPARE rules need several outputs)
_LAST: dict[str, dict[str, torch.Tensor]] = {}


class SyntheticPredictor:
    """The case's synthetic heads: three masks per prompt from the recipe, best of three.

    Sparse per prompt: ``mask_1`` and ``mask_2`` only involve the points whose reference or
    alternative part is the prompt's part (or partner), and the balls come from a k-d tree
    (every squared radius sits in a gap >= 1e-9 of the squared distances, recipe note, so
    the tree's float64 distances decide exactly like the recipe's expression).
    """

    def __init__(self, case: Case, normalized: np.ndarray, fps_index: np.ndarray,
                 device: torch.device | str = "cpu"):
        s = {k: v.numpy() for k, v in case.prefixed("input.synth.").items()}
        self.x = np.asarray(normalized, dtype=np.float64)
        self.fps = np.asarray(fps_index, dtype=np.int64)
        self.part = s["point_part"].astype(np.int64)
        self.alt = s["point_alt"].astype(np.int64)
        self.key = s["point_key"].astype(np.int64)
        self.p_part = s["prompt_part"].astype(np.int64)
        self.p_partner = s["prompt_partner"].astype(np.int64)
        self.p_off = s["prompt_key_offset"].astype(np.int64)
        self.p_width = s["prompt_flip_width"].astype(np.int64)
        self.p_merge = s["prompt_merge_r2"].astype(np.float64)
        self.p_ball = s["prompt_ball_r2"].astype(np.float64)
        self.pred_iou = case.input("pred_iou").to(torch.float32)
        self.device = torch.device(device)
        self._by_part = _index_lists(self.part)
        self._by_alt = _index_lists(self.alt)

    def _members(self, p: int, value: int) -> np.ndarray:
        """Points whose noisy part (for prompt p) equals ``value``."""
        if value < 0:
            return np.zeros(0, dtype=np.int64)
        a = self._by_part.get(value, _EMPTY)
        b = self._by_alt.get(value, _EMPTY)
        rel_a = np.remainder(self.key[a] - self.p_off[p], 256)
        rel_b = np.remainder(self.key[b] - self.p_off[p], 256)
        w = self.p_width[p]
        flip_a = (self.alt[a] >= 0) & (rel_a < w)    # flipped away from `value`
        flip_b = rel_b < w                          # flipped to `value` (alt >= 0 here)
        return np.concatenate([a[~flip_a], b[flip_b]])

    def _d2(self, p: int, idx: np.ndarray) -> np.ndarray:
        q = self.x[self.fps[p]]
        return ((self.x[idx] - q) ** 2).sum(-1)

    def __call__(self, prompts: torch.Tensor):
        from scipy.spatial import cKDTree
        p, n = self.fps.size, self.x.shape[0]
        best = torch.argmax(self.pred_iou, dim=1)          # first index on ties
        tree = cKDTree(self.x)
        q = self.x[self.fps]
        r = np.sqrt(self.p_ball)
        ball_count = tree.query_ball_point(q, r, return_length=True)
        masks = np.zeros((p, n), dtype=bool)
        counts = np.zeros((p, 3), dtype=np.int64)
        for i in range(p):
            part, partner = int(self.p_part[i]), int(self.p_partner[i])
            m1 = self._members(i, part)
            # noisy == part and noisy == partner are disjoint point sets unless equal
            m2 = m1 if partner == part else np.concatenate([m1, self._members(i, partner)])
            if np.isfinite(self.p_merge[i]):
                m2 = m2[self._d2(i, m2) < self.p_merge[i]]
            counts[i] = (m1.size, m2.size, int(ball_count[i]))
            h = int(best[i])
            if h == 2:
                sel = np.asarray(tree.query_ball_point(q[i], r[i]), dtype=np.int64)
            else:
                sel = m1 if h == 0 else m2
            masks[i, sel] = True
        iou = self.pred_iou.gather(1, best[:, None])[:, 0]
        self.last = _Pred(torch.from_numpy(masks).to(self.device), iou.to(self.device),
                          best, self.pred_iou, torch.from_numpy(counts))
        return self.last


_EMPTY = np.zeros(0, dtype=np.int64)


def _index_lists(values: np.ndarray) -> dict[int, np.ndarray]:
    """{value: sorted point indices with that value} for values >= 0."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    cuts = np.flatnonzero(np.diff(v)) + 1
    out = {}
    for chunk in np.split(order, cuts):
        if chunk.size and values[chunk[0]] >= 0:
            out[int(values[chunk[0]])] = chunk
    return out


class _Pred:
    def __init__(self, masks, iou, best_head, pred_iou, mask_count):
        self.masks, self.iou, self.best_head = masks, iou, best_head
        self.pred_iou, self.mask_count = pred_iou, mask_count


def run(case: Case) -> dict[str, torch.Tensor]:
    cfg_json = case.config
    variant = str(cfg_json.get("variant", "p3sam"))
    cfg = AutomaskConfig(
        variant=variant,
        point_num=int(case.rng("sample_points").shape[0]),
        prompt_num=int(case.rng("fps_index").shape[0]),
        threshold=float(cfg_json.get("threshold", 0.95)),
        post_process=bool(cfg_json.get("post_process", True)),
        clean_mesh=bool(cfg_json.get("clean_mesh_flag", True)),
        nms_iou=float(cfg_json.get("nms_iou", 0.9)),
        min_cluster_members=int(cfg_json.get("min_cluster_members", 3)),
        box_merge_iou=float(cfg_json.get("box_merge_iou", 0.5)),
        recovery_coverage=float(cfg_json.get("recovery_coverage", 0.7)),
        tiny_region_ratio=float(cfg_json.get("tiny_region_ratio", 0.001)),
        new_part_area_ratio=float(cfg_json.get("new_part_area_ratio", 0.001)),
        post_small_part=float(cfg_json.get("post_small_part", 0.01)),
    )
    v = case.input("mesh.vertices").numpy().astype(np.float64)
    f = case.input("mesh.faces").numpy().astype(np.int64)
    mesh = trimesh.Trimesh(vertices=v, faces=f, process=False)
    if cfg.clean_mesh:
        mesh = clean_mesh(mesh, rewrap_process=cfg.rewrap_process)
    points = case.rng("sample_points").numpy().astype(np.float64)
    face_index = case.rng("sample_face_index").numpy().astype(np.int64)
    fps = case.rng("fps_index").numpy().astype(np.int64)
    prepared = prepare_points(mesh, points, face_index)
    heads = SyntheticPredictor(case, prepared.normalized, fps)
    res = run_automask(prepared, heads, cfg, fps_index=fps, debug=True)
    out = {k: torch.as_tensor(np.asarray(val)) for k, val in res.debug.items()}
    pred = heads.last
    out["mask_count"] = pred.mask_count
    out["best_head"] = pred.best_head
    out["face_labels"] = torch.as_tensor(res.face_ids)
    out["aabb"] = torch.as_tensor(res.aabb)
    out["aabb_labels"] = torch.as_tensor(res.aabb_labels)
    _LAST[str(case.path)] = out
    return out


# --------------------------------------------------------------------------- comparison

def _cmp_face_labels(case: Case, ours, ref) -> Check:
    ours = np.asarray(torch.as_tensor(ours).cpu()).reshape(-1)
    ref = ref.numpy().reshape(-1)
    if ours.shape != ref.shape:
        return Check("face_labels", False, None, f"{ours.size} faces != {ref.size}")
    _, agree = best_matching(ours, ref)
    frac = agree / max(ref.size, 1)
    exact = bool(np.array_equal(ours, ref))
    return Check("face_labels", frac >= AGREEMENT, float(ref.size - agree),
                 f"agreement {100 * frac:.3f}% of {ref.size} faces after renumbering"
                 + (" (identical labels)" if exact else ""))


def _cmp_aabb(case: Case, ours, ref) -> Check:
    out = _LAST.get(str(case.path), {})
    ref = ref.numpy().astype(np.float64)
    ours = np.asarray(torch.as_tensor(ours).cpu(), dtype=np.float64)
    v = case.input("mesh.vertices").numpy()
    tol = BOX_TOL * float(np.max(v.max(0) - v.min(0)))
    if ours.reshape(-1, 2, 3).shape[0] != ref.reshape(-1, 2, 3).shape[0]:
        return Check("aabb", False, None, f"{ours.shape[0]} boxes != {ref.shape[0]}")
    ref = ref.reshape(-1, 2, 3)
    ours = ours.reshape(-1, 2, 3)
    if "face_labels" in out and "aabb_labels" in out:
        mapping, _ = best_matching(out["face_labels"].numpy(),
                                   case.outputs["face_labels"].numpy())
        ol = {int(l): k for k, l in enumerate(out["aabb_labels"].numpy())}
        rows = []
        for k, l in enumerate(case.outputs["aabb_labels"].numpy()):
            m = mapping.get(int(l))
            if m is None or m not in ol:
                return Check("aabb", False, None, f"reference part {int(l)} has no match")
            rows.append(ol[m])
        ours = ours[np.asarray(rows)]
    else:  # match rows by box distance
        cost = np.abs(ref[:, None] - ours[None]).reshape(ref.shape[0], ours.shape[0], -1)
        r, c = linear_sum_assignment(cost.max(-1))
        ours = ours[c[np.argsort(r)]]
    err = float(np.abs(ours - ref).max()) if ref.size else 0.0
    return Check("aabb", err <= tol, err, f"max |box diff| {err:.3g} (tolerance {tol:.3g})")


def _cmp_neighbors(offsets_name: str):
    def cmp(case: Case, ours, ref) -> Check:
        name = offsets_name.replace("_offsets", "")
        out = _LAST.get(str(case.path), {})
        ro = case.outputs[offsets_name].numpy().astype(np.int64)
        if offsets_name not in out:
            return compare_tensor(name, ours, ref)
        oo = out[offsets_name].numpy().astype(np.int64)
        o = np.asarray(torch.as_tensor(ours)).astype(np.int64)
        r = ref.numpy().astype(np.int64)
        if oo.shape != ro.shape or o.shape != r.shape:
            return Check(name, False, None, "different neighbour list sizes")
        bad = 0
        for i in range(ro.size - 1):
            if sorted(o[oo[i]:oo[i + 1]]) != sorted(r[ro[i]:ro[i + 1]]):
                bad += 1
        return Check(name, bad == 0, float(bad),
                     f"{bad} regions with a different neighbour set" if bad else
                     "same neighbour sets (order: ours ascending, official CPython set order)")
    return cmp


COMPARE = {
    "face_labels": _cmp_face_labels,
    "aabb": _cmp_aabb,
    "regions2.neighbors": _cmp_neighbors("regions2.neighbors_offsets"),
    "post.neighbors": _cmp_neighbors("post.neighbors_offsets"),
}
