"""Automatic part segmentation of a mesh: the product API.

Usage::

    seg = Segmenter.from_pretrained()   # weights: argument, $TURBOPART_WEIGHTS, HF cache
    result = seg.segment("chair.glb")   # SegmentationResult
    result.face_labels, result.boxes    # per cleaned face: part id; [P, 2, 3] boxes

or in one call ``segment("chair.glb")`` (loads the model each time).

The steps are the official ``AutoMask.predict_aabb`` (spec p3sam §5), see
:mod:`turbopart.p3sam.automask`; the network comes from
:class:`turbopart.p3sam.predictor.P3SAMPredictor`.  Part ids are renumbered to
``0..P-1`` in the official label order (ascending official label = ``aabb`` row order);
faces the official algorithm leaves unlabeled (-1/-2) get -1.

Randomness: the surface sampling uses ``seed`` exactly as the official code
(``trimesh.sample.sample_surface(seed=seed)``); the Sonata voxel choice and the FPS start
index draw from a ``torch.Generator`` seeded with ``seed`` (the official code draws them from
NumPy's global legacy generator).  Same inputs and seed → same output.

``max_parts`` (ours, not official): after the official algorithm, while more than
``max_parts`` parts remain, the smallest part (by area; ties: the higher id) merges into the
neighbouring part it shares the most adjacency edges with (ties: the larger part, then the
lower id), or, when it touches no other part, into the part whose box centre is nearest.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..mesh import as_mesh, clean_mesh, normalize_mesh, sample_surface
from ..runtime.precision import Numerics
from ..runtime.profiling import Profile
from . import regions as R
from .automask import (VARIANTS, AutomaskConfig, AutomaskResult, PreparedMesh,
                       prepare_points, run_automask)
from ..geometry.adjacency import FaceGraph
from .. import _lazy_import

trimesh = _lazy_import("trimesh")  # imported on first use (start-up time)


@dataclass
class SegmentationResult:
    """Parts of one mesh.

    ``face_labels`` index the faces of ``mesh`` (the cleaned mesh, in the input's
    coordinates): part ids ``0..P-1`` or -1 (unlabeled).  ``boxes`` [P, 2, 3] (min xyz,
    max xyz) and ``areas`` [P] are in the input mesh's coordinates.
    """

    face_labels: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    face_counts: np.ndarray
    mesh: trimesh.Trimesh
    timings: dict[str, float]
    raw_face_ids: np.ndarray             # official labels (-1/-2 unlabeled)
    raw_boxes: np.ndarray                # official aabb, frame the algorithm ran in
    frame_center: np.ndarray | None = None   # X-Part normalisation (v_n = (v - c) / s)
    frame_scale: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    peak_gpu_gb: float | None = None

    @property
    def num_parts(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def unlabeled_faces(self) -> int:
        return int((self.face_labels < 0).sum())

    def boxes_in_frame(self) -> np.ndarray:
        """Boxes in the frame the algorithm ran in (X-Part: its normalised frame)."""
        if self.frame_center is None:
            return self.boxes.copy()
        return (self.boxes - self.frame_center) / self.frame_scale


class Segmenter:
    """Keeps the P3-SAM network loaded and segments meshes with it."""

    def __init__(self, predictor, *, device: torch.device | str | None = None,
                 numerics: Numerics | str = Numerics.FAST, weights: Path | None = None):
        self.predictor = predictor
        self.device = torch.device(device) if device is not None else default_device()
        self.numerics = Numerics.parse(numerics)
        self.weights = weights

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, *,
                        device: torch.device | str | None = None,
                        numerics: Numerics | str = Numerics.FAST) -> "Segmenter":
        """Load ``p3sam`` from a weight directory (``turbopart.weights.resolve`` rules:
        the argument, ``$TURBOPART_WEIGHTS``, the Hugging Face cache)."""
        from .. import weights as W
        from .predictor import P3SAMPredictor
        dev = torch.device(device) if device is not None else default_device()
        num = Numerics.parse(numerics)
        path = W.resolve(weights)
        model = W.load_component(path, "p3sam", device=dev, numerics=num)
        return cls(P3SAMPredictor(model, numerics=num, device=dev), device=dev,
                   numerics=num, weights=path)

    # ------------------------------------------------------------------ segmentation

    def segment(self, mesh, *, points: int = 100000, prompts: int = 400,
                threshold: float = 0.95, post_process: bool = True,
                max_parts: int | None = None, seed: int = 42, variant: str = "p3sam",
                progress: bool = False, profile: Profile | None = None,
                normalize: bool | None = None, name: str | None = None,
                connectivity: bool = True) -> SegmentationResult:
        """Segment ``mesh`` (a path or a :class:`trimesh.Trimesh`) into parts.

        ``normalize`` (X-Part's ``normalize_mesh`` before the algorithm) defaults to the
        official rule: only for ``variant="xpart"`` with a mesh path.  Results are always
        reported in the input mesh's coordinates.  ``name`` labels the progress bar.
        ``connectivity=False`` is the official no-connectivity variant (§5.4: face labels
        by nearest labelled point, no repair, ``post_process``/``threshold`` unused).
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if points < 1 or prompts < 1:
            raise ValueError("points and prompts must be positive")
        if prompts > points:
            raise ValueError(f"cannot pick {prompts} prompts out of {points} points")
        if max_parts is not None and max_parts < 1:
            raise ValueError("max_parts must be at least 1")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        dev = self.device
        prof = profile or Profile(device=str(dev))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        cfg = AutomaskConfig(variant=variant, point_num=points, prompt_num=prompts,
                             threshold=threshold, post_process=post_process,
                             connectivity=connectivity)
        bar = _Progress(progress, name or _name_of(mesh))
        if normalize is None:
            normalize = VARIANTS[variant]["normalize_mesh"] and isinstance(
                mesh, (str, os.PathLike))

        with prof.stage("load/clean"):
            m = as_mesh(mesh)
            center = scale = None
            if normalize:
                m, center, scale = normalize_mesh(m)  # X-Part pipeline with a mesh path
            m = clean_mesh(m, rewrap_process=cfg.rewrap_process)
        bar.step("adjacency")
        with prof.stage("adjacency"):
            # the no-connectivity variant needs no adjacency (max_parts builds it)
            graph = FaceGraph.from_faces(np.asarray(m.faces), device=dev) \
                if connectivity or max_parts is not None else \
                FaceGraph.from_pairs(np.zeros((0, 2), dtype=np.int64), len(m.faces))
        bar.step("sampling")
        with prof.stage("sampling"):
            pts, fidx = sample_surface(m, points, seed)
            prepared = prepare_points(m, pts, fidx, graph)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        bar.step("features")
        with prof.stage("sonata"):
            # float64 like the official NumPy arrays (voxelisation must be float64, §2.5)
            self.predictor.set_points(
                torch.as_tensor(prepared.normalized, dtype=torch.float64, device=dev),
                torch.as_tensor(prepared.normals, dtype=torch.float64, device=dev),
                generator=gen)
        start = int(torch.randint(points, (1,), generator=gen))
        res = run_automask(prepared, self.predictor.predict, cfg, fps_start=start,
                           device=dev, timer=_BarTimer(prof, bar),
                           rng=np.random.default_rng(seed))
        bar.step("finish")
        with prof.stage("parts"):
            out = self._finish(res, prepared, max_parts, center, scale)
        bar.close()
        out.timings = dict(prof.stages)
        out.peak_gpu_gb = prof.peak_memory_gb()
        out.settings = {"points": points, "prompts": prompts, "threshold": threshold,
                        "post_process": post_process, "max_parts": max_parts, "seed": seed,
                        "variant": variant, "connectivity": connectivity,
                        "device": str(dev),
                        "numerics": self.numerics.value}
        return out

    def _finish(self, res: AutomaskResult, prepared: PreparedMesh, max_parts: int | None,
                center, scale) -> SegmentationResult:
        mesh = prepared.mesh
        raw = res.face_ids
        labels = consecutive_labels(raw)
        if max_parts is not None and labels.max(initial=-1) + 1 > max_parts:
            labels = merge_to_max_parts(labels, prepared.graph, prepared.face_areas,
                                        mesh.vertices, mesh.faces, max_parts)
        if center is not None:
            out_mesh = trimesh.Trimesh(vertices=np.asarray(mesh.vertices) * scale + center,
                                       faces=np.asarray(mesh.faces), process=False)
        else:
            out_mesh = mesh
        fmin, fmax = prepared.face_bounds if center is None else \
            R.face_vertex_bounds(out_mesh.vertices, out_mesh.faces)
        ids, boxes = R.label_boxes(labels, fmin, fmax, exclude=(-1,))
        n = int(ids.size)
        assert np.array_equal(ids, np.arange(n))
        lab_c = np.where(labels >= 0, labels, n)
        areas = np.bincount(lab_c, weights=np.asarray(out_mesh.area_faces),
                            minlength=n + 1)[:n]
        counts = np.bincount(lab_c, minlength=n + 1)[:n]
        return SegmentationResult(labels, boxes.reshape(n, 2, 3), areas, counts, out_mesh, {},
                                  raw, res.aabb, center, scale)


# --------------------------------------------------------------------------- helpers

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def consecutive_labels(raw: np.ndarray) -> np.ndarray:
    """Official labels → 0..P-1 in ascending official order; -1/-2 → -1."""
    raw = np.asarray(raw, dtype=np.int64)
    part = ~np.isin(raw, R.UNLABELED)
    uniq, inv = np.unique(raw[part], return_inverse=True)
    out = np.full(raw.shape, -1, dtype=np.int64)
    out[part] = inv.reshape(-1)
    return out


def merge_to_max_parts(labels: np.ndarray, graph: FaceGraph, face_areas: np.ndarray,
                       vertices: np.ndarray, faces: np.ndarray, max_parts: int
                       ) -> np.ndarray:
    """Our extension: merge the smallest parts into neighbours until ``max_parts`` remain.

    Works on the ``P × P`` part graph (shared adjacency edges), updated per merge, so the
    cost is O(P²) per merge after one pass over the faces.  Labels stay 0..P'-1 (ascending
    in the order of the surviving original ids).
    """
    labels = np.asarray(labels, dtype=np.int64)
    p = int(labels.max(initial=-1)) + 1
    if p <= max_parts:
        return labels.copy()
    lab_c = np.where(labels >= 0, labels, p)
    area = np.bincount(lab_c, weights=face_areas, minlength=p + 1)[:p].astype(np.float64)
    fmin, fmax = R.face_vertex_bounds(vertices, faces)
    boxes = R.group_boxes(lab_c, p + 1, fmin, fmax)[:p]
    lu = lab_c[graph.pairs[:, 0]]
    lv = lab_c[graph.pairs[:, 1]]
    ok = (lu != lv) & (lu < p) & (lv < p)
    shared = np.bincount(lu[ok] * p + lv[ok], minlength=p * p).reshape(p, p)
    shared = shared + shared.T
    alive = np.ones(p, dtype=bool)
    target = np.arange(p)
    for _ in range(p - max_parts):
        cand = np.flatnonzero(alive)
        a = area[cand]
        s = cand[np.flatnonzero(a == a.min())[-1]]          # smallest; ties: higher id
        row = np.where(alive, shared[s], 0)
        row[s] = 0
        if row.max() > 0:
            best = np.flatnonzero(row == row.max())
            t = best[np.lexsort((best, -area[best]))][0]
        else:
            c = (boxes[:, 0] + boxes[:, 1]) / 2
            d = np.linalg.norm(c - c[s], axis=1)
            d[~alive] = np.inf
            d[s] = np.inf
            t = int(np.argmin(d))
        # merge s into t
        shared[t] += shared[s]
        shared[:, t] += shared[:, s]
        shared[t, t] = 0
        shared[s] = 0
        shared[:, s] = 0
        area[t] += area[s]
        boxes[t, 0] = np.minimum(boxes[t, 0], boxes[s, 0])
        boxes[t, 1] = np.maximum(boxes[t, 1], boxes[s, 1])
        alive[s] = False
        target[target == s] = t
    new_id = np.cumsum(alive) - 1
    out = np.where(labels >= 0, new_id[target[np.maximum(labels, 0)]], -1)
    return out.astype(np.int64)


def segment(mesh, *, weights: str | os.PathLike | None = None,
            device: torch.device | str | None = None, numerics: Numerics | str = "fast",
            **options) -> SegmentationResult:
    """One-shot :meth:`Segmenter.segment` (loads the model; keep a :class:`Segmenter` to
    segment several meshes)."""
    return Segmenter.from_pretrained(weights, device=device, numerics=numerics).segment(
        mesh, **options)


def _name_of(mesh) -> str:
    if isinstance(mesh, (str, os.PathLike)):
        return Path(mesh).name
    return "mesh"


class _Progress:
    """A tqdm bar over the pipeline stages on stderr (off when stderr is not a terminal)."""

    STAGES = ("load", "adjacency", "sampling", "features", "prompts", "heads", "selection",
              "post-process", "finish")

    def __init__(self, enabled: bool, name: str):
        self.bar = None
        self.name = name
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=len(self.STAGES), desc=f"{name}: load", file=sys.stderr,
                            leave=False, disable=None,
                            bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}]")

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_description_str(f"{self.name}: {name}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _BarTimer:
    """Profile stages that also advance the progress bar."""

    def __init__(self, prof: Profile, bar: _Progress):
        self.prof, self.bar = prof, bar

    def stage(self, name: str):
        self.bar.step(name)
        return self.prof.stage(name)
