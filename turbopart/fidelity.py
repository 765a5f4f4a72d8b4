"""The fidelity report: how far ``fast`` numerics land from ``exact`` (the official arithmetic).

Same weights, same inputs, same random draws; each section runs the stage twice, once per
numerics, and measures the distance between the two results:

* **p3sam**: Sonata/MLP point features (relative error), the prompt heads on the same
  prompts (best-mask point agreement, best-head agreement, predicted-IoU difference), and
  the whole automatic segmentation (face-label agreement after the best renumbering,
  area-weighted too; part counts; box IoU of matched parts).
* **dit**: one DiT evaluation on the same latents/conditions/timestep/part embeddings
  (relative error of the velocity).
* **xpart**: a whole generation on the same boxes and seeds (relative error of the final
  latents, per-part Chamfer distance of the meshes in units of the part's box diagonal,
  face counts).

``turbopart fidelity`` prints the table and writes the JSON; results belong in
``benchmarks/results/`` next to the speed figures.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import metrics
from .runtime.precision import Numerics


@dataclass
class FidelityReport:
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        from .runtime.profiling import environment
        return {"report": "fidelity (fast vs exact)", "environment": environment(),
                "settings": self.settings, "sections": self.sections}

    def table(self) -> str:
        lines = ["fidelity: fast vs exact (same weights, inputs and random draws)"]
        for name, sec in self.sections.items():
            lines.append(f"[{name}]")
            for k, v in sec.items():
                if isinstance(v, float):
                    v = f"{v:.4g}"
                elif isinstance(v, list) and v and isinstance(v[0], float):
                    v = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
                lines.append(f"  {k:<34} {v}")
        return "\n".join(lines)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- P3-SAM

def p3sam_section(weights, mesh, *, device: torch.device, points: int = 100000,
                  prompts: int = 400, seed: int = 42) -> dict[str, Any]:
    from .geometry.fps import farthest_point_sampling
    from .mesh import as_mesh, clean_mesh, normalize_points, sample_surface
    from .p3sam.segmenter import Segmenter
    out: dict[str, Any] = {}
    runs = {}
    for num in (Numerics.EXACT, Numerics.FAST):
        seg = Segmenter.from_pretrained(weights, device=device, numerics=num)
        t0 = time.perf_counter()
        res = seg.segment(mesh, points=points, prompts=prompts, seed=seed)
        seconds = time.perf_counter() - t0
        # Network level: the same normalised points, voxel draws and prompts.
        m = clean_mesh(as_mesh(mesh), rewrap_process=True)
        pts, fidx = sample_surface(m, points, seed)
        nrm = np.asarray(m.face_normals)[fidx]
        norm, _, _ = normalize_points(pts)
        gen = torch.Generator().manual_seed(seed)
        shifted = seg.predictor.set_points(torch.as_tensor(norm, device=device),
                                           torch.as_tensor(nrm, device=device), generator=gen)
        feats = seg.predictor.features.point_feat.float().cpu()
        idx = farthest_point_sampling(shifted.float(), prompts, 0, ties="last")
        pred = seg.predictor.predict(shifted[idx].float())
        runs[num] = dict(result=res, seconds=seconds, feats=feats,
                         masks=pred.masks.cpu(), head=pred.best_head.cpu(),
                         iou=pred.pred_iou.float().cpu())
        del seg
        _free(device)
    e, f = runs[Numerics.EXACT], runs[Numerics.FAST]
    out["features_relative_error"] = metrics.relative_error(f["feats"], e["feats"])
    out["best_mask_point_agreement"] = float((f["masks"] == e["masks"]).float().mean())
    out["best_head_agreement"] = float((f["head"] == e["head"]).float().mean())
    out["pred_iou_max_abs_diff"] = metrics.max_abs_error(f["iou"], e["iou"])
    re, rf = e["result"], f["result"]
    out["parts_exact"] = re.num_parts
    out["parts_fast"] = rf.num_parts
    if len(re.face_labels) == len(rf.face_labels):
        out["face_label_agreement"] = metrics.label_agreement(rf.face_labels, re.face_labels)
        out["face_label_agreement_area"] = metrics.label_agreement(
            rf.face_labels, re.face_labels, weights=np.asarray(re.mesh.area_faces))
        mapping, _ = metrics.best_matching(rf.face_labels, re.face_labels)
        ious = [metrics.box_iou(re.boxes[a], rf.boxes[b]) for a, b in mapping.items()
                if a >= 0 and b >= 0]
        out["matched_box_iou_min"] = float(min(ious)) if ious else None
        out["matched_box_iou_mean"] = float(np.mean(ious)) if ious else None
    out["seconds_exact"] = e["seconds"]
    out["seconds_fast"] = f["seconds"]
    return out


# --------------------------------------------------------------------------- DiT

def dit_section(weights, *, device: torch.device, parts: int = 8, seed: int = 0,
                t: float = 0.37) -> dict[str, Any]:
    from . import weights as W
    from .xpart.dit import draw_part_index
    from .xpart.dit_runner import DiTRunner
    g = torch.Generator(device="cpu").manual_seed(seed)
    outs = {}
    for num in (Numerics.EXACT, Numerics.FAST):
        model = W.load_component(weights, "model", device=device, numerics=num).prepare(num)
        p = model.params
        n, c = int(p.get("input_size", 1024)), int(p["in_channels"])
        e1, e2 = int(p["encoder_hidden_dim"]), int(p["encoder_hidden2_dim"])
        g.manual_seed(seed)
        x = torch.randn(parts, n, c, generator=g).to(device)
        obj = torch.randn(parts, 4096 if n >= 1024 else 4 * n, e1, generator=g).to(device)
        geo = torch.randn(parts, obj.shape[1], e2, generator=g).to(device)
        idx = draw_part_index(parts, model.valid_num, g)
        runner = DiTRunner(model, obj, geo, cache_blocks="none", cuda_graph=False)
        outs[num] = runner(x, t, idx).float().cpu()
        runner.close()
        del model, runner
        _free(device)
    e, f = outs[Numerics.EXACT], outs[Numerics.FAST]
    return {"parts": parts, "velocity_relative_error": metrics.relative_error(f, e),
            "velocity_max_abs_over_max_ref": metrics.max_abs_error(f, e) /
            max(float(e.abs().max()), 1e-30)}


# --------------------------------------------------------------------------- X-Part

def xpart_section(weights, mesh, *, device: torch.device, boxes: np.ndarray | None = None,
                  steps: int = 50, octree_resolution: int = 256, seed: int = 42
                  ) -> dict[str, Any]:
    from .mesh import as_mesh
    from .xpart.pipeline import XPartPipeline
    from .xpart.preprocess import grid_boxes
    m = as_mesh(mesh)
    if boxes is None:
        boxes = grid_boxes(np.asarray(m.bounds), (2, 2, 2))
    res = {}
    for num in (Numerics.EXACT, Numerics.FAST):
        pipe = XPartPipeline.from_pretrained(weights, device=device, numerics=num)
        t0 = time.perf_counter()
        res[num] = (pipe(m, boxes, steps=steps, octree_resolution=octree_resolution,
                         seed=seed, keep_latents=True), time.perf_counter() - t0)
        res[num][0].latents = res[num][0].latents.float().cpu()
        del pipe
        _free(device)
    (e, te), (f, tf) = res[Numerics.EXACT], res[Numerics.FAST]
    out: dict[str, Any] = {"parts": len(e.parts), "steps": steps,
                           "octree_resolution": octree_resolution,
                           "latents_relative_error": metrics.relative_error(f.latents,
                                                                             e.latents)}
    cham, faces_e, faces_f = [], [], []
    for pe, pf in zip(e.parts, f.parts):
        faces_e.append(len(pe.mesh.faces) if pe.ok else 0)
        faces_f.append(len(pf.mesh.faces) if pf.ok else 0)
        if pe.ok and pf.ok:
            diag = float(np.linalg.norm(pe.box[1] - pe.box[0]))
            cham.append(metrics.chamfer_distance(pe.mesh, pf.mesh, 20000) / max(diag, 1e-12))
    out["chamfer_over_box_diagonal"] = cham
    out["chamfer_over_box_diagonal_max"] = max(cham) if cham else None
    out["faces_exact"] = faces_e
    out["faces_fast"] = faces_f
    out["seconds_exact"] = te
    out["seconds_fast"] = tf
    return out


def fidelity_report(weights, mesh, *, device: torch.device | str | None = None,
                    sections: tuple[str, ...] = ("p3sam", "dit", "xpart"),
                    points: int = 100000, prompts: int = 400, steps: int = 50,
                    octree_resolution: int = 256, parts: int = 8, seed: int = 42,
                    progress: bool = True) -> FidelityReport:
    """Run the requested sections and return the report."""
    from .runtime import memory
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    memory.set_gpu_budget(None)  # both numerics' models live one after the other
    rep = FidelityReport(settings={"device": str(dev), "points": points, "prompts": prompts,
                                   "steps": steps, "octree_resolution": octree_resolution,
                                   "parts": parts, "seed": seed, "sections": list(sections)})
    for name in sections:
        if progress:
            print(f"fidelity: {name} ...", flush=True)
        if name == "p3sam":
            rep.sections[name] = p3sam_section(weights, mesh, device=dev, points=points,
                                               prompts=prompts, seed=seed)
        elif name == "dit":
            rep.sections[name] = dit_section(weights, device=dev, parts=parts, seed=seed)
        elif name == "xpart":
            rep.sections[name] = xpart_section(weights, mesh, device=dev, steps=steps,
                                               octree_resolution=octree_resolution,
                                               seed=seed)
        else:
            raise ValueError(f"unknown fidelity section {name!r}")
    return rep
