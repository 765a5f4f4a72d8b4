"""P3-SAM automatic segmentation (``mesh_sam`` / ``AutoMask.predict_aabb``), spec p3sam §5.

The algorithm is split into the official stages; every stage is vectorised (see
:mod:`.selection` for the mask stages on the device, :mod:`.regions` and :mod:`.fixlabel`
for the face stages) and reproduces the official rules and quirks:

========================  ============================================================
stage                     official quirk reproduced (and where)
========================  ============================================================
clean + re-wrap           ``process=True`` ("p3sam", ``auto_mask.py``) or ``False``
                          ("xpart", ``auto_mask_api.py``)  — :func:`turbopart.mesh.clean_mesh`
points used by FPS and    the **in-place CenterShift** of ``get_feat``: FPS (float32 copy)
box merge                 and the box merge use ``x - centershift`` — :func:`prepare_points`
NMS                       first match in creation order; NaN IoU of empty masks never passes
box merge                 absorbed masks are discarded, not unioned
recovery                  empty masks: coverage 0/0 = NaN, never recovered
face vote                 ``argmax(bincount(l + 2)) - 2``: -1 beats real labels on ties
first repair              labels shifted by +1 so "no mask" (0) spreads; Gauss–Seidel order
new parts                 ``max_id`` may be negative (no labelled region): ids start there
absorption                ``aabb_increase`` divides by absolute coordinates; NaN never wins;
                          the nearest-box fallback uses the official ``aabb_distance``
post-process              ``do_no_mask_process`` computed and **discarded**
========================  ============================================================

Variants: ``"p3sam"`` (``P3-SAM/demo/auto_mask.py``: re-wrap with ``process=True``, prompt
batches of 32) and ``"xpart"`` (``XPart/.../auto_mask_api.py``: re-wrap with
``process=False``, batches of 64, and the pipeline's ``normalize_mesh`` first when the
mesh comes from a path).  The prompt batch does not change any result (heads are
per-prompt); ours comes from the memory budget.

The network is a callable ``predict_fn(prompts [P, 3] float32, shifted frame) ->``
predictions with ``masks`` [P, N] bool (best of 3), ``iou`` [P] (and optionally
``best_head``, ``pred_iou``), e.g. :class:`turbopart.p3sam.predictor.P3SAMPredictor`.predict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..geometry.adjacency import FaceGraph
from ..geometry.fps import farthest_point_sampling
from ..mesh import clean_mesh, normalize_points, sample_surface
from . import regions as R
from .fixlabel import fix_label
from .selection import Selection, SelectionConfig, select_masks
from .. import _lazy_import

trimesh = _lazy_import("trimesh")  # imported on first use (start-up time)

VARIANTS = {
    "p3sam": {"rewrap_process": True, "prompt_batch": 32, "normalize_mesh": False},
    "xpart": {"rewrap_process": False, "prompt_batch": 64, "normalize_mesh": True},
}


@dataclass
class AutomaskConfig:
    """Official constants (spec §5.1); ``variant`` picks the official copy."""

    variant: str = "p3sam"
    point_num: int = 100000
    prompt_num: int = 400
    threshold: float = 0.95
    post_process: bool = True
    clean_mesh: bool = True
    nms_iou: float = 0.9
    min_cluster_members: int = 3
    box_merge_iou: float = 0.5
    recovery_coverage: float = 0.7
    tiny_region_ratio: float = 0.001
    new_part_area_ratio: float = 0.001
    post_small_part: float = 0.01
    fix_passes: int = 50
    #: False: ``auto_mask_no_postprocess.py`` (§5.4): no adjacency, face labels by
    #: nearest labelled point (10 random points per face), no repair / merging
    connectivity: bool = True
    face_samples: int = 10

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")

    @property
    def rewrap_process(self) -> bool:
        # the no-connectivity file always re-wraps with process=False
        return VARIANTS[self.variant]["rewrap_process"] and self.connectivity

    @property
    def selection(self) -> SelectionConfig:
        return SelectionConfig(self.nms_iou, self.min_cluster_members, self.box_merge_iou,
                               self.recovery_coverage)


# --------------------------------------------------------------------------- preparation

@dataclass
class PreparedMesh:
    """The cleaned mesh, its adjacency and the sampled points in every frame used."""

    mesh: trimesh.Trimesh
    graph: FaceGraph
    points: np.ndarray          # [N, 3] float64, mesh frame
    face_index: np.ndarray      # [N] int64
    normals: np.ndarray         # [N, 3] float64 face normals of the sampled faces
    normalized: np.ndarray      # [N, 3] float64: normalize_pc(points)
    center: np.ndarray
    scale: float
    centershift: np.ndarray     # [3] float64
    shifted: np.ndarray         # [N, 3] float64: normalized - centershift

    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def face_areas(self) -> np.ndarray:
        return np.asarray(self.mesh.area_faces, dtype=np.float64)

    @property
    def face_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-face (min xyz, max xyz) of its vertices (cached)."""
        if "bounds" not in self._cache:
            self._cache["bounds"] = R.face_vertex_bounds(self.mesh.vertices, self.mesh.faces)
        return self._cache["bounds"]

    @property
    def components(self) -> tuple[np.ndarray, int]:
        """Edge-connected components of the mesh (cached; ``get_connected_region`` of an
        all-equal labelling)."""
        if "components" not in self._cache:
            self._cache["components"] = R.connected_regions(
                np.zeros(self.graph.num_faces, dtype=np.int64), self.graph)
        return self._cache["components"]


def center_shift(x: np.ndarray) -> np.ndarray:
    """Sonata ``CenterShift(apply_z=True)`` offset: ((xmin+xmax)/2, (ymin+ymax)/2, zmin)."""
    mn, mx = x.min(axis=0), x.max(axis=0)
    return np.array([(mn[0] + mx[0]) / 2, (mn[1] + mx[1]) / 2, mn[2]], dtype=np.float64)


def prepare_points(mesh: trimesh.Trimesh, points: np.ndarray, face_index: np.ndarray,
                   graph: FaceGraph | None = None) -> PreparedMesh:
    """Normalise given samples (§2.4) and compute the official CenterShift-ed copy."""
    points = np.asarray(points, dtype=np.float64)
    face_index = np.asarray(face_index, dtype=np.int64)
    x, center, scale = normalize_points(points)
    cs = center_shift(x)
    if graph is None:
        graph = FaceGraph.from_faces(np.asarray(mesh.faces))
    normals = np.asarray(mesh.face_normals, dtype=np.float64)[face_index]
    return PreparedMesh(mesh, graph, points, face_index, normals, x, center, scale, cs, x - cs)


def prepare_mesh(mesh: trimesh.Trimesh, cfg: AutomaskConfig, seed: int | None = 42,
                 device: torch.device | str = "cpu") -> PreparedMesh:
    """Steps 1–3: clean + re-wrap (variant rule), adjacency, sampling, normalisation."""
    if cfg.clean_mesh:
        mesh = clean_mesh(mesh, rewrap_process=cfg.rewrap_process)
    elif not cfg.rewrap_process:
        mesh = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
    graph = FaceGraph.from_faces(np.asarray(mesh.faces), device=device) if cfg.connectivity \
        else FaceGraph.from_pairs(np.zeros((0, 2), dtype=np.int64), len(mesh.faces))
    points, face_index = sample_surface(mesh, cfg.point_num, seed)
    return prepare_points(mesh, points, face_index, graph)


def fps_prompts(shifted: np.ndarray | torch.Tensor, count: int, start: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Official prompt FPS (``fpsample``): float32 copy of the shifted points, squared
    distances, ties to the last index; returns indices [count] (device)."""
    pts = torch.as_tensor(shifted, device=device).to(torch.float32)
    return farthest_point_sampling(pts, count, int(start), ties="last")


# --------------------------------------------------------------------------- labels

@dataclass
class AutomaskResult:
    face_ids: np.ndarray           # [F] official labels (sorted mask positions, new ids, -1/-2)
    aabb: np.ndarray               # [L, 2, 3] float64, frame of the cleaned mesh
    aabb_labels: np.ndarray        # [L] ascending labels (-1/-2 excluded)
    selection: Selection | None = None
    debug: dict[str, Any] = field(default_factory=dict)


def label_faces(vote: np.ndarray, prepared: PreparedMesh, cfg: AutomaskConfig,
                debug: dict | None = None) -> np.ndarray:
    """Steps 17–27: repairs, regions, new parts, absorption, post-process → face labels."""
    dbg = debug if debug is not None else {}
    graph = prepared.graph
    areas = prepared.face_areas
    total = np.sum(areas)
    fmin, fmax = prepared.face_bounds

    # 17. first repair: shift so that "no mask" (-1 -> 0) counts as a label and spreads
    fix1 = fix_label(vote + 1, graph, cfg.fix_passes) - 1
    dbg["face_labels.fix1"] = fix1

    # 18. regions and mesh components
    reg1, n1 = R.connected_regions(fix1, graph)
    comp, nc = prepared.components
    area1 = R.region_areas(reg1, areas, n1)
    comp_area = R.region_areas(comp, areas, nc)
    first1 = R.first_faces(reg1, n1)
    cp_area1 = comp_area[comp[first1]]
    # 19. drop tiny regions (relative to their component)
    dropped = ~(area1 / (cp_area1 + 1e-7) > cfg.tiny_region_ratio)
    drop = fix1.copy()
    drop[dropped[reg1]] = -1
    dbg.update({"regions1.face_region": reg1, "regions1.area": area1,
                "regions1.component_area": cp_area1,
                "regions1.sorted_order": np.argsort(-area1, kind="stable"),
                "regions1.dropped": dropped, "components.face_component": comp,
                "components.area": comp_area, "face_labels.drop_tiny": drop})

    # 20. second repair (no shift: -1 and -2 both filled)
    fix2 = fix_label(drop, graph, cfg.fix_passes)
    dbg["face_labels.fix2"] = fix2

    # 21. regions again
    reg2, n2 = R.connected_regions(fix2, graph)
    area2 = R.region_areas(reg2, areas, n2)
    first2 = R.first_faces(reg2, n2)
    lab2 = fix2[first2]
    # 22. new ids for large unlabeled regions, in region order, from max label + 1
    max_id = int(lab2.max()) if n2 else -1
    new = np.isin(lab2, R.UNLABELED) & (area2 / total > cfg.new_part_area_ratio)
    lab2_new = lab2.copy()
    lab2_new[new] = max_id + 1 + np.arange(int(new.sum()))
    labels4 = lab2_new[reg2]
    # 23. label boxes (on labels4) and region boxes
    ids, ids_box = R.label_boxes(labels4, fmin, fmax, exclude=())
    keep = ids >= 0  # official ids_aabb skips every negative label
    ids, ids_box = ids[keep], ids_box[keep]
    reg_box = R.group_boxes(reg2, n2, fmin, fmax)
    # 24. neighbours (labelled ones only; nearest-box fallback for isolated unlabeled)
    nbrs, offs = R.neighbor_lists(reg2, graph, n2, labels=lab2_new, boxes=reg_box)
    # 25. absorb the remaining unlabeled regions
    lab2_final = R.absorb_unlabeled(lab2_new, nbrs, offs, reg_box, ids, ids_box)
    labels5 = lab2_final[reg2]
    dbg.update({"regions2.face_region": reg2, "regions2.area": area2,
                "regions2.label_initial": lab2, "regions2.label_with_new": lab2_new,
                "regions2.label_final": lab2_final, "regions2.aabb": reg_box,
                "regions2.neighbors": nbrs, "regions2.neighbors_offsets": offs,
                "face_labels.with_new_parts": labels4, "label_aabb.labels": ids,
                "label_aabb.box": ids_box, "face_labels.before_post": labels5})

    # 27. optional post-process
    final = labels5
    if cfg.post_process:
        reg3, n3 = R.connected_regions(labels5, graph)
        dbg["regions3.face_region"] = reg3
        dbg["post.no_mask_process_result"] = R.no_mask_process(labels5, reg3, n3)  # discarded
        pp = R.post_process(labels5, reg3, n3, areas, graph, cfg.threshold,
                            cfg.post_small_part)
        final = pp.labels
        dbg.update({"post.sorted_regions": pp.sorted_regions,
                    "post.rel_area_sorted": pp.rel_area, "post.cum_area_sorted": pp.cum_area,
                    "post.neighbors": pp.neighbors, "post.neighbors_offsets": pp.offsets,
                    "post.merged_into": pp.merged_into})
    return final


def face_sample_points(vertices: np.ndarray, faces: np.ndarray, per_face: int,
                       rng: np.random.Generator) -> np.ndarray:
    """``per_face`` random points per face (§5.4): u = sqrt(U1), v = U2 (U1 for all faces
    first, then U2), weights (1-u, u(1-v), uv) on (v0, v1, v2); [F * per_face, 3] float64."""
    f = len(faces)
    u = np.sqrt(rng.random((f, per_face, 1)))
    v = rng.random((f, per_face, 1))
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    pts = (1 - u) * tri[:, None, 0] + (u * (1 - v)) * tri[:, None, 1] + (u * v) * tri[:, None, 2]
    return pts.reshape(-1, 3)


def nearest_face_labels(prepared: PreparedMesh, point_labels: np.ndarray, per_face: int = 10,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """No-connectivity face labels (``auto_mask_no_postprocess.py``, spec §5.4).

    Every face draws ``per_face`` points; each takes the label of its nearest labelled
    sample point (mesh frame); the face label is their mode (ties: smallest).  The
    official nearest search is a brute-force CUDA kernel in float32 (ties: lowest index);
    we use a k-d tree in float64, which can differ only for (near-)equidistant points.
    Faces get -1 only when no point is labelled.
    """
    from scipy.spatial import cKDTree
    from .fixlabel import mode_rows

    rng = rng if rng is not None else np.random.default_rng(0)
    faces = np.asarray(prepared.mesh.faces)
    keep = point_labels >= 0
    if not keep.any():
        return np.full(len(faces), -1, dtype=np.int64)
    ref = prepared.points[keep]
    lab = point_labels[keep].astype(np.int64)
    q = face_sample_points(prepared.mesh.vertices, faces, per_face, rng)
    _, idx = cKDTree(ref).query(q, k=1)
    got = lab[idx].reshape(len(faces), per_face)
    return mode_rows(got, np.ones_like(got, dtype=bool))


def run_automask(prepared: PreparedMesh, predict_fn: Callable[[torch.Tensor], Any],
                 cfg: AutomaskConfig | None = None, *, fps_index: np.ndarray | None = None,
                 fps_start: int = 0, device: torch.device | str = "cpu",
                 debug: bool = False, timer=None,
                 rng: np.random.Generator | None = None) -> AutomaskResult:
    """Steps 6–28 on prepared points: prompts, predictions, selection, face labels, boxes.

    ``fps_index`` injects the prompt indices (golden runs); otherwise FPS starts at
    ``fps_start``.  ``timer`` is an optional :class:`turbopart.runtime.profiling.Profile`.
    ``rng`` draws the per-face points of the no-connectivity variant.
    """
    cfg = cfg or AutomaskConfig()
    dev = torch.device(device)
    stage = timer.stage if timer is not None else _null_stage
    dbg: dict[str, Any] = {}
    shifted_t = torch.as_tensor(prepared.shifted, device=dev)
    with stage("prompts"):
        if fps_index is None:
            idx = fps_prompts(shifted_t, cfg.prompt_num, fps_start, dev)
        else:
            idx = torch.as_tensor(np.asarray(fps_index, dtype=np.int64), device=dev)
        prompts = shifted_t[idx].to(torch.float32)
    with stage("heads"):
        pred = predict_fn(prompts)
    with stage("selection"):
        masks = pred.masks.to(dev)
        iou = torch.as_tensor(pred.iou).to(dev)
        sel = select_masks(masks, iou, shifted_t, cfg.selection)
        if cfg.connectivity:
            vote = R.vote_faces(sel.point_labels,
                                torch.as_tensor(prepared.face_index, device=dev),
                                len(prepared.mesh.faces))
    with stage("post-process"):
        if cfg.connectivity:
            face_ids = label_faces(vote, prepared, cfg, dbg if debug else None)
        else:
            face_ids = nearest_face_labels(prepared, sel.point_labels.cpu().numpy(),
                                           cfg.face_samples, rng)
        labels, boxes = R.label_boxes(face_ids, *prepared.face_bounds)
    if debug:
        dbg.update(_selection_debug(sel, pred, idx, prepared))
        if cfg.connectivity:
            dbg["face_labels.vote"] = vote
    return AutomaskResult(face_ids, boxes, labels, sel, dbg)


def _selection_debug(sel: Selection, pred, idx, prepared: PreparedMesh) -> dict:
    out = {"iou_sort_order": sel.order, "nms.rep_of_sorted": sel.rep_of,
           "nms.representatives": sel.representatives, "nms.cluster_size": sel.cluster_size,
           "filter.kept": sel.kept, "merge.heads": sel.heads, "merge.head_of": sel.head_of,
           "merge.evaluated_pairs": sel.evaluated_pairs, "merge.box_iou": sel.box_iou,
           "recovery.coverage": sel.coverage, "recovery.visited": sel.visited,
           "recovery.added": sel.added, "uncovered": sel.uncovered,
           "final.masks": sel.final, "final.mask_area": sel.final_area,
           "point_labels": sel.point_labels.cpu().numpy(),
           "fps_index": torch.as_tensor(idx).cpu().numpy(),
           "normalize.center": prepared.center,
           "normalize.scale": np.array([prepared.scale]),
           "centershift": prepared.centershift,
           "clean.faces": np.asarray(prepared.mesh.faces),
           "adjacency.degree": prepared.graph.degree,
           "adjacency.table_rows": np.array([prepared.graph.table_rows])}
    bh = getattr(pred, "best_head", None)
    if bh is not None:
        out["best_head"] = torch.as_tensor(bh).cpu().numpy()
    out["best_iou"] = torch.as_tensor(pred.iou).cpu().numpy()
    cnt = np.empty_like(sel.counts)
    cnt[sel.order] = sel.counts  # sorted -> prompt order
    out["best_mask_count"] = cnt
    return out


class _NullStage:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _null_stage(name: str):
    return _NullStage()
