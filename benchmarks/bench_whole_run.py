"""Wall clock of the whole job as a user runs it: fresh processes, page cache dropped.

The official baseline's whole job on sheen_chair is P3-SAM (which returns one box with random
weights) and then X-Part on a fixed 2×2×2 box grid.  We time the same work as two commands,
each in its own fresh process (so start-up is paid twice, a conservative sum):

1. ``turbopart segment MESH``                      (start-up + P3-SAM + files);
2. ``turbopart generate MESH --boxes grid8.json``  (start-up + X-Part + every output file).

Before the timed runs one short ``generate`` (2 steps, grid 128) fills Triton's on-disk
kernel cache, as any earlier run on the machine would; its wall clock is reported as the
first-ever run.  The page cache is dropped before each timed process (root on Linux).

    python benchmarks/bench_whole_run.py --init realistic|plain [--weights-seed S]

The plain init uses weight seed 8 by default (see ``bench_pipeline.PLAIN_WEIGHTS_SEED``).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_pipeline import DEFAULT_MESH, GRIDS, OFFICIAL, shared_dir, weights_seed  # noqa: E402
from bench_startup import drop_page_cache  # noqa: E402

#: The official whole job (shared/baseline/official-h100.md): start-up (imports + X-Part
#: load) + P3-SAM + X-Part call at K = 8; fix_mesh (stubbed there) at 1.41 µs per face.
OFFICIAL_WHOLE = {"startup_s": OFFICIAL["startup_s"], "segment_s": OFFICIAL["segmentation_s"],
                  "xpart_s": OFFICIAL[8]["total_s"],
                  "fix_mesh_s_estimate": OFFICIAL[8]["fix_mesh_s_estimate"]}


def timed(cmd: list[str], *, cold: bool, timeout: float) -> dict:
    dropped = drop_page_cache() if cold else False
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return {"wall_s": dt, "page_cache": "cold (dropped)" if dropped else "warm",
            "cmd": " ".join(cmd[2:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", choices=["realistic", "plain"], default="realistic")
    ap.add_argument("--weights-seed", type=int, default=None,
                    help="default: 0 (realistic), bench_pipeline.PLAIN_WEIGHTS_SEED (plain)")
    ap.add_argument("--weights", default=None, help="weight folder (default: random, cached)")
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--out", default=None, help="result JSON")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--octree-resolution", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=500)
    a = ap.parse_args()
    a.weights_seed = weights_seed(a.init, a.weights_seed)

    import torch

    from turbopart.mesh import load_mesh
    from turbopart.runtime.profiling import git_commit
    from turbopart.xpart import preprocess as pp
    from turbopart.xpart.commands import random_weights
    mesh_path = Path(a.mesh) if a.mesh else shared_dir() / "meshes" / DEFAULT_MESH
    weights = Path(a.weights) if a.weights else random_weights(a.init, seed=a.weights_seed)
    mesh = load_mesh(mesh_path)
    boxes = pp.grid_boxes(np.asarray(mesh.bounds, dtype=np.float64), GRIDS[8])
    work = Path(tempfile.mkdtemp(prefix="turbopart-whole-"))
    (work / "grid8.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    py = [sys.executable, "-m", "turbopart"]
    gen = py + ["generate", str(mesh_path), "--boxes", str(work / "grid8.json"),
                "--weights", str(weights), "-q"]
    settings = ["--steps", str(a.steps), "--octree-resolution", str(a.octree_resolution)]
    res = {"first_ever_generate": timed(gen + ["-o", str(work / "warm"), "--steps", "2",
                                              "--octree-resolution", "128"],
                                        cold=True, timeout=a.timeout)}
    res["segment"] = timed(py + ["segment", str(mesh_path), "--weights", str(weights), "-q",
                                 "-o", str(work / "seg")], cold=True, timeout=a.timeout)
    res["generate"] = timed(gen + settings + ["-o", str(work / "gen"), "--profile",
                                   str(work / "profile.json")], cold=True, timeout=a.timeout)
    res["generate"]["profile"] = json.loads((work / "profile.json").read_text())
    files = {str(p.relative_to(work / "gen")): p.stat().st_size
             for p in sorted((work / "gen").rglob("*")) if p.is_file()}
    ours = res["segment"]["wall_s"] + res["generate"]["wall_s"]
    off = OFFICIAL_WHOLE["startup_s"] + OFFICIAL_WHOLE["segment_s"] + OFFICIAL_WHOLE["xpart_s"]
    off_fix = off + OFFICIAL_WHOLE["fix_mesh_s_estimate"]
    report = {"benchmark": "whole run", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
              platform.processor(), "torch": torch.__version__, "commit": git_commit(),
              "settings": {"mesh": mesh_path.name, "init": a.init,
                           "weights_seed": a.weights_seed, "weights": str(weights),
                           "boxes": "2x2x2 grid (K = 8)", "steps": a.steps,
                           "octree_resolution": a.octree_resolution},
              "runs": res, "files": files, "ours_s": ours,
              "official": dict(OFFICIAL_WHOLE, whole_s=off, whole_with_fix_mesh_s=off_fix),
              "speedup": off / ours, "speedup_with_fix_mesh": off_fix / ours}
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"whole_run_{a.init}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"{'step':34} {'seconds':>9}")
    for k in ("first_ever_generate", "segment", "generate"):
        print(f"{k:34} {res[k]['wall_s']:9.2f}")
    print(f"{'ours (segment + generate)':34} {ours:9.2f}")
    print(f"{'official (measured parts)':34} {off:9.2f}   {off / ours:.1f}x")
    print(f"{'official + fix_mesh estimate':34} {off_fix:9.2f}   {off_fix / ours:.1f}x")
    print(f"files: {len(files)}, {sum(files.values()) / 1e6:.1f} MB; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
