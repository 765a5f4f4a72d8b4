"""``turbopart generate``, ``turbopart run`` and ``turbopart bench`` (X-Part commands).

``register(subparsers)`` adds the three sub-commands; :mod:`turbopart.cli` calls it.

* ``generate MESH --boxes BOXES -o OUT``: X-Part for given boxes.
* ``run [MESH] -o OUT``: P3-SAM segmentation (once), its boxes straight into X-Part.  Without
  MESH the bundled example (a chair built from primitives) is used.
* ``bench``: the GPU benchmark of the whole pipeline (``benchmarks/bench_pipeline.py``).

Outputs (written to a temporary sibling folder and moved into place at the end, so a failed
run leaves nothing half-written):

  parts.glb             one named, coloured node per generated part (part_000, ...)
  parts/part_XXX.glb    every part on its own
  exploded.glb          parts moved 0.2 units outward from the common centre (official
                        explode_mesh)
  boxes.glb             the input mesh and the box outlines
  parts.json            per part: id, box, faces, vertices, area, decoder queries; the
                        settings, the timings and the peak GPU memory
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..cli import add_runtime_options, parse_device

log = logging.getLogger(__name__)

import numpy as np

GENERATE_HELP = """\
Generate one mesh per box with X-Part (the official PartFormerPipeline, fast).

BOXES is a JSON file: the parts.json of `turbopart segment` / `turbopart run` (its parts'
"aabb" or "box"), or a plain list of boxes [[minx, miny, minz], [maxx, maxy, maxz]], in the
coordinates of MESH.  Boxes that contain no face of the mesh are dropped.
"""

RUN_HELP = """\
Segment a mesh into parts with P3-SAM, then regenerate every part with X-Part.  The
segmentation runs once and its boxes go straight into X-Part.  Without MESH the bundled
example object (a chair made of primitives) is used.
"""

OUTPUT_HELP = """
Writes into OUT:
  parts.glb           generated parts, one named coloured node per part
  parts/part_XXX.glb  every part on its own
  exploded.glb        parts moved 0.2 units away from the common centre
  boxes.glb           the input mesh with the box outlines
  parts.json          per part: id, box, faces, vertices, area; settings, timings, memory

Presets (steps / final grid): quality 50 / 512 (the official defaults), balanced 30 / 384,
fast 20 / 256.  --steps and --octree-resolution override the preset.

Weights: --weights DIR, $TURBOPART_WEIGHTS or the Hugging Face cache; `turbopart weights
download` fetches tencent/Hunyuan3D-Part.  --weights random builds full-size RANDOM weights
once (cached in ~/.cache/turbopart/random-realistic; random:plain for the plain init): the
output is noise, for trying the tool and for benchmarks only.
"""

BENCH_HELP = """\
Benchmark the whole pipeline on the GPU with full-size random weights (built once if
needed): start-up (fresh process), segmentation, conditioner, sampling loop, volume
decoding, marching cubes, clean-up and export, work counts and rates, peak GPU memory and
GPU utilisation, in exact and fast numerics at K = 8 and K = 24 boxes on sheen_chair.glb.
Prints a table next to the official baseline and writes benchmarks/results/*.json.
"""


# --------------------------------------------------------------------------- parsers

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", default=None, metavar="OUT",
                   help="output folder (created; files of the same names are replaced); "
                        "default: ./<mesh name>_parts")
    p.add_argument("--preset", choices=sorted(PRESET_NAMES), default="quality",
                   help="quality (official: 50 steps, grid 512), balanced (30, 384) or "
                        "fast (20, 256); default quality")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="diffusion steps (official 50)")
    p.add_argument("--octree-resolution", type=int, default=None, metavar="R",
                   help="final decoding grid (official 512; coarse-to-fine from 128)")
    p.add_argument("--max-parts", type=int, default=None, metavar="N",
                   help="at most N parts (X-Part handles up to 50; run: smaller parts are "
                        "merged by the segmentation; generate: the largest N boxes are kept)")
    p.add_argument("--seed", type=int, default=42, metavar="S",
                   help="random seed (surface sampling, noise, part embeddings); official 42")
    add_runtime_options(p, exact_help="the official arithmetic (fp32 weights, bf16 autocast)",
                        fast_help="bf16 weights, fused kernels, CUDA graphs (default)")
    p.add_argument("--weights", default=None, metavar="DIR|random",
                   help="checkpoint folder (default: $TURBOPART_WEIGHTS, then the Hugging "
                        "Face cache); 'random' = full-size random weights (noise output)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also write timings, counters and memory as JSON to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


PRESET_NAMES = ("quality", "balanced", "fast")


def register(subparsers) -> None:
    g = subparsers.add_parser(
        "generate", help="generate one mesh per box (X-Part)",
        description=GENERATE_HELP + OUTPUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("mesh", metavar="MESH", help="mesh file (.glb .gltf .obj .ply .stl .off)")
    g.add_argument("--boxes", required=True, metavar="BOXES",
                   help="JSON boxes (a parts.json, or [[min xyz], [max xyz]] per box)")
    _common(g)
    g.set_defaults(func=cmd_generate)

    r = subparsers.add_parser(
        "run", help="segment (P3-SAM) then generate every part (X-Part)",
        description=RUN_HELP + OUTPUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("mesh", metavar="MESH", nargs="?", default=None,
                   help="mesh file (default: the bundled example chair)")
    _common(r)
    r.add_argument("--points", type=int, default=100000, metavar="N",
                   help="segmentation: surface points (official 100000)")
    r.add_argument("--prompts", type=int, default=400, metavar="N",
                   help="segmentation: point prompts (official 400)")
    r.add_argument("--bench-boxes", default=None, metavar="BOXES", help=argparse.SUPPRESS)
    # benchmarks: X-Part on these boxes instead of P3-SAM's (the official whole-job figure
    # runs P3-SAM, then X-Part on a fixed box grid); the segmentation still runs and is timed
    r.set_defaults(func=cmd_run)

    b = subparsers.add_parser("bench", help="benchmark the whole pipeline on the GPU",
                              description=BENCH_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    mod = _bench_module()
    if mod is not None:
        mod.add_arguments(b)
    b.set_defaults(func=cmd_bench)


# --------------------------------------------------------------------------- helpers

def resolve_settings(args) -> dict[str, Any]:
    from ..cli import UserError
    from .pipeline import PRESETS
    preset = PRESETS[args.preset]
    steps = args.steps if args.steps is not None else preset["steps"]
    octree = args.octree_resolution if args.octree_resolution is not None \
        else preset["octree_resolution"]
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if octree < 16:
        raise UserError("--octree-resolution must be at least 16")
    if args.max_parts is not None and not 1 <= args.max_parts <= 50:
        raise UserError("--max-parts must be between 1 and 50")
    return {"steps": steps, "octree_resolution": octree, "preset": args.preset}


RANDOM_INITS = ("realistic", "plain")


def resolve_weights(spec: str | None, *, progress: bool = True) -> Path:
    """``--weights``: a folder, None (resolve rules), or ``random[:init]`` (built once)."""
    from .. import weights as W
    if spec is None or not str(spec).startswith("random"):
        return W.resolve(spec)
    init = str(spec).partition(":")[2] or "realistic"
    if init not in RANDOM_INITS:
        from ..cli import UserError
        raise UserError(f"--weights {spec}: use random, random:realistic or random:plain")
    return random_weights(init, progress=progress)


def random_weights(init: str = "realistic", *, seed: int = 0, progress: bool = True,
                   cache: str | os.PathLike | None = None) -> Path:
    """Full-size random weights in ``~/.cache/turbopart/random-<init>[-seed<S>]`` (written
    once; drawn with the GPU's generator when there is one)."""
    import torch

    from .. import weights as W
    from ..runtime.bytecode import cache_root
    root = Path(cache) if cache else cache_root()
    path = root / (f"random-{init}" + (f"-seed{seed}" if seed else ""))
    banner = ("!" * 78 + "\n!!  RANDOM WEIGHTS: the models are untrained, every output is NOISE.  "
              "For\n!!  trying the tool and for benchmarks only.  Real weights: "
              "`turbopart weights\n!!  download` (tencent/Hunyuan3D-Part).\n" + "!" * 78)
    print(banner, file=sys.stderr, flush=True)
    if (path / ".complete").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"writing full-size random weights ({init} init, about 9.5 GB) to {path} ...",
          file=sys.stderr, flush=True)
    try:
        W.write_random(tmp, init=init, seed=seed, device=dev, progress=progress)
        (tmp / ".complete").write_text("turbopart random weights\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_boxes(path: str | os.PathLike) -> np.ndarray:
    """Boxes ``[K, 2, 3]`` from a JSON file (see GENERATE_HELP)."""
    from ..cli import UserError
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: not a JSON file ({exc})") from None
    items = data
    if isinstance(data, dict):
        items = data.get("parts", data.get("boxes"))
        if items is None:
            raise UserError(f"{p}: no 'parts' or 'boxes' list")
    if not isinstance(items, list) or not items:
        raise UserError(f"{p}: no boxes")
    boxes = []
    for i, it in enumerate(items):
        b = it
        if isinstance(it, dict):
            b = it.get("aabb", it.get("box", it.get("bbox")))
        if isinstance(b, dict):
            b = [b.get("min"), b.get("max")]
        try:
            arr = np.asarray(b, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.shape != (2, 3) or not np.all(np.isfinite(arr)):
            raise UserError(f"{p}: box {i} is not [[minx, miny, minz], [maxx, maxy, maxz]]")
        if np.any(arr[1] < arr[0]):
            raise UserError(f"{p}: box {i} has max < min")
        boxes.append(arr)
    return np.stack(boxes)


def limit_boxes(boxes: np.ndarray, max_parts: int | None) -> np.ndarray:
    """Keep the ``max_parts`` largest boxes (by volume; ties: input order), input order."""
    if max_parts is None or len(boxes) <= max_parts:
        return boxes
    vol = np.prod(boxes[:, 1] - boxes[:, 0], axis=1)
    keep = np.sort(np.argsort(-vol, kind="stable")[:max_parts])
    print(f"turbopart: keeping the {max_parts} largest of {len(boxes)} boxes (--max-parts)",
          file=sys.stderr)
    return boxes[keep]


class Output:
    """A temporary folder beside OUT, moved into place by :meth:`commit`."""

    def __init__(self, dest: str | os.PathLike):
        from ..cli import UserError
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise UserError(f"{self.dest}: exists and is not a folder")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def path(self, name: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self) -> Path:
        if not self.dest.exists():
            os.replace(self.tmp, self.dest)
            return self.dest
        for item in self.tmp.iterdir():
            target = self.dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        self.tmp.rmdir()
        return self.dest

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class PartFiles:
    """The part files of an output folder, written as each part arrives.

    :meth:`add` queues the part's writes and returns: ``parts/part_XXX.glb``, and the part
    appended to ``parts.glb`` and ``exploded.glb`` (:class:`turbopart.mesh.GlbWriter`; the
    two scenes hold the same arrays, only their node translations differ), each scene on a
    writer thread of its own (appends in order), the part files on two more threads; the
    writes release the GIL, so they run while the next part decodes.  :meth:`close` waits
    for them and writes the scenes' documents (the exploded offsets need every part).  A
    combined scene past the GLB format's 4 GiB is skipped with a warning; the part files are
    still written."""

    SCENES = ("parts.glb", "exploded.glb")

    def __init__(self, out: Output, expected_parts: int):
        from concurrent.futures import ThreadPoolExecutor

        from ..mesh import GlbWriter
        self.out = out
        self.parts: list = []
        self.scenes = {name: GlbWriter.for_meshes(out.path(name), expected_parts)
                       for name in self.SCENES}
        self._scene_threads = {name: ThreadPoolExecutor(1, thread_name_prefix="turbopart-scene")
                               for name in self.SCENES}
        # FIFO with two threads: a part's conversion is taken before its file's write
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="turbopart-write")
        self._jobs: list = []

    def add(self, part) -> None:
        """Queue the writes of ``part`` (a :class:`~turbopart.xpart.pipeline.PartResult`;
        parts without a surface are skipped); an earlier write's error is raised here."""
        from ..mesh import write_glb
        from .pipeline import glb_part, raise_failed
        raise_failed(self._jobs)
        if not part.ok:
            return
        self.parts.append(part)
        mesh = self._pool.submit(glb_part, part)
        self._jobs.append(self._pool.submit(
            lambda: write_glb(self.out.path(f"parts/{part.name}.glb"), [mesh.result()])))
        for name, thread in self._scene_threads.items():
            self._jobs.append(thread.submit(self._append, name, mesh))

    def _append(self, name: str, mesh) -> None:
        from ..mesh import GlbTooLarge
        w = self.scenes.get(name)
        if w is None:  # skipped: past 4 GiB
            return
        try:
            w.add(mesh.result())
        except GlbTooLarge as exc:
            self.scenes.pop(name, None)
            log.warning("%s not written: %s (the part files are)", name, exc)

    def _shutdown(self, cancel: bool) -> None:
        for t in [self._pool, *self._scene_threads.values()]:
            t.shutdown(wait=True, cancel_futures=cancel)

    def close(self) -> None:
        from .pipeline import explode_offsets
        try:
            for j in self._jobs:
                j.result()
        except BaseException:
            self.discard()
            raise
        self._shutdown(cancel=False)
        if not self.parts:  # a scene without geometry cannot be a GLB
            self.discard()
            log.warning("no part produced a surface: parts.glb and exploded.glb not written")
            return
        offsets = explode_offsets(self.parts)
        for name, w in self.scenes.items():
            w.close(offsets if name == "exploded.glb" else None)
        self.scenes = {}

    def discard(self) -> None:
        self._shutdown(cancel=True)
        for w in self.scenes.values():
            w.discard()
        self.scenes = {}


def write_outputs(out: Output, result, mesh, boxes: np.ndarray, info: dict[str, Any],
                  files: PartFiles | None = None) -> None:
    """parts.glb, parts/part_XXX.glb, exploded.glb, boxes.glb, parts.json.

    ``files``: the :class:`PartFiles` that already received ``result``'s parts while they
    were generated (the pipeline's ``on_part``); without it every part is written now."""
    from concurrent.futures import ThreadPoolExecutor

    from .pipeline import boxes_scene
    colors = [p.color for p in result.parts] if len(result.parts) == len(boxes) else None

    def write_boxes():
        out.path("boxes.glb").write_bytes(boxes_scene(mesh, boxes, colors).export(file_type="glb"))

    with ThreadPoolExecutor(1) as pool:
        fboxes = pool.submit(write_boxes)
        if files is None:
            files = PartFiles(out, len(result.parts))
            try:
                for p in result.parts:
                    files.add(p)
            except BaseException:
                files.discard()
                raise
        files.close()
        fboxes.result()
    with open(out.path("parts.json"), "w") as f:
        json.dump(info, f, indent=2)


def _process_age() -> float | None:
    from ..runtime.profiling import process_age
    return process_age()


def _peak_gpu(device) -> dict[str, float | None]:
    import torch
    if device.type != "cuda":
        return {"peak_gpu_allocated_gb": None, "peak_gpu_reserved_gb": None}
    return {"peak_gpu_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def _summary(timings: dict[str, float], memory: dict[str, Any], parts: int, faces: int
             ) -> str:
    width = max(len(k) for k in timings) if timings else 5
    lines = [f"  {k:<{width}}  {v:8.2f} s" for k, v in timings.items()]
    if memory.get("peak_gpu_allocated_gb") is not None:
        lines.append(f"  {'peak GPU memory':<{width}}  {memory['peak_gpu_allocated_gb']:8.2f} GB")
    return f"{parts} parts, {faces} faces\n" + "\n".join(lines)


def _report(result, *, command: str, source: str, mesh, settings: dict, timings: dict,
            memory: dict, extra: dict | None = None) -> dict[str, Any]:
    from .. import __version__
    from ..mesh import mesh_info
    parts = []
    for p in result.parts:
        d = p.info()
        d["aabb"] = {"min": d["box"][0], "max": d["box"][1]}
        parts.append(d)
    skipped = [p.box_index for p in result.parts if not p.ok]
    info = {"turbopart_version": __version__, "command": command, "source": source,
            "mesh": mesh_info(mesh), "settings": {**settings, **result.settings},
            "num_parts": sum(p.ok for p in result.parts), "parts": parts,
            "skipped_boxes_no_surface": skipped, "dropped_boxes_no_faces": result.dropped_boxes,
            "counters": result.counters, "timings_s": {k: round(v, 6) for k, v in timings.items()},
            "memory": memory}
    if extra:
        info.update(extra)
    return info


def _finish(args, out: Output, result, mesh, boxes, info, timings,
            files: PartFiles | None = None) -> int:
    """Write the outputs (``files``: the part files streamed during generation), commit
    the folder, print the summary.  ``export`` in the timings is the writing done during
    generation (beside the decoding) plus the writing here."""
    from ..cli import UserError
    if not any(p.ok for p in result.parts):
        raise UserError("X-Part produced no surface for any part; nothing written")
    t0 = time.perf_counter()
    write_outputs(out, result, mesh, boxes, info, files)
    timings["export"] = timings.get("export", 0.0) + time.perf_counter() - t0
    info["timings_s"]["export"] = round(timings["export"], 6)
    with open(out.path("parts.json"), "w") as f:
        json.dump(info, f, indent=2)
    dest = out.commit()
    age = _process_age()
    if args.profile:
        with open(args.profile, "w") as f:
            json.dump({"timings_s": timings, "memory": info["memory"],
                       "counters": info["counters"], "settings": info["settings"],
                       "segmentation": info.get("segmentation"),
                       "load_s": info.get("load_s"), "process_age_at_end_s": age}, f,
                      indent=2)
    faces = sum(p["faces"] for p in info["parts"])
    print(f"wrote {dest}: " + _summary(timings, info["memory"], info["num_parts"], faces))
    return 0


def _load_pipeline(args, device, weights: Path):
    from .pipeline import XPartPipeline
    return XPartPipeline.from_pretrained(weights, device=device, numerics=args.numerics)


def _config_value(weights: Path, component: str, keys: tuple[str, ...], default: int) -> int:
    """An integer of ``component``'s config.json under ``params`` / nested ``keys`` (the
    default when the file or the key is missing: the loader reports bad folders)."""
    from .. import weights as W
    try:
        node = W.read_config(W.locate(weights, component), component)
        node = node.get("params", node)
        for k in keys:
            node = node[k]
        return int(node)
    except Exception:
        return default


def surface_points_of(weights: Path) -> int:
    """The conditioner encoders' pc_size from its config.json (81 920 for the release)."""
    from .preprocess import SURFACE_POINTS
    return _config_value(weights, "conditioner", ("geo_cfg", "params", "local_geo_cfg",
                                                  "params", "pc_size"), SURFACE_POINTS)


def max_parts_of(weights: Path) -> int:
    """Rows of the DiT's part embedding (``valid_num``, 50 for the release): the most parts
    X-Part generates at once."""
    from .pipeline import MAX_PARTS
    return _config_value(weights, "model", ("valid_num",), MAX_PARTS)


def _own_copy(mesh):
    """A private copy for a worker thread (trimesh caches are not thread-safe)."""
    import trimesh
    return trimesh.Trimesh(vertices=np.array(mesh.vertices), faces=np.array(mesh.faces),
                           process=False)


# --------------------------------------------------------------------------- commands

def default_out(out, mesh) -> str:
    """``-o`` if given, else ``./<mesh stem>_parts``."""
    return out if out else f"{Path(str(mesh)).stem}_parts"


def cmd_generate(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from ..mesh import check_mesh_file
    settings = resolve_settings(args)
    check_mesh_file(args.mesh)  # a missing or unsupported file fails before any work
    boxes = limit_boxes(read_boxes(args.boxes), args.max_parts)
    device = parse_device(args.device)
    out = Output(default_out(args.out, args.mesh))
    pool = ThreadPoolExecutor(2)
    files = None
    try:
        from .pipeline import XPartPipeline  # noqa: F401 - imported here, loaded on a thread
        from .preprocess import object_inputs
        timings: dict[str, float] = {"startup": _process_age() or 0.0}
        from ..runtime import first_use
        first_use.start(device)  # library first-use costs while the models load
        t0 = time.perf_counter()
        weights = resolve_weights(args.weights, progress=not args.quiet)
        # X-Part streams in while this thread reads the mesh; the object surface is
        # sampled beside the rest of the load
        fpipe = pool.submit(_load_pipeline, args, device, weights)
        mesh, _ = _input_mesh(args.mesh)
        timings["mesh"] = time.perf_counter() - t0
        fobj = pool.submit(object_inputs, _own_copy(mesh), args.seed, surface_points_of(weights))
        pipe = fpipe.result()
        timings["load"] = time.perf_counter() - t0
        obj = fobj.result()
        files = PartFiles(out, len(boxes))
        result = pipe(mesh, boxes, steps=settings["steps"],
                      octree_resolution=settings["octree_resolution"], seed=args.seed,
                      progress=not args.quiet, obj=obj, on_part=files.add)
        timings.update(result.timings)
        info = _report(result, command="generate", source=str(args.mesh), mesh=mesh,
                       settings=settings, timings=timings, memory=_peak_gpu(device),
                       extra={"load_s": pipe.load_timings})
        return _finish(args, out, result, mesh, boxes[result_valid(result, boxes)], info,
                       timings, files)
    except BaseException:
        if files is not None:
            files.discard()
        out.discard()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def result_valid(result, boxes: np.ndarray) -> np.ndarray:
    keep = np.ones(len(boxes), dtype=bool)
    keep[result.dropped_boxes] = False
    return keep


def _input_mesh(path) -> tuple:
    """The command's mesh and its source name (the bundled example when ``path`` is None)."""
    from ..mesh import load_mesh
    if path is None:
        from ..examples import example_mesh
        return example_mesh("chair"), "example:chair"
    return load_mesh(path), str(path)


def cmd_run(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from ..cli import UserError
    from ..mesh import check_mesh_file
    settings = resolve_settings(args)
    if args.points < 1 or args.prompts < 1:
        raise UserError("--points and --prompts must be at least 1")
    if args.prompts > args.points:
        raise UserError("--prompts cannot exceed --points")
    fixed = read_boxes(args.bench_boxes) if getattr(args, "bench_boxes", None) else None
    device = parse_device(args.device)
    if args.mesh is not None:
        check_mesh_file(args.mesh)  # a missing or unsupported file fails before any work
    out = Output(default_out(args.out, args.mesh or "example"))
    pool = ThreadPoolExecutor(3)
    files = None
    segmented = threading.Event()
    try:
        timings: dict[str, float] = {"startup": _process_age() or 0.0}
        from ..runtime import first_use
        # library first-use costs while the models load; the decoder's and meshing's
        # after the segmentation (beside X-Part's conditioner and DiT loop)
        first_use.start(device, hold=segmented)
        t0 = time.perf_counter()
        weights = resolve_weights(args.weights, progress=not args.quiet)
        from ..p3sam.segmenter import Segmenter
        from .pipeline import XPartPipeline
        from .preprocess import object_inputs
        # P3-SAM loads on a thread while this one imports trimesh and reads the mesh (CPU
        # work of about a second that used to come first); X-Part's object surface is
        # sampled as soon as the mesh is there, and X-Part (8 GB) streams in while P3-SAM
        # segments.  TURBOPART_RUN_LOAD_ORDER=together starts both loads at once (the small
        # P3-SAM then shares the disk with X-Part from its first byte).
        fseg = pool.submit(Segmenter.from_pretrained, weights, device=device,
                           numerics=args.numerics)

        def load_xpart():
            return pool.submit(XPartPipeline.from_pretrained, weights, device=device,
                               numerics=args.numerics)
        together = os.environ.get("TURBOPART_RUN_LOAD_ORDER", "p3sam-first") == "together"
        fx = load_xpart() if together else None
        mesh, source = _input_mesh(args.mesh)
        timings["mesh"] = time.perf_counter() - t0
        fobj = pool.submit(object_inputs, _own_copy(mesh), args.seed, surface_points_of(weights))
        seg_model = fseg.result()
        fx = fx or load_xpart()
        timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        limit = max_parts_of(weights)
        max_parts = min(args.max_parts or limit, limit)
        kw = {}
        params = inspect.signature(seg_model.segment).parameters
        if "normalize" in params:
            kw["normalize"] = True  # official X-Part: P3-SAM runs on the normalised mesh
        seg = seg_model.segment(mesh, points=args.points, prompts=args.prompts,
                                max_parts=max_parts, seed=args.seed, variant="xpart",
                                progress=not args.quiet, **kw)
        timings["segmentation"] = time.perf_counter() - t0
        segmented.set()
        del seg_model  # P3-SAM's GPU memory goes back to X-Part's budget
        if seg.num_parts == 0 and fixed is None:
            raise UserError("segmentation found no parts")
        t0 = time.perf_counter()
        pipe, obj = fx.result(), fobj.result()
        timings["load_wait"] = time.perf_counter() - t0  # X-Part still loading after P3-SAM
        if fixed is not None:  # benchmarks: the official whole-job figure's fixed boxes
            boxes, kw = limit_boxes(fixed, args.max_parts), {}
        else:
            # P3-SAM's boxes (input frame, float64) are min/max of the cleaned mesh's
            # vertices; X-Part normalises them in float64 and samples the parts from that
            # cleaned mesh, as the official pipeline does when P3-SAM runs inside it.
            boxes, kw = seg.boxes, {"official_float32_boxes": False, "part_mesh": seg.mesh}
        files = PartFiles(out, len(boxes))
        result = pipe(mesh, boxes, steps=settings["steps"],
                      octree_resolution=settings["octree_resolution"], seed=args.seed,
                      progress=not args.quiet, obj=obj, on_part=files.add, **kw)
        timings.update(result.timings)
        seg_info = {"parts": seg.num_parts, "timings_s": seg.timings,
                    "unlabeled_faces": seg.unlabeled_faces,
                    "settings": getattr(seg, "settings", {})}
        info = _report(result, command="run", source=source, mesh=mesh, settings=settings,
                       timings=timings, memory=_peak_gpu(device),
                       extra={"segmentation": seg_info, "load_s": pipe.load_timings})
        return _finish(args, out, result, mesh, boxes[result_valid(result, boxes)], info,
                       timings, files)
    except BaseException:
        if files is not None:
            files.discard()
        out.discard()
        raise
    finally:
        segmented.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _bench_script() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pipeline.py"


def _bench_module():
    """``benchmarks/bench_pipeline.py`` of the source checkout (None when not there)."""
    script = _bench_script()
    if not script.is_file():
        return None
    import importlib.util
    name = "turbopart_bench_pipeline"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cmd_bench(args) -> int:
    from ..cli import UserError
    mod = _bench_module()
    if mod is None:
        raise UserError(f"turbopart bench needs the source checkout ({_bench_script()} "
                        "not found)")
    return int(mod.run(args) or 0)
