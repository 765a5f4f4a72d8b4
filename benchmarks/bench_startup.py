"""Start-up and first-call benchmark (one GPU run of about 3–4 minutes).

Measures, on the GPU with full-size random weights (reused from ``~/.cache/turbopart/random-
<init>`` or ``--weights``, written once otherwise), each in a **fresh process** started the
way the CLI starts (read-ahead helper first, then the imports), with the page cache dropped
(``sync; echo 3 > /proc/sys/vm/drop_caches``, root) unless stated:

* process start → P3-SAM + X-Part ready (``fast``): imports, per-component load time and
  bytes, GPU memory, the read-ahead helper's own timings — for the default
  (sequential reader + read-ahead of weights and the recorded library profile) and the
  variants: read-ahead of the weights only, no read-ahead, the previous memory-mapped
  loader without read-ahead; and with a warm page cache;
* first-call latencies in the default cold process (Triton cache empty, as on a fresh
  machine), in a cold process that runs a throw-away segmentation of a small sphere while
  X-Part still loads (an experiment: how much a background warm-up would hide), and in the
  warm one (Triton's on-disk cache filled by the first): a P3-SAM
  segmentation of the bundled example chair (100 000 points, 400 prompts) twice, then an
  X-Part call (K = 4 boxes, 3 steps, octree 128) twice, per stage (Sonata, FPS, heads, ...;
  conditioner, DiT steps incl. CUDA-graph capture, VAE decode, volume decoding, ...);
* the cold-cache import profile (``python -X importtime``, top entries);
* correctness: every tensor of every component loaded by the sequential reader equals the
  memory-mapped reader's (bitwise, on the GPU); the P3-SAM heads with the fixed Triton tiles
  against the plain-PyTorch kernel.

Prints a table, writes JSON (``--out``, default ``benchmarks/results/startup-<gpu>-<time>.json``).
Switches of the code under test: ``TURBOPART_PREFETCH`` (all|weights|0),
``TURBOPART_LOADER`` (sequential|mmap), ``TURBOPART_P3SAM_TUNE`` (1: run-time tile tuning).

    python benchmarks/bench_startup.py [--weights DIR] [--budget 190] [--out FILE]
    python benchmarks/bench_startup.py --tiny      # CPU smoke test of the script itself
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import drop_page_cache  # noqa: E402

COMPONENTS = ("p3sam", "model", "conditioner", "shapevae")

#: The child: the CLI's start-up order (byte-code cache, read-ahead helper, then imports, then both models in
#: parallel), then optionally the first calls.  Prints ``READY {json}`` and ``FIRST {json}``.
CHILD = r"""
import json, os, sys, time
t_wall0 = time.time()
t0 = time.perf_counter()
w, dev, num, first = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
from turbopart.runtime import bytecode, prefetch
bytecode.enable()
helper = prefetch.start(w, ("p3sam", "model", "conditioner", "shapevae"))
t_helper = time.perf_counter()
import torch
t_torch = time.perf_counter()
from concurrent.futures import ThreadPoolExecutor
from turbopart.xpart.pipeline import XPartPipeline
from turbopart.p3sam.segmenter import Segmenter
t_imp = time.perf_counter()

warm = os.environ.get("BENCH_WARMUP") == "1"

def seg_load():
    t = time.perf_counter()
    s = Segmenter.from_pretrained(w, device=dev, numerics=num)
    load = time.perf_counter() - t
    if warm:  # experiment: a throw-away segmentation while X-Part still loads
        import trimesh
        s.segment(trimesh.creation.icosphere(subdivisions=3),
                  points=int(os.environ.get("BENCH_POINTS", "100000")),
                  prompts=int(os.environ.get("BENCH_PROMPTS", "400")), seed=0,
                  variant="xpart")
    return s, load, time.perf_counter() - t0

with ThreadPoolExecutor(2) as pool:
    fs = pool.submit(seg_load)
    fx = pool.submit(XPartPipeline.from_pretrained, w, device=dev, numerics=num)
    pipe = fx.result()
    t_x = time.perf_counter() - t0
    seg, seg_s, t_seg = fs.result()
cuda = torch.device(dev).type == "cuda"
if cuda:
    torch.cuda.synchronize()
t1 = time.perf_counter()
info = {"python_start_s": t_wall0 - float(os.environ.get("BENCH_T0", t_wall0)),
        "helper_spawn_s": t_helper - t0, "torch_import_s": t_torch - t_helper,
        "imports_s": t_imp - t0, "load_s": t1 - t_imp, "in_process_s": t1 - t0,
        "resident_gb": torch.cuda.memory_allocated() / 2**30 if cuda else None,
        "xpart_load_s": pipe.load_timings, "p3sam_load_s": seg_s,
        "xpart_ready_s": t_x, "p3sam_ready_s": t_seg, "warmup": warm,
        "helper": helper is not None,
        "loader": os.environ.get("TURBOPART_LOADER", "auto"),
        "prefetch": prefetch.mode()}
print("READY " + json.dumps(info), flush=True)
if not first:
    sys.exit(0)

import numpy as np
from turbopart.runtime.profiling import Profile
from turbopart.examples import example_mesh
out = {}
t = time.perf_counter()
mesh = example_mesh("chair")
out["example_mesh_s"] = time.perf_counter() - t
runs = []
for i in range(2):
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = seg.segment(mesh, points=int(os.environ.get("BENCH_POINTS", "100000")),
                    prompts=int(os.environ.get("BENCH_PROMPTS", "400")), seed=42,
                    variant="xpart")
    if cuda:
        torch.cuda.synchronize()
    runs.append({"s": time.perf_counter() - t, "parts": r.num_parts, "stages_s": r.timings})
out["segmentation"] = runs
lo, hi = np.asarray(mesh.bounds, dtype=np.float64)
boxes = []
for i in range(2):
    for j in range(2):
        a = lo.copy(); b = hi.copy()
        a[0] = lo[0] + (hi[0] - lo[0]) * i / 2; b[0] = lo[0] + (hi[0] - lo[0]) * (i + 1) / 2
        a[2] = lo[2] + (hi[2] - lo[2]) * j / 2; b[2] = lo[2] + (hi[2] - lo[2]) * (j + 1) / 2
        boxes.append([a, b])
boxes = np.asarray(boxes)
steps = int(os.environ.get("BENCH_STEPS", "3"))
runs = []
for i in range(2):
    prof = Profile(device=dev)
    t = time.perf_counter()
    res = pipe(mesh, boxes, steps=steps, seed=1, profile=prof,
               octree_resolution=int(os.environ.get("BENCH_OCTREE", "128")))
    if cuda:
        torch.cuda.synchronize()
    runs.append({"s": time.perf_counter() - t, "steps": steps, "parts": len(res.parts),
                 "stages_s": dict(res.timings)})
out["xpart"] = runs
try:
    from turbopart.p3sam import predictor as P
    out["p3sam_tiles"] = {str(k): str(v) for k, v in P._TritonPairs._tuned.items()}
    out["p3sam_tune"] = P.tune_default()
except Exception as exc:
    out["p3sam_tiles"] = repr(exc)
out["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR")
print("FIRST " + json.dumps(out), flush=True)
"""

IMPORT_CHILD = r"""
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import turbopart.xpart.pipeline, turbopart.p3sam.segmenter
t2 = time.perf_counter()
print("IMPORTED %f %f" % (t1 - t0, t2 - t0), flush=True)
"""


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env.pop("TURBOPART_PREFETCH_LOG", None)
    env.update(extra or {})
    return env


def run_child(code: str, args: list[str], env: dict, *, cold: bool, timeout: float = 200
              ) -> dict:
    """Run ``code`` in a fresh interpreter; ``{"READY": {...}, "FIRST": {...}, ...}``."""
    dropped = drop_page_cache() if cold else False
    log = Path(tempfile.mkstemp(prefix="turbopart-prefetch-", suffix=".json")[1])
    log.unlink()
    env = dict(env, TURBOPART_PREFETCH_LOG=str(log), BENCH_T0=repr(time.time()))
    errf = tempfile.TemporaryFile(mode="w+")  # not a pipe: -X importtime writes a lot
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *code, *args], stdout=subprocess.PIPE,
                            stderr=errf, text=True, env=env, cwd=str(REPO))
    out: dict = {"page_cache": ("cold (dropped)" if dropped else "warm (could not drop)")
                 if cold else "warm"}
    import threading
    watchdog = threading.Timer(timeout, proc.kill)  # a hung child must not hang the bench
    watchdog.start()
    try:
        for line in proc.stdout:
            tag, _, rest = line.partition(" ")
            if tag in ("READY", "FIRST"):
                out[tag] = json.loads(rest)
                out[tag]["wall_s"] = time.perf_counter() - t0
            elif tag == "IMPORTED":
                a, b = rest.split()
                out[tag] = {"torch_s": float(a), "all_s": float(b),
                            "wall_s": time.perf_counter() - t0}
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        watchdog.cancel()
    errf.seek(0)
    err = errf.read()
    errf.close()
    out["rc"] = proc.returncode
    if proc.returncode != 0:
        out["stderr"] = err[-3000:]
    elif "-X" in code:
        out["importtime"] = top_imports(err)
    warns = [l for l in err.splitlines() if "Warning" in l]
    if warns:
        out["warnings"] = warns[:10]
    time.sleep(0.3)  # the helper writes its log when done
    if log.is_file():
        try:
            out["helper"] = json.loads(log.read_text())
        except ValueError:
            pass
        log.unlink()
    return out


def top_imports(stderr: str, n: int = 15) -> list[tuple[str, float]]:
    """The ``-X importtime`` entries with the largest cumulative time (seconds)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        try:
            cum = int(parts[1])
        except ValueError:
            continue
        rows.append((parts[2].rstrip(), cum / 1e6))
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


def component_bytes(weights: Path) -> dict[str, int]:
    from turbopart.runtime import prefetch as P
    out = {}
    for comp in COMPONENTS:
        path = P.component_file(weights, comp)
        if path is None:
            continue
        _, index = P.safetensors_index(path)
        out[comp] = sum(e - b for name, (_, _, b, e) in index.items() if P.needed(comp, name))
    return out


# --------------------------------------------------------------------------- correctness

def check_loader(weights: Path, device: str) -> dict:
    """Sequential reader vs memory-mapped reader, every tensor bitwise, on ``device``."""
    import torch
    from turbopart import weights as W
    out = {}
    for comp in COMPONENTS:
        res = {}
        sds = {}
        for mode in ("sequential", "mmap"):
            os.environ["TURBOPART_LOADER"] = mode
            sync(device)
            t = time.perf_counter()
            m = W.load_component(weights, comp, device=device, numerics="fast")
            sync(device)
            res[f"{mode}_warm_s"] = time.perf_counter() - t
            sds[mode] = m.state_dict()
        os.environ.pop("TURBOPART_LOADER", None)
        a, b = sds["sequential"], sds["mmap"]
        bad = [k for k in a if k not in b or a[k].dtype != b[k].dtype
               or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
        res.update(tensors=len(a), equal=not bad and list(a) == list(b), mismatched=bad[:5],
                   gb=sum(t.numel() * t.element_size() for t in a.values()) / 1e9)
        out[comp] = res
        del sds, a, b, m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_heads(weights: Path, device: str) -> dict:
    """The fused heads with the default (fixed) tiles vs the plain-PyTorch bf16 kernel on
    random point features with a scaled init (not constant masks)."""
    import torch
    from turbopart import weights as W
    from turbopart.p3sam import predictor as P
    model = W.load_component(weights, "p3sam", device=device, numerics="fast")
    with torch.no_grad():  # scaled init: masks that are not near-constant
        for name, p in model.named_parameters():
            if p.dim() == 2 and "sonata" not in name:
                p.mul_(3.0)
    g = torch.Generator(device=device).manual_seed(0)
    n, k = 100000, 400
    pts = torch.rand(n, 3, device=device, generator=g) * 2 - 1
    feats = torch.randn(n, model.feat_dim, device=device, generator=g)
    prompts = pts[torch.randperm(n, device=device, generator=g)[:k]]
    res = {}
    outs = {}
    for kernel in ("torch", "triton"):
        pred = P.P3SAMPredictor(model, numerics="fast", device=device, kernel=kernel)
        pred.set_features(feats, pts)
        pred.predict(prompts, return_all=True, logits=True)  # compile / plans
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs[kernel] = pred.predict(prompts, return_all=True, logits=True)
        torch.cuda.synchronize()
        res[f"{kernel}_s"] = time.perf_counter() - t
    a, b = outs["torch"], outs["triton"]
    res["tiles"] = {str(k): str(v) for k, v in P._TritonPairs._tuned.items()}
    res["stage2_logit_max_abs_diff"] = (a.stage2_logits - b.stage2_logits).abs().max().item()
    res["stage2_logit_ref_max_abs"] = a.stage2_logits.abs().max().item()
    res["pred_iou_max_abs_diff"] = (a.pred_iou - b.pred_iou).abs().max().item()
    res["all_masks_point_agreement"] = (a.all_masks == b.all_masks).float().mean().item()
    res["mask_fill"] = a.all_masks.float().mean().item()
    return res


# --------------------------------------------------------------------------- report

def fmt(x, unit="s", nd=1):
    return "-" if x is None else f"{x:.{nd}f} {unit}".strip()


def table(report: dict) -> str:
    L = []
    L.append(f"start-up: process start -> P3-SAM + X-Part ready ({report['numerics']}, "
             f"{report['device']}; {report['gpu']})")
    L.append(f"  {'variant':<54} {'wall':>7} {'imports':>8} {'load':>6}  helper libs/weights done")
    for name, r in list(report.get("setup", {}).items()) + list(report["startup"].items()):
        R = r.get("READY")
        if r.get("skipped"):
            L.append(f"  {name:<54} skipped ({r['skipped']})")
            continue
        if R is None:
            L.append(f"  {name:<54} failed (rc {r.get('rc')}): "
                     f"{(r.get('stderr') or '').strip().splitlines()[-1:]}")
            continue
        h = r.get("helper") or {}
        hs = ""
        if h:
            hs = (f"{fmt(h.get('libs', {}).get('done_after_start_s'))} / "
                  f"{fmt(h.get('weights', {}).get('done_after_start_s'))}")
        extra = ""
        if R.get("warmup"):
            extra = (f"  (X-Part ready {R['xpart_ready_s']:.1f} s, P3-SAM + warm-up "
                     f"{R['p3sam_ready_s']:.1f} s in-process)")
        L.append(f"  {name:<54} {R['wall_s']:6.1f}s {R['imports_s']:7.1f}s "
                 f"{R['load_s']:5.1f}s  {hs}{extra}")
        if r.get("warnings"):
            L.append(f"    warnings: {r['warnings'][:3]}")
    d = report["startup"].get(report.get("headline", ""), {}).get("READY")
    if d:
        xs = d.get("xpart_load_s") or {}
        t_imp = d["imports_s"]
        parts = [f"{c} {report['bytes'].get(c, 0) / 1e9:.2f} GB done {t_imp + xs[c]:.1f} s"
                 for c in ("model", "conditioner", "shapevae") if c in xs]
        parts.append(f"p3sam {report['bytes'].get('p3sam', 0) / 1e9:.2f} GB done "
                     f"{t_imp + d['p3sam_load_s']:.1f} s")
        L.append("  per component (headline run, from process start): " + "; ".join(parts))
        L.append(f"  resident GPU memory {fmt(d.get('resident_gb'), 'GB', 2)}; torch import "
                 f"{fmt(d.get('torch_import_s'))}; interpreter start {fmt(d.get('python_start_s'), 's', 2)}")
    imp = report.get("imports_cold")
    if imp and imp.get("IMPORTED"):
        L.append(f"imports alone, cold cache: torch {imp['IMPORTED']['torch_s']:.1f} s, all "
                 f"{imp['IMPORTED']['all_s']:.1f} s; top: " + ", ".join(
                     f"{n.strip()} {t:.2f}" for n, t in (imp.get("importtime") or [])[:8]))
    for name, r in report.get("first_calls", {}).items():
        F = r.get("FIRST")
        if not F:
            continue
        L.append(f"first calls, {name}:  first / second call")
        s1, s2 = F["segmentation"]
        L.append(f"  segmentation {s1['s']:7.2f} / {s2['s']:6.2f} s   " + ", ".join(
            f"{k} {v:.2f}/{s2['stages_s'].get(k, 0):.2f}" for k, v in s1["stages_s"].items()
            if v > 0.05 or s2["stages_s"].get(k, 0) > 0.05))
        x1, x2 = F["xpart"]
        L.append(f"  X-Part K=4   {x1['s']:7.2f} / {x2['s']:6.2f} s   " + ", ".join(
            f"{k} {v:.2f}/{x2['stages_s'].get(k, 0):.2f}" for k, v in x1["stages_s"].items()))
    c = report.get("correctness", {})
    if c.get("loader"):
        ok = all(v.get("equal") for v in c["loader"].values())
        L.append("loader sequential vs mmap (GPU, bitwise): " + ("EQUAL" if ok else "DIFFER") +
                 "; " + ", ".join(f"{k} {v['tensors']} tensors {v['gb']:.2f} GB warm "
                                  f"{v['sequential_warm_s']:.2f}/{v['mmap_warm_s']:.2f} s"
                                  for k, v in c["loader"].items()))
    h = c.get("heads")
    if h and "stage2_logit_max_abs_diff" in h:
        L.append(f"P3-SAM heads, fixed tiles vs torch bf16: stage-2 logits max|d| "
                 f"{h['stage2_logit_max_abs_diff']:.4f} (ref max {h['stage2_logit_ref_max_abs']:.2f}), "
                 f"pred IoU max|d| {h['pred_iou_max_abs_diff']:.4f}, mask agreement "
                 f"{h['all_masks_point_agreement']:.4f} (fill {h['mask_fill']:.2f}); "
                 f"triton {h['triton_s']:.3f} s vs torch {h['torch_s']:.3f} s")
    for k, v in c.items():
        if isinstance(v, dict) and "error" in v:
            L.append(f"{k}: ERROR {v['error']}")
    L.append(f"total bench time {report['bench_s']:.0f} s")
    return "\n".join(L)


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="full-size weight folder (default: "
                    "random weights in ~/.cache/turbopart/random-<init>, built if needed)")
    ap.add_argument("--init", default="realistic", choices=["realistic", "plain"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--numerics", default="fast", choices=["fast", "exact"])
    ap.add_argument("--budget", type=float, default=190.0,
                    help="seconds; variants that would start later are skipped")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-checks", action="store_true", help="skip the correctness checks")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script: tiny "
                    "random weights, small settings (no meaningful figures)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        os.environ.update(BENCH_POINTS="3000", BENCH_PROMPTS="16", BENCH_OCTREE="32",
                          BENCH_STEPS="2")
    t_bench = time.perf_counter()

    import torch
    sys.path.insert(0, str(REPO))
    from turbopart.runtime.profiling import git_commit
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    t = time.perf_counter()
    if args.weights:
        weights = Path(args.weights)
    elif args.tiny:
        from turbopart import weights as W
        weights = W.write_random(Path(tempfile.mkdtemp(prefix="turbopart-tiny-")), tiny=True)
    else:
        from turbopart.xpart.commands import random_weights
        weights = random_weights(args.init, progress=False)
    weights_s = time.perf_counter() - t
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    work = Path(tempfile.mkdtemp(prefix="turbopart-bench-startup-"))
    profile = work / "startup-profile.json"
    triton_cache = work / "triton-cache"
    base = {"TURBOPART_STARTUP_PROFILE": str(profile), "TRITON_CACHE_DIR": str(triton_cache)}
    report = {"benchmark": "startup", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu,
              "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
              "python": platform.python_version(), "commit": git_commit(),
              "device": dev, "numerics": args.numerics, "weights": str(weights),
              "weights_prepare_s": weights_s, "bytes": component_bytes(weights),
              "cpus": os.cpu_count(), "setup": {}, "startup": {}, "first_calls": {},
              "headline": "cold, sequential + read-ahead (weights+profile)"}
    a = ["-c", CHILD]
    std = [str(weights), dev, args.numerics]

    def over() -> bool:
        return time.perf_counter() - t_bench > args.budget

    def go(name, env, cold, first=False, key="startup"):
        if over():
            report[key][name] = {"skipped": "budget"}
            print(f"[startup] {name}: skipped (budget)", file=sys.stderr, flush=True)
            return
        print(f"[startup] {name} ...", file=sys.stderr, flush=True)
        r = run_child(a, std + ["1" if first else "0"], child_env({**base, **env}), cold=cold)
        report[key][name] = r
        if first and key == "startup":
            report["first_calls"][name] = r
        R = r.get("READY")
        print(f"[startup] {name}: " + (f"{R['wall_s']:.1f} s" if R else f"FAILED rc {r['rc']}\n"
                                        f"{r.get('stderr', '')[-1500:]}"),
              file=sys.stderr, flush=True)

    # 1. The first process on this machine (as a first CLI run): records the library profile
    #    of the start-up and of the first calls.
    go("first process (records the profile)", {}, cold=False, first=True, key="setup")
    # 2. The headline: cold cache, defaults, then the first calls with an empty Triton cache
    #    (a fresh machine); 3. warm page cache, Triton's on-disk cache filled by 2.
    shutil.rmtree(triton_cache, ignore_errors=True)
    go(report["headline"], {}, cold=True, first=True)
    shutil.rmtree(triton_cache, ignore_errors=True)
    go("cold + warm-up segmentation during load (experiment)", {"BENCH_WARMUP": "1"},
       cold=True, first=True)
    go("warm cache, defaults", {}, cold=False, first=True)
    # 4. Correctness of the GPU paths.
    if not args.no_checks:
        report["correctness"] = {}
        checks = (("loader", check_loader), ("heads", check_heads)) \
            if torch.device(dev).type == "cuda" else (("loader", check_loader),)
        for name, fn in checks:
            print(f"[startup] check {name} ...", file=sys.stderr, flush=True)
            try:
                report["correctness"][name] = fn(weights, dev)
            except Exception as exc:  # report, do not lose the timings
                import traceback
                report["correctness"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                               "trace": traceback.format_exc()[-2000:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # 5. Variants (cold), least important last (skipped when over the budget).
    go("cold, sequential + read-ahead (weights only)", {"TURBOPART_PREFETCH": "weights"},
       cold=True)
    go("cold, sequential, no read-ahead", {"TURBOPART_PREFETCH": "0"}, cold=True)
    # 6. Where the cold import time goes.
    if not over():
        print("[startup] imports, cold, -X importtime ...", file=sys.stderr, flush=True)
        report["imports_cold"] = run_child(["-X", "importtime", "-c", IMPORT_CHILD], [],
                                           child_env(base), cold=True, timeout=120)
    go("cold, mmap loader, no read-ahead (previous)",
       {"TURBOPART_PREFETCH": "0", "TURBOPART_LOADER": "mmap"}, cold=True)
    report["bench_s"] = time.perf_counter() - t_bench
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"startup-{gpu.replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
