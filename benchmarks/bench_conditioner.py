"""Benchmark: the X-Part conditioner and the ShapeVAE geometry-decoder query rate, full size.

Random full-size weights (matrices N(0, 0.02²), biases 0, norms 1/0: the baseline's plain
init) materialised directly on the GPU in the storage dtypes of each numerics mode (``exact``:
fp32 weights + the official bf16 arithmetic; ``fast``: bf16 matmul weights).  Inputs: K parts
of 81 920 surface points sampled from ``sheen_chair.glb`` with a 2×2×2 box grid over its
bounding box (the official baseline's boxes), and the 81 920-point fp16-quantised object
surface; random surfaces when the mesh or trimesh is missing.

Measured (warm-up, then the median of synchronised runs):

* conditioner: time per call and per part, phase breakdown (FPS, geo encoder, obj encoder,
  Sonata, matches + out-projections), peak GPU memory above the resident weights, resident
  bytes of the inference subset (``skip_unused``);
* geometry decoder: ``precompute_kv`` once for K parts, then queries/s for a few million
  queries (fp64 coordinates as the fine levels, fp16 as the coarse grid; per-part and
  shared-grid layouts), eager (per SDPA backend), optionally ``torch.compile``d, and the
  fused Triton path (``--fused attention/gemm ...``);
* resident weights of the three X-Part components (DiT, conditioner subset, VAE decoder) in
  the fast storage dtypes.

    python benchmarks/bench_conditioner.py [--parts 8] [--numerics exact fast]
        [--queries 4194304] [--compile] [--sdpa default flash cudnn efficient]
        [--out benchmarks/results/conditioner.json]

Targets on an H100: conditioner ≤ 60 ms per part (fast); geometry decoder ≥ 20 M queries/s
with exact math; resident X-Part weights ≤ 8 GB.  Official: conditioner 2.22 s at K = 8;
decoder 9.7 M queries/s (shared/baseline/official-h100.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbopart import weights as W  # noqa: E402
from turbopart.runtime.precision import param_dtypes  # noqa: E402
from turbopart.sonata.features import point_features  # noqa: E402
from turbopart.xpart import conditioner as cond_mod  # noqa: E402
from turbopart.xpart.nearest import nearest_neighbors  # noqa: E402
from turbopart.xpart.vae import ATTN_CHOICES, GEMM_CHOICES, FusedOptions  # noqa: E402

OFFICIAL = {"conditioner_s_k8": 2.219, "decoder_queries_per_s": 9.7e6}
TARGETS = {"conditioner_ms_per_part": 60.0, "decoder_queries_per_s": 20e6,
           "resident_gb": 8.0}


def _shared() -> Path:
    env = os.environ.get("TURBOPART_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / ".shared"]:
        if (cand / "meshes").is_dir():
            return cand
    return REPO.parent / "shared"


DEFAULT_MESH = _shared() / "meshes" / "sheen_chair.glb"






from turbopart.runtime.profiling import git_commit  # noqa: E402
from turbopart.runtime.profiling import sync, timed  # noqa: E402



# --------------------------------------------------------------------------- inputs

def _grid_boxes(lo, hi, nx=2, ny=2, nz=2):
    ext = hi - lo
    eps = 1e-4 * ext.max()
    boxes = []
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                a = lo + ext * np.array([i / nx, j / ny, k / nz])
                b = lo + ext * np.array([(i + 1) / nx, (j + 1) / ny, (k + 1) / nz])
                boxes.append((a - eps, b + eps))
    return boxes


def mesh_inputs(path: Path, parts: int, n: int, seed: int = 42):
    """Object surface [n, 7] (fp16-quantised, as SampleMesh) and part surfaces [K, n, 7]
    (faces with any vertex in the box, as sample_bbox_points_from_trimesh), normalised ±0.8."""
    import trimesh
    mesh = trimesh.load(str(path), force="mesh")
    v = np.asarray(mesh.vertices, dtype=np.float64)
    center = (v.min(0) + v.max(0)) / 2
    scale = (v.max(0) - v.min(0)).max() / 2 / 0.8
    mesh = trimesh.Trimesh((v - center) / scale, mesh.faces, process=False)
    pts, fi = trimesh.sample.sample_surface(mesh, n, seed=seed)
    nrm = np.asarray(mesh.face_normals)[fi]
    obj = np.concatenate([pts, nrm], 1).astype(np.float16).astype(np.float32)
    obj = np.concatenate([obj, np.zeros((n, 1), np.float32)], 1)
    nx = max(1, round(parts ** (1 / 3)))
    boxes = _grid_boxes(mesh.vertices.min(0), mesh.vertices.max(0), nx, nx, nx)
    surfaces = []
    for a, b in boxes:
        inside = np.all((mesh.vertices >= a) & (mesh.vertices <= b), axis=1)
        faces = np.nonzero(inside[mesh.faces].any(1))[0]
        if len(faces) == 0:
            continue
        sub = mesh.submesh([faces], append=True)
        p, f = trimesh.sample.sample_surface(sub, n, seed=seed)
        s = np.concatenate([p, np.asarray(sub.face_normals)[f], np.zeros((n, 1))], 1)
        surfaces.append(s.astype(np.float32))
    while len(surfaces) < parts:
        surfaces.append(surfaces[len(surfaces) % max(1, len(surfaces))])
    return torch.from_numpy(obj), torch.from_numpy(np.stack(surfaces[:parts]))


def random_inputs(parts: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def cloud(center, radius):
        d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
        return torch.cat([center + radius * d, d, torch.zeros(n, 1)], -1)
    obj = cloud(torch.zeros(3), 0.7).half().float()
    surf = torch.stack([cloud(torch.rand(3, generator=g) - 0.5, 0.2) for _ in range(parts)])
    return obj, surf


# --------------------------------------------------------------------------- models

def build(component: str, numerics: str, device, config=None):
    with torch.device("meta"):
        model = W.build(component, config, skip_unused=True)
    return W.materialize_random(model, device, dtypes=param_dtypes(model, numerics, device))


def resident_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in
               list(module.parameters()) + list(module.buffers()))


def layout_bytes(component: str, numerics: str = "fast") -> int | None:
    """Bytes of the inference subset of ``component`` in ``numerics`` storage (meta build)."""
    try:
        with torch.device("meta"):
            model = W.build(component, skip_unused=True)
    except Exception:
        return None
    dt = param_dtypes(model, numerics, torch.device("cuda"))
    return sum(p.numel() * torch.empty(0, dtype=dt[n]).element_size()
               for n, p in model.state_dict().items())


# --------------------------------------------------------------------------- conditioner

def conditioner_phases(model, parts, obj, numerics, device) -> dict[str, float]:
    """One call split in phases, synchronised at every boundary."""
    out = {}
    t = [time.perf_counter()]

    def mark(name):
        sync(device)
        now = time.perf_counter()
        out[name] = now - t[0]
        t[0] = now

    k = parts.shape[0]
    cdt = model._cdt(device)
    with torch.no_grad():
        sync(device)
        t[0] = time.perf_counter()
        draws = cond_mod.ConditionerDraws().complete(
            model, k, device, torch.Generator(device=device).manual_seed(0))
        sampled = model._sample(parts, obj[:, :3], draws)
        mark("draws + FPS (2K clouds)")
        geo = model.geo_vae.encoder(parts, sampled["geo"], cdt)
        mark("geo encoder (K parts)")
        objl = model.obj_encoder.encoder(obj[None], sampled["obj"], cdt)
        mark("obj encoder (shared K/V, K query sets)")
        seg = model.seg_feat_encoder
        sf = point_features(seg.sonata, obj[:, :3], obj[:, 3:6], head=seg.mlp,
                            numerics=numerics, generator=torch.Generator().manual_seed(0))
        mark("Sonata + seg MLP (once)")
        s = sampled["geo"]
        sub = parts[:, s.input_idx, :3]
        geo_q = torch.gather(sub, 1, s.query_idx[..., None].expand(-1, -1, 3))
        lm = nearest_neighbors(geo_q, obj[:, :3])
        gm = sampled["obj"].input_idx[sampled["obj"].query_idx]
        model._project(geo, sf.point_feat, lm, model.geo_out_proj, cdt)
        model._project(objl, sf.point_feat, gm, model.obj_out_proj, cdt)
        mark("matches + out-projections")
    return out


def _config(args, component):
    return W.tiny_config(component) if args.tiny else None


def bench_conditioner(args, device, obj, parts, report):
    res_all = {}
    for numerics in args.numerics:
        model = build("conditioner", numerics, device, _config(args, "conditioner"))
        model.graph_fps = not args.no_graph_fps
        resident = resident_bytes(model)
        gen = torch.Generator(device=device)

        def run():
            gen.manual_seed(0)
            return model(parts, obj, generator=gen, numerics=numerics,
                         sonata_generator=torch.Generator().manual_seed(0))

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        warm: list[float] = []
        times, out = timed(run, device, args.repeats, args.warmup, warm)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ph = conditioner_phases(model, parts, obj, numerics, device)
        k = parts.shape[0]
        med = statistics.median(times)
        res = {
            "median_s": med, "min_s": min(times), "times_s": times, "warmup_s": warm,
            "ms_per_part": med / k * 1e3,
            "peak_above_weights_gb": None if peak is None else (peak - base) / 1e9,
            "resident_gb": resident / 1e9, "phases_s": ph,
            "obj_cond": [list(out["obj_cond"].shape), str(out["obj_cond"].dtype)],
            "geo_cond": [list(out["geo_cond"].shape), str(out["geo_cond"].dtype)],
            "finite": bool(torch.isfinite(out["obj_cond"]).all()
                           and torch.isfinite(out["geo_cond"]).all()),
        }
        res_all[numerics] = res
        target = TARGETS["conditioner_ms_per_part"]
        print(f"\n[conditioner {numerics}] K={k}: median {med * 1e3:.1f} ms = "
              f"{res['ms_per_part']:.1f} ms/part (target ≤ {target:.0f};"
              f" official {OFFICIAL['conditioner_s_k8'] * 1e3 / 8:.0f} ms/part at K=8)   "
              f"peak +{res['peak_above_weights_gb'] or 0:.2f} GB   resident "
              f"{res['resident_gb']:.2f} GB")
        print(f"    warm-up calls (cold first; FPS graph captured on the 2nd): "
              + ", ".join(f"{t * 1e3:.0f} ms" for t in warm))
        for name, v in ph.items():
            print(f"    {name:<44} {v * 1e3:8.1f} ms")
        if args.profile and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                sync(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
        del model, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["conditioner"] = res_all


# --------------------------------------------------------------------------- geometry decoder

def _backend_ctx(name):
    import contextlib
    if name in (None, "default"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([b])


def bench_decoder(args, device, report):
    k = args.parts
    res_all = {}
    g = torch.Generator(device=device).manual_seed(1)
    per_part = max(1, args.queries // k)
    pts64 = (torch.rand(k, per_part, 3, generator=g, device=device, dtype=torch.float64)
             * 2.02 - 1.01)
    grid16 = pts64[:1].to(torch.float16)
    for numerics in args.numerics:
        vae = build("shapevae", numerics, device, _config(args, "shapevae"))
        lat = torch.randn(k, vae.num_latents, vae.embed_dim, generator=g, device=device)
        sync(device)
        t0 = time.perf_counter()
        decoded = vae.decode(lat / vae.scale_factor)
        sync(device)
        t_dec = time.perf_counter() - t0
        t0 = time.perf_counter()
        kv = vae.geo_decoder.precompute_kv(decoded)
        sync(device)
        t_kv = time.perf_counter() - t0
        geo = vae.geo_decoder
        rows = geo.rows_per_chunk(device)
        variants = {}
        paths = ["eager"] + (["compile"] if args.compile else []) + \
            [f"fused {o}" for o in args.fused]
        for path in paths:
            geo.compile = path == "compile"
            geo.compile_mode = args.compile_mode
            geo.kernel = "fused" if path.startswith("fused") else path
            geo.fused_options = None
            if path.startswith("fused"):
                attn, gemm = path.split()[1].split("/")
                geo.fused_options = FusedOptions(attn, gemm)
            for backend in (args.sdpa if not path.startswith("fused") else ["default"]):
                for layout, pts in (("fp64 per part", pts64), ("fp16 shared grid", grid16)):
                    name = f"{path} / sdpa {backend} / {layout}"
                    try:
                        with _backend_ctx(backend):
                            times, out = timed(lambda: geo.query(pts, kv), device,
                                               args.repeats, 1 if path != "compile" else 2)
                    except Exception as exc:  # a backend may not support the shapes
                        variants[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                        print(f"    {name:<56} failed: {variants[name]['error']}")
                        continue
                    nq = k * pts.shape[1]
                    med = statistics.median(times)
                    variants[name] = {"queries": nq, "median_s": med, "queries_per_s": nq / med,
                                      "tflops": nq * 25.3e6 / med / 1e12,
                                      "fell_back": sorted(geo.failed_modes)}
                    print(f"    {name:<56} {nq / med / 1e6:7.2f} M queries/s  "
                          f"({nq * 25.3e6 / med / 1e12:5.0f} TFLOP/s)")
        geo.kernel = None
        geo.fused_options = None
        geo.compile = False
        best = max((v.get("queries_per_s", 0), n) for n, v in variants.items())
        res_all[numerics] = {"vae_decode_s": t_dec, "precompute_kv_s": t_kv,
                             "rows_per_chunk": rows, "variants": variants,
                             "best": {"variant": best[1], "queries_per_s": best[0]},
                             "resident_gb": resident_bytes(vae) / 1e9}
        print(f"[decoder {numerics}] VAE decode of {k} parts {t_dec * 1e3:.1f} ms (first call), "
              f"precompute_kv {t_kv * 1e3:.1f} ms; best {best[0] / 1e6:.2f} M queries/s "
              f"({best[1]}; target ≥ 20, official 9.7)")
        del vae, kv, decoded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["geometry_decoder"] = res_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default=str(DEFAULT_MESH))
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--points", type=int, default=81920)
    ap.add_argument("--numerics", nargs="+", default=["exact", "fast"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2,
                    help="≥ 2 lets the FPS CUDA graph be captured before timing")
    ap.add_argument("--queries", type=int, default=1 << 22)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd chunks")
    ap.add_argument("--compile-mode", default=None,
                    choices=[None, "default", "max-autotune-no-cudagraphs"])
    ap.add_argument("--sdpa", nargs="+", default=["default"],
                    choices=["default", "flash", "cudnn", "efficient"])
    ap.add_argument("--fused", nargs="*", default=["triton/cublas", "triton/gelu", "cudnn/cublas"],
                    choices=[f"{a}/{g}" for a in ATTN_CHOICES for g in GEMM_CHOICES],
                    help="fused decoder variants (attention/gemm) to time as well "
                         "(benchmarks/decoder_variants.py compares them all)")
    ap.add_argument("--skip-conditioner", action="store_true")
    ap.add_argument("--skip-decoder", action="store_true")
    ap.add_argument("--no-graph-fps", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny configs (a CPU smoke test of this script; use --points 1024)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write a JSON report here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    report = {
        "benchmark": "X-Part conditioner + geometry decoder",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": git_commit(), "parts": args.parts,
        "points": args.points, "repeats": args.repeats, "warmup": args.warmup,
        "official": OFFICIAL, "targets": TARGETS,
    }
    print(f"X-Part conditioner / geometry decoder on {report['device']}, torch {torch.__version__}")
    if not args.skip_conditioner:
        try:
            obj, parts = mesh_inputs(Path(args.mesh), args.parts, args.points)
            report["inputs"] = f"{Path(args.mesh).name}, 2x2x2 box grid"
        except Exception as exc:
            print(f"(mesh inputs unavailable: {type(exc).__name__}: {exc}; random surfaces)")
            obj, parts = random_inputs(args.parts, args.points)
            report["inputs"] = "random surfaces"
        bench_conditioner(args, device, obj.to(device), parts.to(device), report)
    if not args.skip_decoder:
        bench_decoder(args, device, report)

    sizes = {c: layout_bytes(c) for c in ("model", "conditioner", "shapevae")}
    if all(v is not None for v in sizes.values()):
        total = sum(sizes.values()) / 1e9
        report["resident_fast_gb"] = {c: v / 1e9 for c, v in sizes.items()}
        report["resident_fast_gb"]["total"] = total
        print(f"\nresident weights (fast, inference subsets): "
              + ", ".join(f"{c} {v / 1e9:.2f} GB" for c, v in sizes.items())
              + f"; total {total:.2f} GB (target ≤ {TARGETS['resident_gb']:.0f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
