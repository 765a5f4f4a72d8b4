"""Product commands of the ``turbopart`` CLI (registered by :mod:`turbopart.cli`).

``turbopart segment MESH|FOLDER -o OUT``: automatic part segmentation (P3-SAM).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .cli import add_runtime_options

SEGMENT_HELP = """\
Segment a mesh into parts with P3-SAM (the official automatic-mask algorithm).

Writes into OUT:
  segmented.glb   the cleaned mesh, one named node per part (part_000, part_001, ...;
                  unlabeled faces, if any, in a grey node 'unlabeled'), coloured per part
  parts.json      per part: id, name, face count, area, axis-aligned box (input mesh
                  coordinates); plus mesh facts, the settings and stage timings
  face_ids.npy    int64 part id of every face of the cleaned mesh (-1: unlabeled)
With a folder as MESH, every mesh file in it (.glb .gltf .obj .ply .stl .off) is segmented
into OUT/<file stem>/.  Files are written to a temporary folder and moved into place at the
end, so a failed run leaves no partial output.
"""


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "segment", help="automatic part segmentation of a mesh (P3-SAM)",
        description=SEGMENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("mesh", metavar="MESH",
                   help="mesh file (.glb .gltf .obj .ply .stl .off) or a folder of them")
    s.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output folder (created; existing files of the same names are "
                        "replaced)")
    s.add_argument("--weights", metavar="DIR", default=None,
                   help="checkpoint folder (Hugging Face layout, e.g. from "
                        "`turbopart weights download` or `turbopart weights random`); "
                        "default: $TURBOPART_WEIGHTS, then the Hugging Face cache")
    s.add_argument("--points", type=int, default=100000, metavar="N",
                   help="surface points sampled (official: 100000)")
    s.add_argument("--prompts", type=int, default=400, metavar="N",
                   help="point prompts chosen by farthest-point sampling (official: 400)")
    s.add_argument("--threshold", type=float, default=0.95, metavar="T",
                   help="post-process: regions beyond this cumulative area fraction (and "
                        "under 1%% of the area) merge into a neighbour (official: 0.95)")
    s.add_argument("--no-post-process", dest="post_process", action="store_false",
                   help="skip the final small-region merge (the official CLI default; "
                        "AutoMask and X-Part run it)")
    s.add_argument("--max-parts", type=int, default=None, metavar="N",
                   help="then merge the smallest parts into neighbours until at most N "
                        "remain (turbopart extension; default: no limit)")
    s.add_argument("--seed", type=int, default=42, metavar="S",
                   help="random seed of the surface sampling, voxel choice and FPS start "
                        "(official: 42)")
    s.add_argument("--variant", choices=["p3sam", "xpart"], default="p3sam",
                   help="official copy to follow: p3sam (P3-SAM demo, welds seams after "
                        "cleaning) or xpart (X-Part pipeline: normalises the mesh, keeps "
                        "seams open); default p3sam")
    s.add_argument("--no-connectivity", dest="connectivity", action="store_false",
                   help="official no-connectivity variant: each face takes the majority label "
                        "of its nearest labelled points (no repair, no merging; "
                        "--threshold and post-processing unused)")
    add_runtime_options(s, exact_help="official arithmetic (fp32 heads, fp16 Sonata attention)",
                        fast_help="bf16 matmuls with fp32 accumulation on CUDA (default)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_segment)

    f = subparsers.add_parser(
        "fidelity", help="measure how far --fast lands from --exact (the official numerics)",
        description="Run P3-SAM, one DiT step and a whole X-Part generation twice on the same "
                    "weights, inputs and random draws, once with the official numerics "
                    "(--exact) and once with turbopart's (--fast), and report the distances: "
                    "feature error, mask / best-head / face-label agreement, DiT velocity "
                    "error, latent error and part-mesh Chamfer distance.")
    f.add_argument("mesh", nargs="?", default=None, metavar="MESH",
                   help="mesh file (default: the bundled example)")
    f.add_argument("--weights", metavar="DIR", default=None,
                   help="checkpoint folder (default: $TURBOPART_WEIGHTS, the HF cache)")
    f.add_argument("--sections", nargs="+", choices=["p3sam", "dit", "xpart"],
                   default=["p3sam", "dit", "xpart"], help="what to compare (default: all)")
    f.add_argument("--points", type=int, default=100000, metavar="N")
    f.add_argument("--prompts", type=int, default=400, metavar="N")
    f.add_argument("--steps", type=int, default=50, metavar="N", help="sampling steps")
    f.add_argument("--octree-resolution", type=int, default=256, metavar="R",
                   help="volume grid of the X-Part comparison (default 256)")
    f.add_argument("--parts", type=int, default=8, metavar="K", help="parts of the DiT check")
    f.add_argument("--seed", type=int, default=42)
    add_runtime_options(f, numerics=False)
    f.add_argument("--out", default=None, metavar="FILE", help="write the report as JSON")
    f.set_defaults(func=cmd_fidelity)

    a = subparsers.add_parser(
        "app", help="the web app (upload, segment, generate, view, download)",
        description="Serve the turbopart web app (Gradio; install with pip install -e "
                    "\".[app]\"). The models load once and stay loaded; requests run one at "
                    "a time, each in its own output folder.")
    a.add_argument("--weights", metavar="DIR|random", default=None,
                   help="checkpoint folder (default: $TURBOPART_WEIGHTS, the HF cache); "
                        "'random' = full-size random weights (noise output)")
    add_runtime_options(a)
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    a.add_argument("--port", type=int, default=7860)
    a.add_argument("--share", action="store_true", help="a public Gradio link")
    a.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    from .app import serve
    serve(args.weights, device=args.device, numerics=args.numerics, host=args.host,
          port=args.port, share=args.share)
    return 0


def cmd_fidelity(args) -> int:
    import json

    from .fidelity import fidelity_report
    from .weights import resolve
    mesh = args.mesh
    if mesh is None:
        from .examples import example_mesh
        mesh = example_mesh()
    rep = fidelity_report(resolve(args.weights), mesh, device=args.device,
                          sections=tuple(args.sections), points=args.points,
                          prompts=args.prompts, steps=args.steps,
                          octree_resolution=args.octree_resolution, parts=args.parts,
                          seed=args.seed)
    print(rep.table())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(rep.as_dict(), fh, indent=2, default=float)
    return 0


# --------------------------------------------------------------------------- segment

def cmd_segment(args) -> int:
    from .cli import UserError
    from .mesh import MESH_SUFFIXES, find_meshes, load_mesh

    src = Path(args.mesh)
    out = Path(args.out)
    for name, val in (("--points", args.points), ("--prompts", args.prompts)):
        if val < 1:
            raise UserError(f"{name} must be at least 1")
    if args.prompts > args.points:
        raise UserError("--prompts cannot exceed --points")
    if args.max_parts is not None and args.max_parts < 1:
        raise UserError("--max-parts must be at least 1")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError("--threshold must be between 0 and 1")
    if src.is_dir():
        files = find_meshes(src)
        if not files:
            raise UserError(f"{src}: no mesh files ({' '.join(MESH_SUFFIXES)})")
        jobs = [(f, out / f.stem) for f in files]
    else:
        jobs = [(src, out)]
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    # refuse bad input before loading the model (one clear line, nothing written)
    meshes = {}
    errors = []
    for f, _ in jobs:
        try:
            meshes[f] = load_mesh(f)
        except UserError as exc:
            if len(jobs) == 1:
                raise
            errors.append(str(exc))
            print(f"turbopart: error: {exc}", file=sys.stderr)
    if not meshes:
        raise UserError("no usable mesh")

    seg = _segmenter(args)
    for f, dest in jobs:
        if f not in meshes:
            continue
        t0 = time.perf_counter()
        result = seg.segment(meshes[f], points=args.points, prompts=args.prompts,
                             threshold=args.threshold, post_process=args.post_process,
                             max_parts=args.max_parts, seed=args.seed, variant=args.variant,
                             progress=not args.quiet, name=f.name,
                             connectivity=args.connectivity,
                             normalize=args.variant == "xpart")  # X-Part: path input
        t1 = time.perf_counter()
        write_segmentation(dest, result, source=f, mesh_in=meshes[f])
        t2 = time.perf_counter()
        print(f"{f.name}: {result.num_parts} parts, {len(result.mesh.faces)} faces "
              f"({result.unlabeled_faces} unlabeled), {t1 - t0:.2f} s + export "
              f"{t2 - t1:.2f} s -> {dest}")
    return 2 if errors else 0


def _segmenter(args):
    from .cli import parse_device
    from .p3sam.segmenter import Segmenter
    from .runtime import first_use
    device = parse_device(args.device)
    first_use.start(device)  # library first-use costs while the model loads
    return Segmenter.from_pretrained(args.weights, device=device, numerics=args.numerics)


def write_segmentation(dest: Path, result, *, source: Path | None = None, mesh_in=None
                       ) -> Path:
    """Write segmented.glb, parts.json and face_ids.npy into ``dest`` atomically per file
    set: everything goes to a temporary sibling folder first, then is moved into place."""
    import numpy as np

    from . import __version__
    from .mesh import export_parts_glb, mesh_info, part_colors

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        n = result.num_parts
        colors = part_colors(n)
        export_parts_glb(tmp / "segmented.glb", result.mesh, result.face_labels, colors)
        np.save(tmp / "face_ids.npy", result.face_labels.astype(np.int64))
        parts = []
        for k in range(n):
            parts.append({"id": k, "name": f"part_{k:03d}", "faces": int(result.face_counts[k]),
                          "area": float(result.areas[k]),
                          "aabb": {"min": result.boxes[k, 0].tolist(),
                                   "max": result.boxes[k, 1].tolist()},
                          "color": [int(c) for c in colors[k, :3]]})
        info = {"turbopart_version": __version__,
                "source": str(source) if source is not None else None,
                "mesh": {"input": mesh_info(mesh_in) if mesh_in is not None else None,
                         "cleaned": mesh_info(result.mesh),
                         "note": "face_ids.npy and segmented.glb index the faces of the "
                                 "cleaned mesh; boxes are in the input mesh's coordinates"},
                "settings": result.settings, "num_parts": n,
                "unlabeled_faces": result.unlabeled_faces, "parts": parts,
                "timings_s": {k: round(v, 6) for k, v in result.timings.items()},
                "peak_gpu_gb": result.peak_gpu_gb}
        with open(tmp / "parts.json", "w") as f:
            json.dump(info, f, indent=2)
        if not dest.exists():
            os.replace(tmp, dest)
        else:
            for item in tmp.iterdir():
                os.replace(item, dest / item.name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
