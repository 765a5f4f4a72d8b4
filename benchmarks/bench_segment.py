"""Benchmark: the whole `turbopart segment` pipeline (P3-SAM automatic segmentation).

Per mesh and numerics: load + clean, adjacency, sampling, Sonata features, prompts (FPS),
heads (400 prompts), selection (sort, NMS, box merge, recovery, painting, face vote),
post-process (repairs, regions, merges, boxes), parts (renumbering), export (GLB + JSON +
NPY); peak GPU memory; warm process (each mesh runs ``--runs`` times, the last is reported,
the first is listed as "cold").  Defaults: 100k points, 400 prompts, post-process on,
seed 42, the official "p3sam" variant.

Weights: ``--weights DIR`` (a checkpoint folder, e.g. `turbopart weights random --out DIR`
or the real one), else full-size random weights built in memory: ``--init scaled`` (default;
the golden cases' recipe, whose masks are not degenerate, so NMS / merging / repairs do real
work) or ``--init plain`` (the official baseline's N(0, 0.02²) init, whose masks are nearly
empty or full: one part).

    source benchmarks/device_prelude.sh
    python benchmarks/bench_segment.py [--meshes sheen_chair ai_mech_robot ai_dragon]
        [--numerics exact fast] [--weights DIR] [--init scaled|plain]
        [--out benchmarks/results/segment_h100.json]

Targets on an H100 (fast, warm): ≤ 1.0 s for the 50k-face meshes, ≤ 2.0 s for the
200k-face one, peak GPU memory ≤ 4 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbopart import weights as W  # noqa: E402
from turbopart.commands import write_segmentation  # noqa: E402
from turbopart.p3sam.segmenter import Segmenter  # noqa: E402
from turbopart.runtime.precision import param_dtypes  # noqa: E402
from turbopart.runtime.profiling import Profile  # noqa: E402

STAGES = ["load/clean", "adjacency", "sampling", "sonata", "prompts", "heads", "selection",
          "post-process", "parts", "export"]
TARGET_S = {"ai_dragon": 2.0}  # others: 1.0 s
PEAK_TARGET_GB = 4.0


def shared_meshes() -> Path:
    env = os.environ.get("TURBOPART_SHARED")
    for root in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / ".shared"]:
        if (root / "meshes").is_dir():
            return root / "meshes"
    raise SystemExit("shared meshes not found: set TURBOPART_SHARED")




def make_segmenter(args, numerics: str, device: torch.device) -> tuple[Segmenter, float]:
    t0 = time.perf_counter()
    if args.weights:
        seg = Segmenter.from_pretrained(args.weights, device=device, numerics=numerics)
    else:
        from turbopart.p3sam.model import build, init_random_
        from turbopart.p3sam.predictor import P3SAMPredictor
        with torch.device("meta"):
            model = build(None, skip_unused=True)
        model = model.to_empty(device="cpu")
        if args.init == "plain":
            init_random_(model, std=0.02, generator=torch.Generator().manual_seed(0))
        else:
            from bench_p3sam import init_scaled_
            init_scaled_(model)
        dt = param_dtypes(model, numerics, device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.data = p.data.to(device=device, dtype=dt[name])
        W.finish_module(model, device)
        seg = Segmenter(P3SAMPredictor(model, numerics=numerics, device=device),
                        device=device, numerics=numerics)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seg, time.perf_counter() - t0


def run_once(seg: Segmenter, mesh: Path, args, device) -> dict:
    prof = Profile(device=str(device))
    t0 = time.perf_counter()
    res = seg.segment(mesh, points=args.points, prompts=args.prompts,
                      post_process=not args.no_post_process, seed=args.seed,
                      variant=args.variant, profile=prof)
    with prof.stage("export"), tempfile.TemporaryDirectory() as tmp:
        write_segmentation(Path(tmp) / "out", res, source=mesh)
    total = time.perf_counter() - t0
    return {"total_s": total, "stages_s": dict(prof.stages), "parts": res.num_parts,
            "faces": int(len(res.mesh.faces)), "unlabeled_faces": res.unlabeled_faces,
            "peak_gpu_gb": prof.peak_memory_gb(),
            "prompt_batch": dict(getattr(seg.predictor, "last_batch", {}) or {})}


from turbopart.runtime.profiling import git_commit  # noqa: E402



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meshes", nargs="+", default=["sheen_chair", "ai_mech_robot", "ai_dragon"],
                    help="mesh names in the shared folder or paths")
    ap.add_argument("--numerics", nargs="+", default=["exact", "fast"],
                    choices=["exact", "fast"])
    ap.add_argument("--weights", default=None, help="checkpoint folder (default: in memory)")
    ap.add_argument("--init", choices=["scaled", "plain"], default="scaled")
    ap.add_argument("--points", type=int, default=100000)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--no-post-process", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variant", choices=["p3sam", "xpart"], default="p3sam")
    ap.add_argument("--runs", type=int, default=2, help="runs per mesh; the last is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", default=None, choices=["bf16", "f16", "bf16x2"],
                    help="fused head kernel variant (default: TURBOPART_P3SAM_HEADS / bf16)")
    ap.add_argument("--out", default=None, help="JSON file (e.g. benchmarks/results/x.json)")
    args = ap.parse_args()
    if args.heads:
        os.environ["TURBOPART_P3SAM_HEADS"] = args.heads
    device = torch.device(args.device)
    root = None
    meshes = []
    for m in args.meshes:
        p = Path(m)
        if not p.exists():
            root = root or shared_meshes()
            p = root / (m if m.endswith(".glb") else m + ".glb")
        meshes.append(p)

    results = []
    for numerics in args.numerics:
        seg, load_s = make_segmenter(args, numerics, device)
        print(f"[{numerics}] model ready in {load_s:.2f} s", flush=True)
        for mesh in meshes:
            runs = [run_once(seg, mesh, args, device) for _ in range(max(1, args.runs))]
            warm, cold = runs[-1], runs[0]
            name = mesh.stem
            target = TARGET_S.get(name, 1.0)
            row = {"mesh": name, "numerics": numerics, **warm, "cold_total_s": cold["total_s"],
                   "target_s": target, "meets_time": warm["total_s"] <= target,
                   "meets_memory": (warm["peak_gpu_gb"] or 0.0) <= PEAK_TARGET_GB}
            results.append(row)
            print(f"[{numerics}] {name}: {warm['total_s']:.3f} s warm "
                  f"({cold['total_s']:.3f} s cold), {warm['parts']} parts, peak "
                  f"{warm['peak_gpu_gb'] or 0:.2f} GB", flush=True)
        del seg
        if device.type == "cuda":
            torch.cuda.empty_cache()

    head = f"{'mesh':<14}{'num':<6}" + "".join(f"{s[:9]:>10}" for s in STAGES) + \
        f"{'total':>9}{'cold':>8}{'peakGB':>8}{'parts':>6}  target"
    print("\n" + head)
    for r in results:
        cells = "".join(f"{r['stages_s'].get(s, 0.0) * 1000:>9.1f} " for s in STAGES)
        ok = "ok" if r["meets_time"] and r["meets_memory"] else "MISS"
        print(f"{r['mesh']:<14}{r['numerics']:<6}{cells}{r['total_s']:>8.3f}s"
              f"{r['cold_total_s']:>7.2f}s{(r['peak_gpu_gb'] or 0):>8.2f}{r['parts']:>6}  "
              f"{ok} (≤{r['target_s']} s, ≤{PEAK_TARGET_GB} GB)")
    print("(stage columns in ms)")

    info = {"benchmark": "bench_segment", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "git_commit": git_commit(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "results": results}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(info, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
