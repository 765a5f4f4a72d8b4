"""The web app: upload a mesh, segment it, generate its parts, look at them, download them.

``turbopart app`` (needs the ``app`` extra: ``pip install -e ".[app]"``).  The models load
once, in parallel, on the first request and stay loaded; requests run one at a time on the
GPU (a queue), and every request writes into its own folder, so concurrent users never
overwrite each other's files (the official demo writes fixed file names in the working
directory).
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PRESETS = {"quality": (50, 512), "balanced": (30, 384), "fast": (20, 256)}


@dataclass
class Engine:
    """Models kept loaded for the app (and for tests that drive the handlers directly)."""

    weights: str | None = None
    device: str | None = None
    numerics: str = "fast"
    points: int = 100000    # segmentation surface points (official)
    prompts: int = 400      # segmentation prompts (official)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="turbopart-app-")))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seg: Any = None
    _pipe: Any = None
    _weights_path: Path | None = None

    def models(self):
        with self._lock:
            if self._seg is None:
                from concurrent.futures import ThreadPoolExecutor

                from .p3sam.segmenter import Segmenter
                from .cli import parse_device
                from .xpart.commands import resolve_weights
                from .xpart.pipeline import XPartPipeline
                self._weights_path = resolve_weights(self.weights, progress=True)
                dev = parse_device(self.device)
                with ThreadPoolExecutor(2) as pool:
                    fs = pool.submit(Segmenter.from_pretrained, self._weights_path, device=dev,
                                     numerics=self.numerics)
                    fx = pool.submit(XPartPipeline.from_pretrained, self._weights_path,
                                     device=dev, numerics=self.numerics)
                    self._seg, self._pipe = fs.result(), fx.result()
            return self._seg, self._pipe

    def request_dir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="req-", dir=self.workdir))
        return d

    # ------------------------------------------------------------------ handlers

    def segment(self, mesh_path: str, seed: int = 42, max_parts: int = 50):
        """→ (segmented.glb path, info dict, [files], SegmentationResult)."""
        from .cli import UserError
        from .commands import write_segmentation
        from .mesh import load_mesh
        if not mesh_path:
            raise UserError("upload a mesh first")
        mesh = load_mesh(mesh_path)
        seg_model, _ = self.models()
        t0 = time.perf_counter()
        res = seg_model.segment(mesh, points=self.points, prompts=self.prompts,
                                seed=int(seed), max_parts=int(max_parts), variant="xpart",
                                normalize=True)
        dest = write_segmentation(self.request_dir() / "segmentation", res,
                                  source=Path(mesh_path), mesh_in=mesh)
        info = {"parts": res.num_parts, "seconds": round(time.perf_counter() - t0, 3),
                "boxes": res.boxes.round(5).tolist()}
        files = [str(dest / n) for n in ("segmented.glb", "parts.json", "face_ids.npy")]
        return str(dest / "segmented.glb"), info, files, res

    def generate(self, mesh_path: str, preset: str = "balanced", seed: int = 42,
                 max_parts: int = 50, segmentation=None):
        """→ (parts.glb, exploded.glb, info dict, [files])."""
        from .mesh import load_mesh
        from .xpart.commands import Output, _report, result_valid, write_outputs
        if segmentation is None:
            _, _, _, segmentation = self.segment(mesh_path, seed, max_parts)
        mesh = load_mesh(mesh_path)
        _, pipe = self.models()
        steps, res = PRESETS[preset]
        result = pipe(mesh, segmentation.boxes, steps=steps, octree_resolution=res,
                      seed=int(seed), official_float32_boxes=False,
                      part_mesh=segmentation.mesh)
        out = Output(self.request_dir() / "parts")
        ok = np.array([p.ok for p in result.parts], dtype=bool)
        info = _report(result, command="app", source=mesh_path, mesh=mesh,
                       settings={"preset": preset, "steps": steps, "octree_resolution": res,
                                 "seed": int(seed)}, timings=dict(result.timings),
                       memory={}, extra={})
        write_outputs(out, result, mesh,
                      segmentation.boxes[result_valid(result, segmentation.boxes)], info)
        dest = out.commit()
        files = [str(dest / n) for n in ("parts.glb", "exploded.glb", "boxes.glb",
                                         "parts.json")]
        summary = {"parts generated": int(ok.sum()), "of boxes": len(result.parts),
                   "seconds": {k: round(v, 3) for k, v in result.timings.items()}}
        return str(dest / "parts.glb"), str(dest / "exploded.glb"), summary, files


def build_app(engine: Engine):
    """The Gradio Blocks UI around ``engine``."""
    try:
        import gradio as gr
    except ImportError:
        from .cli import UserError
        raise UserError('the web app needs gradio: pip install -e ".[app]"') from None

    def on_segment(mesh_path, seed, max_parts):
        try:
            glb, info, files, res = engine.segment(mesh_path, seed, max_parts)
        except Exception as exc:  # shown in the UI, the server keeps running
            raise gr.Error(str(exc)) from None
        return glb, info, files, res

    def on_generate(mesh_path, preset, seed, max_parts, seg):
        try:
            parts, exploded, info, files = engine.generate(mesh_path, preset, seed, max_parts,
                                                            seg)
        except Exception as exc:
            raise gr.Error(str(exc)) from None
        return parts, exploded, info, files

    random_note = ("\n\n**Random weights: every output is noise** (for trying the app only)."
                   if str(engine.weights or "").startswith("random") else "")
    with gr.Blocks(title="turbopart") as demo:
        gr.Markdown("# turbopart — Hunyuan3D-Part, fast\nUpload a mesh, **segment** it into "
                    "parts (P3-SAM), then **generate** every part as its own mesh (X-Part). "
                    "Presets: quality = 50 steps / grid 512 (official), balanced = 30 / 384, "
                    "fast = 20 / 256." + random_note)
        seg_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                mesh = gr.Model3D(label="Input mesh (.glb .gltf .obj .ply .stl)")
                preset = gr.Radio(list(PRESETS), value="balanced", label="Preset")
                seed = gr.Number(value=42, precision=0, label="Seed")
                max_parts = gr.Slider(1, 50, value=50, step=1, label="Max parts")
                seg_btn = gr.Button("1 · Segment", variant="secondary")
                gen_btn = gr.Button("2 · Generate parts", variant="primary")
            with gr.Column(scale=2):
                with gr.Row():
                    seg_view = gr.Model3D(label="Segmentation")
                    parts_view = gr.Model3D(label="Generated parts")
                    exploded_view = gr.Model3D(label="Exploded view")
                info = gr.JSON(label="Parts and timings")
                files = gr.File(label="Downloads", file_count="multiple")
        mesh.change(lambda _: None, mesh, seg_state)
        seg_btn.click(on_segment, [mesh, seed, max_parts], [seg_view, info, files, seg_state])
        gen_btn.click(on_generate, [mesh, preset, seed, max_parts, seg_state],
                      [parts_view, exploded_view, info, files])
    demo.queue(default_concurrency_limit=1)
    return demo


def serve(weights: str | None, *, device: str | None, numerics: str, host: str, port: int,
          share: bool = False, preload: bool = True) -> None:
    engine = Engine(weights=weights, device=device, numerics=numerics)
    demo = build_app(engine)
    if preload:
        engine.models()
    demo.launch(server_name=host, server_port=port, share=share)


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
