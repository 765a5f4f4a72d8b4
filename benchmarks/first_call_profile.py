"""Where the first segmentation of a fresh process spends its time (cProfile + the modules it
imports), after an earlier process filled Triton's disk cache.  Diagnostic; prints a table.

    python benchmarks/first_call_profile.py [--weights DIR] [--mesh FILE]
"""
import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CHILD = r"""
import cProfile, io, pstats, sys, time
import torch
from turbopart.mesh import load_mesh
from turbopart.p3sam.segmenter import Segmenter
w, mesh_path, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
mesh = load_mesh(mesh_path)
seg = Segmenter.from_pretrained(w, device="cuda")
torch.cuda.synchronize()
before = set(sys.modules)
pr = cProfile.Profile()
t0 = time.perf_counter()
pr.enable()
r = seg.segment(mesh, points=100000, prompts=400, seed=42, variant="xpart", normalize=True)
torch.cuda.synchronize()
pr.disable()
t1 = time.perf_counter()
r2 = seg.segment(mesh, points=100000, prompts=400, seed=42, variant="xpart", normalize=True)
torch.cuda.synchronize()
t2 = time.perf_counter()
new = sorted(set(sys.modules) - before)
tops = {}
for m in new:
    tops[m.split(".")[0]] = tops.get(m.split(".")[0], 0) + 1
print(f"first {t1 - t0:.2f} s (under cProfile), second {t2 - t1:.2f} s")
print("stages first:", {k: round(v, 3) for k, v in r.timings.items()})
print("stages second:", {k: round(v, 3) for k, v in r2.timings.items()})
print(f"modules imported by the first call: {len(new)}", sorted(tops.items(), key=lambda kv: -kv[1])[:12])
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
print(s.getvalue()[-12000:])
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
print(s.getvalue()[-6000:])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--top", type=int, default=45)
    a = ap.parse_args()
    from bench_pipeline import DEFAULT_MESH, shared_dir
    from turbopart.xpart.commands import random_weights
    w = a.weights or str(random_weights("realistic"))
    mesh = a.mesh or str(shared_dir() / "meshes" / DEFAULT_MESH)
    cmd = [sys.executable, "-c", CHILD, w, mesh, str(a.top)]
    subprocess.run(cmd, check=True, capture_output=True)  # fills Triton's disk cache
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(p.stdout)
    print(f"child wall {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
