"""Benchmark: marching cubes + official clean-up + GLB export per part (spec xpart §3.5–3.6).

Volumes, built on the device like the official hierarchical decoder leaves them:

* ``blob``: a smooth blob of radius ~0.4 in the [-1.01, 1.01]³ cube, logit = clip(k · signed
  distance, ±12) (positive inside), fp16; evaluated only on the band the official
  [128, 256, 512] ladder selects (sign changes or |logit| < 0.95 on the coarser grid,
  dilations as in spec §3.5 step 3), NaN elsewhere, plus that band as the mask.
* ``foam``: the random-weight worst case of the official baseline: a smooth random field
  crossing the level everywhere, evaluated densely (no NaN, mask all true), 10–30 M faces.

Per part: marching cubes (dense scan with the mask, or the sparse evaluated-point list),
world mapping + clean-up (``official_cleanup``), and export as the commands do it (device →
host, ``Trimesh(process=False)``, :func:`turbopart.mesh.write_glb` into a file).  A second
total uses trimesh's GLB exporter instead (bytes in memory), for reference.
Target: MC + clean-up + export ≤ 0.05 s + 0.1 s per million faces.  Official (CPU): skimage
1.8 s + 0.32 s/M faces, trimesh processing 0.48 s/M faces, pymeshlab fix_mesh 1.41 µs/face.

    python benchmarks/bench_marching_cubes.py --out benchmarks/results/marching_cubes_h100.json
    python benchmarks/bench_marching_cubes.py --device cpu --res 256 --cases blob   # smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbopart.geometry import cleanup as C  # noqa: E402
from turbopart.geometry.marching_cubes import (cells_from_points, grid_to_world,  # noqa: E402
                                               marching_cubes)
from turbopart.runtime.profiling import sync  # noqa: E402

BOUNDS = 1.01
LEVEL = C.MC_LEVEL
OFFICIAL = {"mc_s": 1.8, "mc_s_per_mface": 0.32, "trimesh_s_per_mface": 0.48,
            "fix_mesh_s_per_face": 1.41e-6}


# ----------------------------------------------------------------------------- fields

def _coords(res: int, device, dtype=torch.float32) -> torch.Tensor:
    x = torch.linspace(-BOUNDS, BOUNDS, res + 1, device=device, dtype=dtype)
    return x


def blob_logit(pts: torch.Tensor, slope: float) -> torch.Tensor:
    """Smooth blob (radius ~0.4, low-frequency bumps), logit = clip(slope·sdf, ±12)."""
    c = torch.tensor([0.03, -0.02, 0.05], device=pts.device, dtype=pts.dtype)
    p = pts - c
    r = p.norm(dim=-1)
    bumps = (0.05 * torch.sin(5 * p[..., 0]) * torch.sin(4 * p[..., 1] + 1)
             * torch.sin(3 * p[..., 2]))
    return (slope * (0.4 + bumps - r)).clamp(-12, 12)


def _eval_on(index: torch.Tensor, res: int, fn) -> torch.Tensor:
    """Evaluate ``fn`` at grid points ``index`` [N, 3] of the (res+1)³ grid, in chunks."""
    out = torch.empty(index.shape[0], device=index.device, dtype=torch.float32)
    step = 2 * BOUNDS / res
    for s in range(0, index.shape[0], 1 << 22):
        p = index[s:s + (1 << 22)].to(torch.float64) * step - BOUNDS
        out[s:s + (1 << 22)] = fn(p.float())
    return out


def _near_surface(g: torch.Tensor, level: float) -> torch.Tensor:
    """Official near-surface mark (spec §3.5 step 3.1) on a grid with -10000 for invalid."""
    v = g.float() + level
    valid = v > -9000
    sign = torch.sign(v)
    mark = torch.zeros_like(valid)
    for axis in range(3):
        for shift in (1, -1):
            nb = torch.roll(sign, shift, axis)
            nv = torch.roll(valid, shift, axis)
            # replicate padding at the boundary: the neighbour is the vertex itself
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1
            nb[tuple(edge)] = sign[tuple(edge)]
            nv[tuple(edge)] = True
            nb = torch.where(nv, nb, sign)
            mark |= nb != sign
    return (mark & valid) | (g.float().abs() < 0.95)


def _dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(m[None, None].half(), 3, 1, 1)[0, 0] > 0


def hierarchical_grid(res: int, fn, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid fp16 with NaN outside the band, evaluated-point mask) like extract_geometry_fast."""
    ladder = [res]
    while ladder[-1] // 2 >= 95:
        ladder.append(ladder[-1] // 2)
    ladder = ladder[::-1]
    r0 = ladder[0]
    x = _coords(r0, device)
    pts = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), -1).half().float()
    grid = fn(pts.reshape(-1, 3)).reshape(r0 + 1, r0 + 1, r0 + 1).half()
    mask = torch.ones_like(grid, dtype=torch.bool)        # single level: no mask (dense)
    for r in ladder[1:]:
        mark = _near_surface(grid, LEVEL)
        if r <= 510:
            mark = _dilate(mark)
        nxt = torch.zeros((r + 1,) * 3, dtype=torch.bool, device=device)
        idx = mark.nonzero()
        nxt[idx[:, 0] * 2, idx[:, 1] * 2, idx[:, 2] * 2] = True
        mask = _dilate(nxt)
        del nxt, mark
        pts_idx = mask.nonzero()
        vals = _eval_on(pts_idx, r, fn)
        fill = float("nan") if r == ladder[-1] else -10000.0
        grid = torch.full((r + 1,) * 3, fill, dtype=torch.float16, device=device)
        grid[pts_idx[:, 0], pts_idx[:, 1], pts_idx[:, 2]] = vals.half()
    return grid, mask


def foam_grid(res: int, cells: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random field crossing the level everywhere (dense decoding: no NaN)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.randn((1, 1, cells, cells, cells), generator=g).to(device)
    grid = F.interpolate(coarse, size=(res + 1,) * 3, mode="trilinear", align_corners=True)
    grid = grid[0, 0].half()
    return grid, torch.ones_like(grid, dtype=torch.bool)


# ----------------------------------------------------------------------------- export

def export_glb(verts: torch.Tensor, faces: torch.Tensor, path: Path) -> int:
    """The commands' export of one part: host copy, float32/uint32 node, GLB file; bytes."""
    from turbopart.mesh import GlbMesh, write_glb
    m = C.to_trimesh(verts, faces)
    write_glb(path, [GlbMesh.of("part_000", m.vertices, m.faces)])
    return path.stat().st_size


# ----------------------------------------------------------------------------- timing

def _timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_part(grid, mask, device, path: str, export: bool):
    stats = C.CleanupStats()
    if path == "cells":
        pts = mask.nonzero()
        cells = cells_from_points(pts, grid.shape)
        (v, f), t_mc = _timed(lambda: marching_cubes(grid, LEVEL, cells=cells), device)
    else:
        (v, f), t_mc = _timed(lambda: marching_cubes(grid, LEVEL, mask=mask), device)
    raw_faces = int(f.shape[0])
    (cv, cf), t_clean = _timed(
        lambda: C.official_cleanup(grid_to_world(v, grid.shape[0] - 1, BOUNDS), f, stats=stats),
        device)
    t_export = t_trimesh = 0.0
    glb_bytes = 0
    if export:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            glb_bytes = export_glb(cv, cf, Path(d) / "part.glb")
            t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        C.to_trimesh(cv, cf).export(file_type="glb")
        t_trimesh = time.perf_counter() - t0
    return {"raw_faces": raw_faces, "raw_vertices": int(v.shape[0]),
            "faces": int(cf.shape[0]), "vertices": int(cv.shape[0]),
            "mc_s": t_mc, "cleanup_s": t_clean, "export_s": t_export,
            "export_trimesh_s": t_trimesh,
            "total_s": t_mc + t_clean + t_export,
            "total_trimesh_s": t_mc + t_clean + t_trimesh, "glb_bytes": glb_bytes,
            "cleanup_counts": stats.counts}


def reference_cpu(grid, mask):
    """Official CPU path on the same volume: skimage + trimesh processing (+ pymeshlab)."""
    from skimage.measure import marching_cubes as skmc
    import trimesh
    g = grid.float().cpu().numpy()
    m = mask.cpu().numpy()
    t0 = time.perf_counter()
    v, f, _, _ = skmc(g, LEVEL, method="lewiner", mask=m)
    t_mc = time.perf_counter() - t0
    v = (v / (g.shape[0] - 1) * 2.02 - 1.01).astype(np.float32)
    t0 = time.perf_counter()
    mesh = trimesh.Trimesh(v, np.ascontiguousarray(f[:, ::-1]))
    t_tm = time.perf_counter() - t0
    return {"sk_faces": int(len(f)), "sk_vertices": int(len(v)), "sk_mc_s": t_mc,
            "trimesh_process_s": t_tm, "processed_faces": int(len(mesh.faces))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--cases", default="blob,blob_soft,foam",
                    help="comma list of blob (steep), blob_soft (band ~0.05), foam")
    ap.add_argument("--foam-cells", type=int, default=40,
                    help="coarse noise cells per axis of the foam (more: more faces)")
    ap.add_argument("--path", default="dense", choices=["dense", "cells", "both"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--reference", action="store_true",
                    help="also time skimage + trimesh on the CPU on the same volumes")
    ap.add_argument("--out", default=None, help="JSON file (e.g. benchmarks/results/...)")
    ap.add_argument("--gpu-budget-gb", type=float, default=None,
                    help="turbopart.runtime.memory GPU ceiling (default: the module's)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    from turbopart.runtime import memory
    if args.gpu_budget_gb is not None and hasattr(memory, "set_gpu_budget"):
        memory.set_gpu_budget(args.gpu_budget_gb)
    paths = ["dense", "cells"] if args.path == "both" else [args.path]

    rows = []
    for case in args.cases.split(","):
        t0 = time.perf_counter()
        if case == "blob":
            grid, mask = hierarchical_grid(args.res, lambda p: blob_logit(p, 400.0), device)
        elif case == "blob_soft":
            grid, mask = hierarchical_grid(args.res, lambda p: blob_logit(p, 20.0), device)
        elif case == "foam":
            grid, mask = foam_grid(args.res, args.foam_cells, device)
        else:
            raise SystemExit(f"unknown case {case}")
        sync(device)
        t_build = time.perf_counter() - t0
        for path in paths:
            run_part(grid, mask, device, path, not args.no_export)          # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = [run_part(grid, mask, device, path, not args.no_export)
                    for _ in range(args.repeat)]
            best = {k: statistics.median(r[k] for r in runs)
                    for k in ("mc_s", "cleanup_s", "export_s", "export_trimesh_s", "total_s",
                              "total_trimesh_s")}
            r0 = runs[0]
            mf = r0["raw_faces"] / 1e6
            target = 0.05 + 0.1 * mf
            official = (OFFICIAL["mc_s"] + OFFICIAL["mc_s_per_mface"] * mf
                        + OFFICIAL["trimesh_s_per_mface"] * mf
                        + OFFICIAL["fix_mesh_s_per_face"] * r0["raw_faces"])
            row = {"case": case, "path": path, "res": args.res, "device": str(device),
                   "evaluated_points": int(mask.sum()), "build_s": t_build,
                   **{k: r0[k] for k in ("raw_faces", "raw_vertices", "faces", "vertices",
                                         "glb_bytes", "cleanup_counts")},
                   **best, "mfaces_per_s": mf / best["total_s"] if best["total_s"] else None,
                   "target_s": target, "meets_target": best["total_s"] <= target,
                   "official_estimate_s": official,
                   "speedup_vs_official": official / best["total_s"],
                   "peak_gpu_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                                   if device.type == "cuda" else None)}
            if args.reference and path == paths[0]:
                row["reference"] = reference_cpu(grid, mask)
            rows.append(row)
        del grid, mask
        if device.type == "cuda":
            torch.cuda.empty_cache()

    hdr = (f"{'case':<10}{'path':<7}{'raw faces':>12}{'faces':>12}{'MC s':>9}{'clean s':>9}"
           f"{'export s':>10}{'total s':>9}{'target s':>9}{'M faces/s':>10}{'vs official':>12}"
           f"{'trimesh-GLB total':>18}")
    print(hdr)
    for r in rows:
        print(f"{r['case']:<10}{r['path']:<7}{r['raw_faces']:>12,}{r['faces']:>12,}"
              f"{r['mc_s']:>9.3f}{r['cleanup_s']:>9.3f}{r['export_s']:>10.3f}"
              f"{r['total_s']:>9.3f}{r['target_s']:>9.3f}{r['mfaces_per_s']:>10.1f}"
              f"{r['speedup_vs_official']:>11.1f}x{r['total_trimesh_s']:>18.3f}")
        if "reference" in r:
            print(f"    reference (CPU): {r['reference']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "official": OFFICIAL, "args": vars(args)}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
