"""Verify and time the fast X-Part DiT step variants on the GPU (one run, ≤ ~4 minutes).

    python benchmarks/dit_variants.py --out benchmarks/results/dit_variants_h100.json
    python benchmarks/dit_variants.py --compile        # + torch.compile variant (slow, opt-in)
    python benchmarks/dit_variants.py --device cpu --tiny   # smoke test of this script

Full-size random weights (bf16 Linear weights N(0, 0.02²), built on the meta device and
materialised on the GPU; the ``exact`` reference has the same draws in fp32).  Sections:

1. kernel checks: each Triton kernel against its PyTorch formulation at K=8 sizes (max abs
   difference, share of differing outputs, share beyond 1 bf16 ulp) and its time vs the
   PyTorch ops it replaces;
2. SDPA backends per attention shape of the step (local, global, cross; cached and
   per-step K/V layouts);
3. step variants at K = 8 and 24 (legacy per-block modules = the measured baseline; the
   fused step with each kernel group; SDPA backends; K/V cache all / none / partial / auto
   under a 12 GB budget; torch.compile when asked): median step time (CUDA-graph replay),
   TFLOP/s and MFU with the FLOP count of spec xpart §8.1, peak memory, relative error
   against the baseline and against ``exact`` (same weights, same inputs, t = 0.37);
4. a kernel-time profile (eager step, categories) of the baseline and the fused step.

The table at the end marks each variant ``ok`` when its error against ``exact`` is within
1.2× (+2e-3) of the baseline's, and names the fastest ``ok`` setting as environment
variables for the runner.  Variants are skipped (and listed) once ``--budget-s`` is used up.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_dit  # noqa: E402
from turbopart.nn import kernels as nn_kernels  # noqa: E402
from turbopart.nn.attention import attention, backend_context  # noqa: E402
from turbopart.runtime import memory  # noqa: E402
from turbopart.runtime.profiling import sync  # noqa: E402
from turbopart.xpart.dit_runner import DiTRunner  # noqa: E402

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0




def cuda_time(fn, dev, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; wall clock on the CPU)."""
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ulp_stats(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Differences of low-precision outputs: max abs, share differing, share > 1 ulp."""
    g, r = got.float(), ref.float()
    diff = (g - r).abs()
    out = {"max_abs": float(diff.max()), "share_diff": float((g != r).float().mean())}
    if got.dtype == torch.bfloat16:
        ulp = torch.where(r == 0, torch.full_like(r, 2.0 ** -133),
                          2.0 ** (torch.floor(torch.log2(r.abs().clamp_min(1e-38))) - 7))
        out["share_gt_1ulp"] = float((diff > ulp * 1.0001).float().mean())
    return out


# --------------------------------------------------------------------------- 1. kernels

def kernel_checks(dev, k: int, d: int, heads: int, dt) -> dict:
    from turbopart.nn.kernels import rownorm
    from turbopart.nn.norms import layer_norm
    import torch.nn.functional as F
    res = {}
    if not nn_kernels.available(dev):
        return {"skipped": "Triton unavailable on this device"}
    g = torch.Generator(device=dev).manual_seed(5)
    L = 1025 if d >= 1024 else 33
    t = k * L
    hd = d // heads
    h = torch.randn(t, d, device=dev, generator=g) * 4
    a = torch.randn(t, d, device=dev, generator=g).to(dt)
    b = torch.randn(t, d, device=dev, generator=g).to(dt)
    w1 = 1 + 0.1 * torch.randn(d, device=dev, generator=g)
    b1 = 0.1 * torch.randn(d, device=dev, generator=g)
    w2 = 1 + 0.1 * torch.randn(d, device=dev, generator=g)
    b2 = 0.1 * torch.randn(d, device=dev, generator=g)
    o1 = torch.empty(t, d, device=dev, dtype=dt)
    o2 = torch.empty(t, d, device=dev, dtype=dt)

    # (a) h + a + b, then LN → one output (after the cross-attentions)
    def torch_add2():
        hh = (h + a) + b
        return hh, layer_norm(hh, w1, b1, 1e-6).to(dt)

    def fused_add2():
        hh = h.clone()
        rownorm.residual_ln(hh, adds=[a, b], norms=[((w1, b1, 1e-6), o1, 0)], h_out=hh)
        return hh, o1
    rh, ro = torch_add2()
    fh, fo = fused_add2()
    res["add2_ln"] = {"h_max_abs": float((fh - rh).abs().max()), **ulp_stats(fo, ro),
                      "torch_ms": cuda_time(torch_add2, dev),
                      "fused_ms": cuda_time(lambda: rownorm.residual_ln(
                          h, adds=[a, b], norms=[((w1, b1, 1e-6), o1, 0)],
                          h_out=torch.empty_like(h)), dev)}

    # (b) h + o, then two LNs (after self-attention)
    def torch_add_2ln():
        hh = h + a
        return layer_norm(hh, w1, b1, 1e-6).to(dt), layer_norm(hh, w2, b2, 1e-6).to(dt)
    r1, r2 = torch_add_2ln()
    hout = torch.empty_like(h)
    rownorm.residual_ln(h, adds=[a], norms=[((w1, b1, 1e-6), o1, 0), ((w2, b2, 1e-6), o2, 0)],
                        h_out=hout)
    s1, s2 = ulp_stats(o1, r1), ulp_stats(o2, r2)
    res["add_2ln"] = {"out1": s1, "out2": s2, "torch_ms": cuda_time(torch_add_2ln, dev),
                      "fused_ms": cuda_time(lambda: rownorm.residual_ln(
                          h, adds=[a], norms=[((w1, b1, 1e-6), o1, 0),
                                              ((w2, b2, 1e-6), o2, 0)], h_out=hout), dev)}

    # (c) MoE combine + add + LN into the padded MoE rows
    topk, r_ = 2, 2 * t
    ys = torch.randn(r_, d, device=dev, generator=g).to(dt)
    order = torch.randperm(r_, device=dev, generator=g)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(r_, device=dev)
    wt = torch.rand(t, topk, device=dev, generator=g) * 0.5
    sh = torch.randn(t, d, device=dev, generator=g).to(dt)
    from turbopart.nn.moe import combine_routes

    def torch_moe():
        y = torch.empty_like(ys).index_copy_(0, order, ys)
        y = (y.view(t, topk, d).float() * wt.unsqueeze(-1)).sum(1) + sh
        hh = h + y
        return hh, layer_norm(hh, w1, b1, 1e-6).to(dt)
    rh, ro = torch_moe()
    hh = h.clone()
    rownorm.residual_ln(hh, moe=(ys, inv, wt, sh), norms=[((w1, b1, 1e-6), o1, 0)], h_out=hh)
    res["moe_add_ln"] = {"h_max_abs": float((hh - rh).abs().max()), **ulp_stats(o1, ro),
                         "combine_routes_vs_ref": float((h + combine_routes(ys, inv, wt, sh)
                                                         - rh).abs().max()),
                         "torch_ms": cuda_time(torch_moe, dev),
                         "fused_ms": cuda_time(lambda: rownorm.residual_ln(
                             h, moe=(ys, inv, wt, sh), norms=[((w1, b1, 1e-6), o1, 0)],
                             h_out=hout), dev)}

    # (d) time token + part embedding + LN
    n = L - 1
    xe = torch.randn(k, n, d, device=dev, generator=g).to(dt)
    c = torch.randn(1, 1, d, device=dev, generator=g).to(dt)
    pe = 0.02 * torch.randn(50, d, device=dev, generator=g)
    idx = torch.randperm(50, device=dev, generator=g)[:k]

    def torch_embed():
        hh = torch.cat([c.expand(k, 1, d), xe + pe[idx].unsqueeze(1)], dim=1)
        return hh, layer_norm(hh, w1, b1, 1e-6).to(dt)
    rh, ro = torch_embed()
    eh = torch.empty(k, L, d, device=dev)
    eo = torch.empty(k, L, d, device=dev, dtype=dt)
    rownorm.embed_ln(xe, c, pe, idx, (w1, b1, 1e-6), eh, eo)
    res["embed_ln"] = {"h_equal": bool(torch.equal(eh, rh)), **ulp_stats(eo, ro),
                       "torch_ms": cuda_time(torch_embed, dev),
                       "fused_ms": cuda_time(lambda: rownorm.embed_ln(
                           xe, c, pe, idx, (w1, b1, 1e-6), eh, eo), dev)}

    # (e) q/k RMSNorm from the fused q|k|v output (self-attention)
    u = torch.randn(t, heads, 3, hd, device=dev, generator=g).to(dt)
    wq = 1 + 0.1 * torch.randn(hd, device=dev, generator=g)
    wk = 1 + 0.1 * torch.randn(hd, device=dev, generator=g)
    wq16, wk16 = wq.to(dt), wk.to(dt)  # what the per-block path uses when bf16-exact

    def torch_qk():
        return (F.rms_norm(u[:, :, 0], (hd,), wq16, 1e-6),
                F.rms_norm(u[:, :, 1], (hd,), wk16, 1e-6))
    wq, wk = wq16.float(), wk16.float()
    rq, rk = torch_qk()
    q = torch.empty(t, heads, hd, device=dev, dtype=dt)
    kk = torch.empty_like(q)
    rownorm.rms_heads(u[:, :, 0], wq, 1e-6, q, x2=u[:, :, 1], w2=wk, out2=kk)
    res["qk_rms"] = {"q": ulp_stats(q, rq), "k": ulp_stats(kk, rk),
                     "torch_ms": cuda_time(torch_qk, dev),
                     "fused_ms": cuda_time(lambda: rownorm.rms_heads(
                         u[:, :, 0], wq, 1e-6, q, x2=u[:, :, 1], w2=wk, out2=kk), dev)}
    # (f) k RMSNorm in place in a [K·S, H, 2, hd] k|v GEMM output (per-step cross K/V)
    s = 4096 if d >= 1024 else 40
    kvp = torch.randn(k * s, heads, 2, hd, device=dev, generator=g).to(dt)
    rk = F.rms_norm(kvp[:, :, 0], (hd,), wk16, 1e-6)
    kv2 = kvp.clone()
    rownorm.rms_heads(kv2[:, :, 0], wk, 1e-6, kv2[:, :, 0])
    res["k_rms_inplace"] = {**ulp_stats(kv2[:, :, 0], rk),
                            "v_untouched": bool(torch.equal(kv2[:, :, 1], kvp[:, :, 1])),
                            "torch_ms": cuda_time(lambda: (
                                F.rms_norm(kvp[:, :, 0], (hd,), wk16, 1e-6)
                                .transpose(1, 2).contiguous(),
                                kvp[:, :, 1].transpose(1, 2).contiguous()), dev),
                            "fused_ms": cuda_time(lambda: rownorm.rms_heads(
                                kv2[:, :, 0], wk, 1e-6, kv2[:, :, 0]), dev)}
    # (g) experimental: Linear + exact GELU as one Triton GEMM vs cuBLAS + GELU (FFN fc1)
    from turbopart.nn.kernels import gemm
    xg = torch.randn(t, d, device=dev, generator=g).to(dt)
    wg = (0.02 * torch.randn(4 * d, d, device=dev, generator=g)).to(dt)
    bg = (0.02 * torch.randn(4 * d, device=dev, generator=g)).to(dt)
    ref = F.gelu(F.linear(xg, wg, bg))
    row = {"torch_ms": cuda_time(lambda: F.gelu(F.linear(xg, wg, bg)), dev),
           "cublas_linear_only_ms": cuda_time(lambda: F.linear(xg, wg, bg), dev),
           "gemm_tflop": 2 * t * d * 4 * d / 1e12}
    for i, cfg in enumerate(gemm.CONFIGS if dev.type == "cuda" else [None]):
        try:
            out = gemm.linear_gelu(xg, wg, bg, config=cfg)
            row[f"config{i}"] = {"config": cfg, **ulp_stats(out, ref),
                                 "fused_ms": cuda_time(lambda: gemm.linear_gelu(
                                     xg, wg, bg, config=cfg), dev)}
        except Exception as exc:  # noqa: BLE001
            row[f"config{i}"] = {"config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]}
    res["linear_gelu"] = row
    return res


# --------------------------------------------------------------------------- 2. SDPA

def sdpa_checks(dev, k: int, d: int, heads: int, dt, backends) -> dict:
    hd = d // heads
    L = 1025 if d >= 1024 else 33
    s = 4096 if d >= 1024 else 40
    g = torch.Generator(device=dev).manual_seed(9)
    t = k * L
    u = torch.randn(t, heads, 3, hd, device=dev, generator=g).to(dt)
    q = u[:, :, 0].contiguous()
    kk = u[:, :, 1].contiguous()
    v = u[:, :, 2]
    kvp = torch.randn(k, s, heads, 2, hd, device=dev, generator=g).to(dt)
    kc = kvp[:, :, :, 0].transpose(1, 2).contiguous()
    vc = kvp[:, :, :, 1].transpose(1, 2).contiguous()
    shapes = {
        "local": (q.view(k, L, heads, hd).transpose(1, 2), kk.view(k, L, heads, hd).transpose(1, 2),
                  v.reshape(k, L, heads, hd).transpose(1, 2), 4 * k * L * L * d),
        "global": (q.view(1, t, heads, hd).transpose(1, 2), kk.view(1, t, heads, hd).transpose(1, 2),
                   v.reshape(1, t, heads, hd).transpose(1, 2), 4 * t * t * d),
        "cross_cached": (q.view(k, L, heads, hd).transpose(1, 2), kc, vc, 4 * k * L * s * d),
        "cross_strided": (q.view(k, L, heads, hd).transpose(1, 2),
                          kvp[:, :, :, 0].transpose(1, 2), kvp[:, :, :, 1].transpose(1, 2),
                          4 * k * L * s * d),
    }
    out = {}
    for name, (qq, k_, v_, flops) in shapes.items():
        ref = None
        row = {}
        for be in backends:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with backend_context(be):
                        o = attention(qq, k_, v_)
                        ms = cuda_time(lambda: attention(qq, k_, v_), dev, reps=5)
                if ref is None:
                    ref = o.float()
                row[be] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_vs_first": rel(o, ref)}
            except Exception as exc:  # noqa: BLE001
                row[be] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        out[name] = row
    return out


# --------------------------------------------------------------------------- 3. variants

def run_variant(model, k: int, inputs: dict, spec: dict, args, dev, refs: dict) -> dict:
    """One runner configuration: correctness call, timed steps, memory."""
    x, obj, geo, idx = inputs["x"], inputs["obj"], inputs["geo"], inputs["idx"]
    n = x.shape[1]
    mem = bench_dit.Mem(dev)
    mem.empty()
    mem.reset()
    budget = spec.get("budget_gb")
    old_budget = memory.GPU_BUDGET
    rec = {"name": spec["name"], "parts": k,
           "env": f"TURBOPART_DIT_KERNELS={spec.get('kernels', 'all')} "
                  f"TURBOPART_DIT_SDPA={spec.get('sdpa', 'auto')} "
                  f"TURBOPART_DIT_KV_LAYOUT={spec.get('kv_layout', 'strided')}"}
    caught = []
    try:
        if budget is not None:
            memory.set_gpu_budget(budget)
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            base = mem.allocated()
            t0 = time.perf_counter()
            runner = DiTRunner(model, obj, geo, cache_blocks=spec.get("cache", "all"),
                               cuda_graph=spec.get("graph"), compile=spec.get("compile", False),
                               compile_mode=spec.get("compile_mode"), latent_tokens=n,
                               kernels=spec.get("kernels", "all"), sdpa=spec.get("sdpa", "auto"),
                               kv_layout=spec.get("kv_layout", "strided"))
            mem.sync()
            rec["setup_s"] = time.perf_counter() - t0
            rec["kv_cache_gb"] = (mem.allocated() - base) / 1e9
            t0 = time.perf_counter()
            out = runner(x, 0.37, idx).float()
            mem.sync()
            rec["first_call_s"] = time.perf_counter() - t0
            times = bench_dit.time_steps(runner, x, idx, args.warmup, args.steps)
            caught = [str(w.message)[:300] for w in wlist]
        med = statistics.median(times)
        frac = runner.cached_blocks / model.depth
        flops = bench_dit.spec_flops(k, frac) if not args.tiny else \
            bench_dit.exact_flops(model.params, k, n, obj.shape[1], geo.shape[1], frac)
        rec.update({
            "config": runner.describe(), "fused_active": runner.opts.fused,
            "kernels_active": sorted(runner.opts.kernels), "cached_blocks": runner.cached_blocks,
            "cuda_graph": runner.use_graph, "compiled": runner.block_fns is not None,
            "step_ms_median": med, "step_ms_min": min(times),
            "step_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
            "tflop_per_step": flops / 1e12, "tflops": flops / (med / 1e3) / 1e12,
            "mfu": flops / (med / 1e3) / (args.peak * 1e12),
            "peak_mem_gb": mem.peak() / 1e9, "warnings": caught,
        })
        if spec["name"] == "baseline legacy":
            refs["baseline"] = out.cpu()
        rec["rel_vs_baseline"] = rel(out, refs["baseline"].to(out.device)) \
            if "baseline" in refs else None
        # did the requested path run (no silent fallback)?
        from turbopart.xpart.dit import StepOptions
        want_fused, want_k = StepOptions.parse_kernels(spec.get("kernels", "all"))
        if spec.get("compile"):
            want_fused, want_k = False, frozenset()
        if not nn_kernels.available(dev):
            want_k = frozenset()
        rec["fell_back"] = (runner.opts.fused != want_fused) or \
            (set(runner.opts.kernels) != set(want_k) and want_fused)
        if refs.get("exact") is not None:
            ex = refs["exact"].to(out.device)
            rec["rel_vs_exact"] = rel(out, ex)
            rec["max_abs_rel_vs_exact"] = float((out - ex).abs().max() / ex.abs().max())
        rec["output_finite"] = bool(torch.isfinite(out).all())
        runner.close()
        del runner, out
    except Exception as exc:  # noqa: BLE001
        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rec["traceback"] = traceback.format_exc()[-2000:]
        rec["warnings"] = caught
    finally:
        memory.GPU_BUDGET = old_budget
        mem.empty()
    return rec


def variant_specs(k: int, args) -> list[dict]:
    """Variants at K = ``k``; ``prio`` 1 runs for every K before any ``prio`` 2."""
    specs = [
        {"name": "baseline legacy", "kernels": "legacy", "prio": 1},
        {"name": "fused all", "kernels": "all", "prio": 1},
        {"name": "fused all sdpa=cudnn", "kernels": "all", "sdpa": "cudnn", "prio": 1},
        {"name": "fused all sdpa=flash", "kernels": "all", "sdpa": "flash", "prio": 1},
        {"name": "fused all+gelu", "kernels": "all+gelu", "prio": 1},
        {"name": "fused all cache=none", "kernels": "all", "cache": "none", "prio": 1},
        {"name": "fused all cache=auto budget=12GB", "kernels": "all", "cache": "auto",
         "budget_gb": 12e9 / 2 ** 30, "prio": 1},
        {"name": "fused torch-ops", "kernels": "none", "prio": 2},
        {"name": "fused ln", "kernels": "ln", "prio": 2},
        {"name": "fused ln,qk", "kernels": "ln,qk", "prio": 2},
        {"name": "legacy sdpa=flash", "kernels": "legacy", "sdpa": "flash", "prio": 2},
        {"name": "legacy sdpa=cudnn", "kernels": "legacy", "sdpa": "cudnn", "prio": 2},
        {"name": "fused all cache=none kv=contiguous", "kernels": "all", "cache": "none",
         "kv_layout": "contiguous", "prio": 2},
        {"name": "legacy cache=none", "kernels": "legacy", "cache": "none", "prio": 2},
        {"name": "fused all cache=6", "kernels": "all", "cache": 6, "prio": 2},
        {"name": "fused all eager (no graph)", "kernels": "all", "graph": False, "prio": 2},
    ]
    if k > 8:
        keep = {"baseline legacy", "fused all", "fused all sdpa=cudnn", "fused all sdpa=flash",
                "fused all cache=none", "fused all+gelu", "legacy sdpa=flash"}
        specs = [s for s in specs if s["name"] in keep]
    if args.compile:
        specs.append({"name": "legacy compiled", "kernels": "legacy", "compile": True,
                      "compile_mode": args.compile_mode, "prio": 2})
    if args.only:
        specs = [s for s in specs if s["name"] == "baseline legacy"
                 or any(o in s["name"] for o in args.only)]
    if args.tiny:
        for s in specs:
            if s.get("budget_gb"):
                s["budget_gb"] = None
    return specs


# --------------------------------------------------------------------------- 4. profile

CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("triton (ours)", ("_residual_ln", "_rms_heads", "_embed_ln")),
    ("gemm", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "wgmma", "matmul", "_mm")),
    ("norm", ("layer_norm", "layernorm", "rms", "norm")),
    ("copy/cat/index", ("copy", "cat", "index", "gather", "scatter", "transpose", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "gelu", "mul", "add")),
    ("reduce/sort", ("reduce", "sort", "topk", "softmax", "cumsum", "radix", "scan")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(key in low for key in keys):
            return cat
    return "other"


def profile_step(model, k: int, inputs: dict, kernels: str, dev) -> dict:
    from torch.profiler import ProfilerActivity, profile
    runner = DiTRunner(model, inputs["obj"], inputs["geo"], cache_blocks="all",
                       cuda_graph=False, kernels=kernels)
    x, idx = inputs["x"], inputs["idx"]
    runner(x, 0.3, idx)
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner(x, 0.4, idx)
        sync(dev)
    per_kernel: dict[str, list] = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if not t:
            continue
        per_kernel[e.key] = [t / 1e3, e.count]
    runner.close()
    cats: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        c = categorize(name)
        cats[c] = cats.get(c, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {"kernel_ms_total": sum(v[0] for v in per_kernel.values()),
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:140], "ms": v[0], "count": v[1]} for n, v in top]}


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="skip remaining variants after this many seconds")
    ap.add_argument("--compile", action="store_true",
                    help="add a torch.compile variant (compilation may take minutes)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only variants whose name contains one of these strings "
                         "(the baseline always runs)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact reference")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 dense TFLOP/s for MFU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --device cpu --tiny)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    info = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(__import__("triton"), "__version__", None)
            if nn_kernels.HAVE_TRITON else None,
            "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    try:
        info["sdp_priority_order"] = list(torch._C._get_sdp_priority_order())
    except Exception:  # noqa: BLE001
        pass
    print(f"# {info['gpu']} torch {info['torch']} triton {info['triton']} "
          f"cudnn {info['cudnn']}", flush=True)
    cfg, n, s = bench_dit.sizes(args)
    report: dict = {**info, "kernels": {}, "sdpa": {}, "variants": [], "profiles": {},
                    "skipped": []}
    d = 32 if args.tiny else 2048
    heads = 4 if args.tiny else 16
    dt = torch.bfloat16

    # 1. kernel checks
    try:
        report["kernels"] = kernel_checks(dev, 8 if not args.tiny else 2, d, heads, dt)
    except Exception as exc:  # noqa: BLE001
        report["kernels"] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-2000:]}
    print(f"[{elapsed():6.1f}s] kernel checks:", flush=True)
    for name, r in report["kernels"].items():
        print(f"    {name}: {json.dumps(r)[:400]}", flush=True)

    # 2. SDPA backends
    backends = ["auto", "cudnn", "flash", "efficient"] if dev.type == "cuda" else ["auto"]
    try:
        report["sdpa"] = sdpa_checks(dev, 8 if not args.tiny else 2, d, heads, dt, backends)
    except Exception as exc:  # noqa: BLE001
        report["sdpa"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"[{elapsed():6.1f}s] SDPA (ms / TFLOP/s):", flush=True)
    for name, row in report["sdpa"].items():
        if isinstance(row, dict):
            cells = "  ".join(f"{be}: " + (f"{r['ms']:.3f} ms {r['tflops']:.0f} TF/s"
                                           if "ms" in r else r.get("error", "?")[:60])
                              for be, r in row.items())
            print(f"    {name:<14} {cells}", flush=True)

    # 3. variants: the exact references first (one fp32 model), then one fast model for all K
    refs: dict[int, dict] = {k: {"exact": None} for k in args.parts}
    if not args.no_exact:
        try:
            ex = bench_dit.make_model("exact", dev, args.seed, cfg)
            for k in args.parts:
                x, obj, geo, idx = bench_dit.make_inputs(k, dev, args.seed, ex, n, s)
                t0 = time.perf_counter()
                refs[k]["exact"] = DiTRunner(ex, obj, geo, cache_blocks="none")(
                    x, 0.37, idx).float().cpu()
                print(f"[{elapsed():6.1f}s] K={k}: exact reference "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
                del x, obj, geo, idx
            del ex
        except Exception as exc:  # noqa: BLE001
            print(f"exact reference failed: {exc}", flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    model = bench_dit.make_model("fast", dev, args.seed, cfg)
    all_inputs = {}
    for k in args.parts:
        x, obj, geo, idx = bench_dit.make_inputs(k, dev, args.seed, model, n, s)
        all_inputs[k] = {"x": x, "obj": obj, "geo": geo, "idx": idx}
    for prio in (1, 2):
        for k in args.parts:
            for spec in variant_specs(k, args):
                if spec["prio"] != prio:
                    continue
                if elapsed() > args.budget_s:
                    report["skipped"].append(f"K={k} {spec['name']}")
                    continue
                r = run_variant(model, k, all_inputs[k], spec, args, dev, refs[k])
                report["variants"].append(r)
                if "error" in r:
                    print(f"[{elapsed():6.1f}s] K={k} {spec['name']}: ERROR {r['error']}",
                          flush=True)
                    continue
                rb = r["rel_vs_baseline"]
                print(f"[{elapsed():6.1f}s] K={k} {spec['name']:<36} {r['step_ms_median']:8.2f} "
                      f"ms {r['tflops']:5.0f} TF/s  MFU {100 * r['mfu']:4.1f}%  peak "
                      f"{r['peak_mem_gb']:5.1f} GB  rel/base "
                      f"{(rb if rb is not None else float('nan')):.2e}  rel/exact "
                      f"{r.get('rel_vs_exact', float('nan')):.2e}  [{r['config']}]"
                      + ("  FELL BACK" if r.get("fell_back") else "")
                      + (f"  warnings: {r['warnings']}" if r["warnings"] else ""), flush=True)
        k = min(args.parts)
        if prio == 1 and not args.no_profile and elapsed() < args.budget_s:
            for kern in ("legacy", "all"):
                try:
                    report["profiles"][f"K={k} {kern}"] = profile_step(model, k, all_inputs[k],
                                                                       kern, dev)
                except Exception as exc:  # noqa: BLE001
                    report["profiles"][f"K={k} {kern}"] = {"error": str(exc)[:300]}
            print(f"[{elapsed():6.1f}s] profiles (eager step, kernel ms by category):", flush=True)
            for key, p in report["profiles"].items():
                if "categories_ms" in p:
                    cats = ", ".join(f"{c} {v:.1f}" for c, v in p["categories_ms"].items())
                    print(f"    {key}: total {p['kernel_ms_total']:.1f} ms: {cats}", flush=True)
                    for tk in p["top_kernels"][:8]:
                        print(f"        {tk['ms']:7.2f} ms x{tk['count']:<4} {tk['name'][:100]}")
                else:
                    print(f"    {key}: {p}", flush=True)
    del model, all_inputs
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # summary
    print("\n=== DiT step variants (median ms over CUDA-graph replays; ok = error vs exact within "
          "1.2x(+2e-3) of the baseline's) ===")
    hdr = (f"{'K':>3} {'variant':<36} {'ms':>8} {'TF/s':>5} {'MFU':>6} {'peak GB':>7} "
           f"{'cached':>6} {'rel/base':>9} {'rel/exact':>9} ok")
    print(hdr)
    best: dict[int, dict] = {}
    for k in args.parts:
        rows = [r for r in report["variants"] if r["parts"] == k and "error" not in r]
        base = next((r for r in rows if r["name"] == "baseline legacy"), None)
        base_ex = base.get("rel_vs_exact") if base else None
        for r in rows:
            ex = r.get("rel_vs_exact")
            ok = (ex is None or base_ex is None or ex <= 1.2 * base_ex + 2e-3) and \
                r.get("output_finite", True) and not r.get("fell_back")
            r["ok"] = bool(ok)
            print(f"{k:>3} {r['name']:<36} {r['step_ms_median']:8.2f} {r['tflops']:5.0f} "
                  f"{100 * r['mfu']:5.1f}% {r['peak_mem_gb']:7.1f} {r['cached_blocks']:>6} "
                  f"{(r['rel_vs_baseline'] if r['rel_vs_baseline'] is not None else float('nan')):9.2e} "
                  f"{(ex if ex is not None else float('nan')):9.2e} {'yes' if ok else 'NO'}")
            full = r["cached_blocks"] == (5 if args.tiny else 21)
            if ok and full and r["cuda_graph"] == (dev.type == "cuda") and \
                    not r.get("compiled") and (k not in best or
                                               r["step_ms_median"] < best[k]["step_ms_median"]):
                best[k] = r
        for r in report["variants"]:
            if r["parts"] == k and "error" in r:
                print(f"{k:>3} {r['name']:<36} ERROR {r['error'][:100]}")
    for k, r in best.items():
        print(f"fastest ok (cache all) at K={k}: {r['name']} {r['step_ms_median']:.1f} ms "
              f"[{r['config']}]  ->  {r['env']}")
    report["best"] = {str(k): {"name": r["name"], "config": r["config"], "env": r["env"],
                               "step_ms": r["step_ms_median"]} for k, r in best.items()}
    if report["skipped"]:
        print(f"skipped (time budget): {report['skipped']}")
    print(f"total {elapsed():.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
