"""Benchmark one X-Part DiT step (full size, random weights) in ``exact`` and ``fast``.

Run on the GPU (the lead's H100)::

    python benchmarks/bench_dit.py --parts 8 24 --out benchmarks/results/dit-h100.json
    python benchmarks/bench_dit.py --parts 8 --numerics fast --compile      # + torch.compile
    python benchmarks/bench_dit.py --check --parts 8                         # fidelity only
    python benchmarks/bench_dit.py --parts 8 --cache all --kernels legacy    # per-block path
    python benchmarks/bench_dit.py --parts 8 --cache all --sdpa cudnn        # pin SDPA backend

``--kernels`` / ``--sdpa`` / ``--kv-layout`` select the fast step (default: the runner's
environment switches ``TURBOPART_DIT_KERNELS`` / ``TURBOPART_DIT_SDPA`` /
``TURBOPART_DIT_KV_LAYOUT``; see :mod:`turbopart.xpart.dit_runner`).  ``--cache auto`` sizes
the K/V cache by the process GPU budget (``TURBOPART_GPU_BUDGET_GB``, 10 by default): use
``--cache all`` for the all-cached figures.  ``benchmarks/dit_variants.py`` verifies and
times all variants in one run.

Weights: N(0, 0.02²), biases 0, norm weights 1 (the official baseline's init), built on
the meta device and materialised directly on the GPU (fp32 for ``exact``, bf16 Linear
weights for ``fast``).  Inputs: 1024 latent tokens per part, 4096 + 4096 condition tokens.

Reported per setting: median step time over ``--steps`` (≥ 10) after ``--warmup``, peak
memory during the steps, resident weight memory, K/V cache size, and model FLOP
utilisation against ``--peak`` TFLOP/s with the FLOP count of spec xpart §8.1:
6.87 TF·K + 0.086 TF·K² per step, minus 1.443 TF·K when the cross-attention K/V are cached
(pro rata for partial caching).  ``--check``: relative error of ``fast`` against ``exact``
on the same weights and inputs (and of the CUDA-graph step against the eager step).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turbopart.xpart import dit as dit_mod  # noqa: E402
from turbopart.xpart.dit_runner import DiTRunner  # noqa: E402

SPEC_TF_PER_PART = 6.87
SPEC_TF_PER_PART2 = 0.086
SPEC_KV_TF_PER_PART = 1.443


def spec_flops(k: int, cached_fraction: float) -> float:
    return 1e12 * (SPEC_TF_PER_PART * k + SPEC_TF_PER_PART2 * k * k
                   - SPEC_KV_TF_PER_PART * k * cached_fraction)


def exact_flops(p: dict, k: int, n: int, s1: int, s2: int, cached_fraction: float) -> float:
    """Our own count (multiply-add = 2) for the config, for comparison with the spec's."""
    d, depth, c = p["hidden_size"], p["depth"], p["in_channels"]
    e1, e2 = p["encoder_hidden_dim"], p["encoder_hidden2_dim"]
    L = n + 1
    f = 2 * n * c * d * 2  # x_embedder + final linear
    for i in range(depth):
        f += 8 * L * d * d                                   # q/k/v + out_proj
        f += 4 * (k * L) * L * d if (i + 1) % 2 == 0 else 4 * L * L * d  # attention core
        f += 2 * (4 * L * d * d) + 4 * L * (s1 + s2) * d     # cross q/out + cores
        f += (1 - cached_fraction) * (2 * s1 * e1 * 2 * d + 2 * s2 * e2 * 2 * d)
        if depth - i <= p["num_moe_layers"]:
            f += (p["moe_top_k"] + 1) * 16 * L * d * d + 2 * L * d * p["num_experts"]
        else:
            f += 16 * L * d * d
        if i > depth // 2:
            f += 4 * L * d * d
    return f * k


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        for t in getattr(m, "lp_norms", {}).values():
            tensors.append(t)
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def make_model(numerics: str, device: torch.device, seed: int, config: dict | None = None
               ) -> dit_mod.PartFormerDiT:
    with torch.device("meta"):
        model = dit_mod.build(config)
    lin = torch.float32 if numerics == "exact" else torch.bfloat16
    dit_mod.materialize_random(model, device=device, numerics=numerics, seed=seed,
                               linear_dtype=lin)
    return model.prepare(numerics)


def make_inputs(k: int, device: torch.device, seed: int, model: dit_mod.PartFormerDiT,
                n: int, s: int):
    p = model.params
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(k, n, p["in_channels"], device=device, generator=g)
    obj = torch.randn(k, s, p["encoder_hidden_dim"], device=device, generator=g)
    geo = torch.randn(k, s, p["encoder_hidden2_dim"], device=device, generator=g)
    obj, geo = obj.to(model.cd), geo.to(model.cd)
    idx = torch.randperm(50, device="cpu", generator=torch.Generator().manual_seed(seed))[:k]
    return x, obj, geo, idx.to(device)


def time_steps(runner: DiTRunner, x, idx, warmup: int, steps: int) -> list[float]:
    """Milliseconds per step (CUDA events on the GPU)."""
    # timesteps as device tensors (a Python float would cost a host-to-device copy per step)
    ts = list(torch.linspace(0.0, 1.0, warmup + steps, device=x.device).unbind(0))
    cuda = x.device.type == "cuda"
    for i in range(warmup):
        runner(x, ts[i], idx)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            runner(x, ts[warmup + i], idx)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            runner(x, ts[warmup + i], idx)
            times.append(1e3 * (time.perf_counter() - t0))
    return times


class Mem:
    """CUDA memory statistics (zeros on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def empty(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def sizes(args) -> tuple[dict | None, int, int]:
    """(config, latent tokens, condition tokens): full size, or tiny for a CPU smoke run."""
    if args.tiny:
        return dit_mod.tiny_config(), 32, 24
    return None, 1024, 4096


def bench_one(numerics: str, k: int, args, device: torch.device) -> dict:
    mem = Mem(device)
    mem.empty()
    mem.reset()
    cfg, n, s = sizes(args)
    t0 = time.perf_counter()
    model = make_model(numerics, device, args.seed, cfg)
    mem.sync()
    load_s = time.perf_counter() - t0
    wbytes = weight_bytes(model)
    x, obj, geo, idx = make_inputs(k, device, args.seed, model, n, s)
    cache = args.cache if args.cache is not None else ("none" if numerics == "exact" else "auto")
    cache = int(cache) if str(cache).isdigit() else cache
    graph = None if args.graph == "auto" else args.graph == "on"
    base = mem.allocated()
    t0 = time.perf_counter()
    runner = DiTRunner(model, obj, geo, cache_blocks=cache, cuda_graph=graph,
                       compile=bool(args.compile and numerics == "fast"),
                       compile_mode=args.compile_mode, latent_tokens=n,
                       kernels=args.kernels, sdpa=args.sdpa, kv_layout=args.kv_layout)
    mem.sync()
    setup_s = time.perf_counter() - t0
    kv_bytes = mem.allocated() - base
    mem.reset()
    t0 = time.perf_counter()
    times = time_steps(runner, x, idx, args.warmup, args.steps)
    first_s = time.perf_counter() - t0
    med = statistics.median(times) / 1e3
    frac = runner.cached_blocks / model.depth
    flops = spec_flops(k, frac)
    ours = exact_flops(model.params, k, n, s, s, frac)
    res = {
        "numerics": numerics, "parts": k, "cached_blocks": runner.cached_blocks,
        "cuda_graph": runner.use_graph, "compiled": runner.block_fns is not None,
        "step_ms_median": med * 1e3, "step_ms_min": min(times),
        "step_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
        "steps_timed": len(times), "warmup": args.warmup,
        "spec_tflop_per_step": flops / 1e12, "counted_tflop_per_step": ours / 1e12,
        "achieved_tflops": flops / med / 1e12,
        "mfu": flops / med / (args.peak * 1e12),
        "peak_mem_gb": mem.peak() / 1e9,
        "resident_weights_gb": wbytes / 1e9, "kv_cache_gb": kv_bytes / 1e9,
        "load_s": load_s, "setup_s": setup_s, "warmup_plus_timed_s": first_s,
        "moe_impl": next((b.moe.impl for b in model.blocks if b.use_moe), None),
        "config": runner.describe(),
    }
    runner.close()
    del runner, model
    mem.empty()
    return res


@torch.no_grad()
def check(k: int, args, device: torch.device) -> dict:
    """fast vs exact on the same weights/inputs; graph (or compiled) vs eager for fast."""
    mem = Mem(device)
    cfg, n, s = sizes(args)
    exact = make_model("exact", device, args.seed, cfg)
    x, obj, geo, idx = make_inputs(k, device, args.seed, exact, n, s)
    ref = DiTRunner(exact, obj, geo, cache_blocks="none", compile=False)(
        x, 0.37, idx).float()
    del exact
    mem.empty()
    fast = make_model("fast", device, args.seed, cfg)  # same draws, bf16 Linear weights
    run_g = DiTRunner(fast, obj, geo, cache_blocks="auto", compile=args.compile,
                      compile_mode=args.compile_mode, kernels=args.kernels,
                      sdpa=args.sdpa, kv_layout=args.kv_layout)
    out = run_g(x, 0.37, idx).float()
    cached, graph, compiled = run_g.cached_blocks, run_g.use_graph, \
        run_g.block_fns is not None
    run_g.close()
    del run_g
    mem.empty()
    eager = DiTRunner(fast, obj, geo, cache_blocks=cached, cuda_graph=False,
                      compile=False, kernels=args.kernels, sdpa=args.sdpa,
                      kv_layout=args.kv_layout)(x, 0.37, idx).float()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    res = {"parts": k, "rel_fro_fast_vs_exact": rel(out, ref),
           "max_abs_rel_fast_vs_exact": float((out - ref).abs().max() / ref.abs().max()),
           "rel_fro_graph_vs_eager": rel(out, eager),
           "fast_cuda_graph": graph, "fast_compiled": compiled, "cached_blocks": cached}
    del fast
    mem.empty()
    return res


from turbopart.runtime.profiling import git_commit  # noqa: E402



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--numerics", nargs="+", default=["exact", "fast"],
                    choices=["exact", "fast"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cache", default=None,
                    help="cross-attention K/V cache: auto | all | none | N blocks "
                         "(default: none for exact, auto for fast)")
    ap.add_argument("--graph", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks (fast)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--sdpa", default=None,
                    help="SDPA backend: auto | cudnn | flash | efficient, or per kind "
                         "'local=flash,global=cudnn,cross=cudnn' (default: TURBOPART_DIT_SDPA)")
    ap.add_argument("--kernels", default=None,
                    help="fast-step kernels: all | none | legacy | comma list of ln,qk,moe "
                         "(default: TURBOPART_DIT_KERNELS, else all)")
    ap.add_argument("--kv-layout", default=None, choices=["strided", "contiguous"],
                    help="layout of per-step cross K/V (default: TURBOPART_DIT_KV_LAYOUT)")
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 peak TFLOP/s for MFU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="only the fast-vs-exact check")
    ap.add_argument("--out", type=str, default=None, help="write JSON here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny config (smoke test of this script, e.g. on the CPU)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_dit needs a CUDA device (or --device cpu --tiny)", file=sys.stderr)
        return 2
    if args.steps < 10 and not args.check:
        print("note: fewer than 10 timed steps", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    info = {"gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "mem_fraction": os.environ.get("TURBOPART_MEM_FRACTION", "0.6")}
    results, checks = [], []
    if args.check:
        for k in args.parts:
            c = check(k, args, device)
            checks.append(c)
            print(f"K={k:>3}  fast vs exact: rel(Frobenius) {c['rel_fro_fast_vs_exact']:.3e}, "
                  f"max|diff|/max|ref| {c['max_abs_rel_fast_vs_exact']:.3e};  graph vs eager "
                  f"{c['rel_fro_graph_vs_eager']:.2e}  (graph={c['fast_cuda_graph']}, "
                  f"compiled={c['fast_compiled']})", flush=True)
    else:
        hdr = (f"{'numerics':<8} {'K':>3} {'step ms':>9} {'TF/step':>8} {'TFLOP/s':>8} "
               f"{'MFU':>6} {'peak GB':>8} {'weights GB':>10} {'KV GB':>7} {'cached':>6} "
               f"{'graph':>5} {'compiled':>8}  config")
        print(hdr, flush=True)
        for num in args.numerics:
            for k in args.parts:
                r = bench_one(num, k, args, device)
                results.append(r)
                print(f"{num:<8} {k:>3} {r['step_ms_median']:>9.1f} "
                      f"{r['spec_tflop_per_step']:>8.1f} {r['achieved_tflops']:>8.0f} "
                      f"{100 * r['mfu']:>5.1f}% {r['peak_mem_gb']:>8.1f} "
                      f"{r['resident_weights_gb']:>10.2f} {r['kv_cache_gb']:>7.1f} "
                      f"{r['cached_blocks']:>6} {str(r['cuda_graph']):>5} "
                      f"{str(r['compiled']):>8}  {r['config']}", flush=True)
        print("official baseline (H100, torch 2.11): 219 ms at K=8, 657 ms at K=24")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump({**info, "results": results, "checks": checks}, f, indent=2)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
