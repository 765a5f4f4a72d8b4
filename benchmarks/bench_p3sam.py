"""Benchmark: the P3-SAM network on 100k surface points and 400 FPS prompts (full size).

Setup as the automatic path (spec p3sam §2.3-2.4, §5.2 steps 3-7): 100k points sampled with
trimesh (seed 42) from a mesh, normalised (``normalize_pc``), Sonata features (+ the 1232→512
``mlp``), 400 prompts by farthest-point sampling (ties → last index) on the shifted points,
then the two-stage heads for all 400 prompts.  Full-size random weights: the baseline's plain
init (matrices N(0, 0.02²), biases 0, norms 1/0), or ``--weights DIR`` (a directory written by
``turbopart weights random`` or the real checkpoint).

Timed separately (warm: after ``--warmup`` runs, median of ``--repeats``, CUDA events):
``sonata``: ``point_features`` (transform, encoder, multi-scale assembly, mlp, gather);
``point_terms``: the per-point first-layer GEMM; ``heads``: ``predict`` of all prompts
(incl. best-mask selection).  Per numerics: peak GPU memory of one full run, the chosen
prompt batch / point chunk, the Triton tile choice and a per-kernel breakdown (fast).

``--variants`` also times the fast-mode options (erf GELU instead of the tanh form, fp32
per-point terms, the plain-PyTorch bf16 kernel, the packed 16-bit kernels ``heads=f16`` /
``heads=bf16x2``; see also ``heads_variants.py``).  ``--agreement`` measures fast vs exact on
the same (exact) features with a *scaled* random init (weights N(0, clip(1/sqrt(fan_in),
0.02, 0.2)²), biases 0.05·N, norm weights 1 + 0.1·N: the golden cases' recipe, which gives
non-degenerate activations, unlike the 0.02 init whose logits are all ≈ 0), with the mask
heads' output biases shifted so that masks cover about half of the points.

    source benchmarks/device_prelude.sh
    python benchmarks/bench_p3sam.py [mesh.glb] [--numerics exact fast] [--variants]
        [--agreement] [--profile] [--out benchmarks/results/p3sam_h100.json]

Targets on an H100 (fast): Sonata + features ≤ 150 ms, 400 prompts through the heads
≤ 300 ms, peak ≤ 3 GB.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbopart import weights as W  # noqa: E402
from turbopart.geometry.fps import farthest_point_sampling  # noqa: E402
from turbopart.p3sam import predictor as P  # noqa: E402
from turbopart.p3sam.model import build, init_random_  # noqa: E402
from turbopart.runtime.precision import param_dtypes  # noqa: E402
from turbopart.sonata.features import point_features  # noqa: E402


def default_mesh() -> Path:
    shared = os.environ.get("TURBOPART_SHARED")
    for root in ([Path(shared)] if shared else []) + [REPO.parent / "shared", REPO / ".shared"]:
        p = root / "meshes" / "ai_mech_robot.glb"
        if p.exists():
            return p
    return REPO.parent / "shared" / "meshes" / "ai_mech_robot.glb"


def init_scaled_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The golden cases' weight recipe (non-degenerate activations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            is_norm = isinstance(m, torch.nn.LayerNorm) or type(m).__name__ == "LayerNorm"
            for pname, p in m.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g)
                if is_norm:
                    p.copy_(1 + 0.1 * r if pname == "weight" else 0.05 * r)
                elif pname == "bias" or p.dim() < 2:
                    p.copy_(0.05 * r)
                else:
                    fan_in = p.numel() // p.shape[0]
                    p.copy_(r * min(max(fan_in ** -0.5, 0.02), 0.2))
    return model


def build_model(numerics: str, device: torch.device, *, init: str = "plain", seed: int = 0,
                weights_dir: str | None = None) -> torch.nn.Module:
    if weights_dir:
        return W.load_component(weights_dir, "p3sam", device=device, numerics=numerics)
    with torch.device("meta"):
        model = build(None, skip_unused=True)
    model = model.to_empty(device="cpu")
    if init == "plain":
        init_random_(model, std=0.02, generator=torch.Generator().manual_seed(seed))
    else:
        init_scaled_(model, seed)
    return cast_model(model, numerics, device)


def cast_model(model: torch.nn.Module, numerics: str, device: torch.device) -> torch.nn.Module:
    dt = param_dtypes(model, numerics, device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(device=device, dtype=dt[name])
    return W.finish_module(model, device)




def timed(fn, device, repeats: int, warmup: int):
    """(median seconds, seconds of every repeat, last output)."""
    times, out = profiling.timed(fn, device, repeats, warmup)
    return statistics.median(times), times, out


def kernel_breakdown(pred: P.P3SAMPredictor, prompts: torch.Tensor, device, repeats: int
                     ) -> dict[str, float]:
    """Median time of each step of ``evaluate_prompts`` for one batch of all prompts."""
    heads, terms = pred.heads, pred.terms
    kernel = pred._kernel(pred.last_batch.get("point_chunk", terms.n))
    k, n, s = prompts.shape[0], terms.n, heads.s2_dim
    gr = heads.groups
    q = prompts.float()
    res: dict[str, float] = {}

    def step(name, fn):
        med, _, _ = timed(fn, device, repeats, 1)
        res[name] = med

    v = P.prompt_terms(heads, q)
    l1 = torch.empty(k, 3, n, device=device)
    step("stage1 (3 x seg_mlp)", lambda: kernel.logits(
        terms.group(heads, "stage1"), v[:, gr["stage1"][0]:gr["stage1"][1]], None, None,
        heads.stage1, l1))
    gmax = torch.full((k, s), float("-inf"), device=device)
    step("stage2 global (seg_s2_mlp_g, max)", lambda: kernel.max(
        terms.group(heads, "glob"), v[:, gr["glob"][0]:gr["glob"][1]], l1, heads.glob_wl,
        heads.glob, gmax))
    g = gmax + heads.glob.b3
    vg = v[:, gr["stage2"][0]:] + g @ heads.prompt_wg.t()
    l2 = torch.empty(k, 3, n, device=device)
    step("stage2 (3 x seg_s2_mlp)", lambda: kernel.logits(
        terms.group(heads, "stage2"), vg[:, :3 * s], l1, heads.stage2_wl, heads.stage2, l2))
    imax = torch.full((k, s), float("-inf"), device=device)
    step("iou (iou_mlp, max)", lambda: kernel.max(
        terms.group(heads, "iou"), vg[:, 3 * s:], l2, heads.iou_wl, heads.iou, imax))
    return res


@torch.no_grad()
def calibrate_(model, pred: P.P3SAMPredictor, prompts: torch.Tensor) -> P.P3SAMPredictor:
    """Shift the output biases of the mask heads so that random-weight masks cover about half
    of the points (a near-constant mask says nothing about borderline agreement)."""
    terms = pred.terms
    for heads, key in ((model.seg_heads, "stage1_logits"), (model.seg_s2_heads, "stage2_logits")):
        fresh = P.P3SAMPredictor(model, numerics=pred.numerics.value)
        fresh.set_features(terms.feats, terms.points)
        lg = getattr(fresh.predict(prompts, logits=True), key)  # [K, N, 3]
        med = lg.reshape(-1, 3).median(dim=0).values
        for h, m in zip(heads, med):
            h[4].bias -= m.to(h[4].bias.dtype)
    fresh = P.P3SAMPredictor(model, numerics=pred.numerics.value)
    fresh.set_features(terms.feats, terms.points)
    return fresh


def agreement(ref: P.PromptPredictions, out: P.PromptPredictions) -> dict[str, float]:
    return {
        "best_mask_point_agreement": (out.masks == ref.masks).float().mean().item(),
        "all_masks_point_agreement": (out.all_masks == ref.all_masks).float().mean().item(),
        "best_head_agreement": (out.best_head == ref.best_head).float().mean().item(),
        "pred_iou_max_abs_diff": (out.pred_iou - ref.pred_iou).abs().max().item(),
        "stage2_logit_max_abs_diff": (out.stage2_logits - ref.stage2_logits).abs().max().item(),
        "stage2_logit_ref_max_abs": ref.stage2_logits.abs().max().item(),
        "ref_mask_fill": ref.masks.float().mean().item(),
    }


from turbopart.runtime.profiling import git_commit  # noqa: E402
from turbopart.runtime import profiling  # noqa: E402
from bench_sonata import sample_points  # noqa: E402
from turbopart.runtime.profiling import sync  # noqa: E402



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mesh", nargs="?", default=str(default_mesh()))
    ap.add_argument("--weights", default=None, help="checkpoint dir (default: random init)")
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--numerics", nargs="+", default=["exact", "fast"])
    ap.add_argument("--variants", action="store_true", help="time the fast-mode options")
    ap.add_argument("--agreement", action="store_true", help="fast vs exact mask agreement")
    ap.add_argument("--profile", action="store_true", help="kernel profile of one fast predict")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write a JSON report here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    pts_np, nrm_np = sample_points(Path(args.mesh), args.points)
    pts = torch.from_numpy(pts_np).to(device)
    nrm = torch.from_numpy(nrm_np).to(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    report = {
        "benchmark": "p3sam network (sonata + heads)", "mesh": Path(args.mesh).name,
        "points": args.points, "prompts": args.prompts, "device": gpu,
        "torch": torch.__version__, "triton": triton_version, "commit": git_commit(),
        "weights": args.weights or "random plain N(0,0.02^2)", "repeats": args.repeats,
        "warmup": args.warmup, "results": {},
    }
    print(f"P3-SAM on {gpu}, torch {torch.__version__}, triton {triton_version}, "
          f"{args.points} points of {Path(args.mesh).name}, {args.prompts} prompts")

    prompts = None
    exact_pred = None
    for numerics in args.numerics:
        model = build_model(numerics, device, weights_dir=args.weights)
        pred = P.P3SAMPredictor(model, numerics=numerics)
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        t_sonata, _, feats = timed(lambda: point_features(
            model.sonata, pts, nrm, head=model.mlp, numerics=numerics, generator=gen()),
            device, args.repeats, args.warmup)
        shifted = feats.shifted_points
        if prompts is None:
            start = int(np.random.default_rng(42).integers(args.points))
            idx = farthest_point_sampling(shifted.float(), args.prompts, start, ties="last")
            prompts = shifted[idx].float()
        t_terms, _, _ = timed(lambda: pred.set_features(feats.point_feat, shifted), device,
                              args.repeats, args.warmup)
        t_heads, heads_times, out = timed(lambda: pred.predict(prompts), device,
                                          args.repeats, args.warmup)
        batch = dict(pred.last_batch)
        peak = None
        if device.type == "cuda":
            del out
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            pred.set_points(pts, nrm, generator=gen())
            out = pred.predict(prompts)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            base = base / 2**30
        res = {
            "sonata_s": t_sonata, "point_terms_s": t_terms, "heads_s": t_heads,
            "heads_times_s": heads_times, "total_s": t_sonata + t_terms + t_heads,
            "peak_gpu_gb": peak, "allocated_before_gb": None if peak is None else base,
            "batch": batch, "voxels": int(feats.voxel_feat.shape[0]),
            "mask_fill": out.masks.float().mean().item(),
        }
        if batch.get("kernel") == "triton":
            res["triton_configs"] = {str(k): str(v) for k, v in P._TritonPairs._tuned.items()}
            res["triton_tuning_s"] = {str(k): v for k, v in P._TritonPairs.tune_report.items()}
        if numerics == "fast" or args.profile:
            res["kernels_s"] = kernel_breakdown(pred, prompts, device, args.repeats)
        report["results"][numerics] = res
        print(f"\n[{numerics}] sonata+mlp {t_sonata * 1e3:8.1f} ms   point terms "
              f"{t_terms * 1e3:6.1f} ms   heads ({args.prompts} prompts) {t_heads * 1e3:8.1f} ms"
              f"   peak {'-' if peak is None else f'{peak:.2f} GB'}")
        print(f"    batch {batch}, stage-0 voxels {res['voxels']}, mask fill "
              f"{res['mask_fill']:.3f}")
        for name, t in res.get("kernels_s", {}).items():
            print(f"    {name:<36} {t * 1e3:8.1f} ms")
        if res.get("triton_configs"):
            for k, v in res["triton_configs"].items():
                print(f"    tile {k}: {v}")

        if numerics == "fast" and args.variants and device.type == "cuda":
            variants = {"erf GELU": dict(approx_gelu=False),
                        "fp32 point terms": dict(fp32_point_terms=True),
                        "plain torch bf16": dict(kernel="torch"),
                        "packed f16 (heads=f16)": dict(heads="f16"),
                        "packed bf16 (heads=bf16x2)": dict(heads="bf16x2")}
            res["variants_s"] = {}
            for vname, kw in variants.items():
                try:
                    vp = P.P3SAMPredictor(model, numerics="fast", **kw)
                    vp.set_features(feats.point_feat, shifted)
                    t, _, _ = timed(lambda: vp.predict(prompts), device,
                                    max(2, args.repeats // 2), 1)
                    res["variants_s"][vname] = t
                    print(f"    variant {vname:<22} heads {t * 1e3:8.1f} ms  {vp.last_batch}")
                    del vp
                except Exception as exc:  # report and continue
                    res["variants_s"][vname] = f"{type(exc).__name__}: {exc}"
                    print(f"    variant {vname}: failed: {exc}")
        if args.profile and numerics == "fast" and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                pred.predict(prompts)
                sync(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
        del model, pred, feats, out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.agreement:
        # Same weights (scaled init) and the same exact features for every variant.
        model = build_model("exact", device, init="scaled", seed=1)
        exact_pred = P.P3SAMPredictor(model, numerics="exact")
        shifted = exact_pred.set_points(pts, nrm, generator=torch.Generator().manual_seed(0))
        if prompts is None:
            start = int(np.random.default_rng(42).integers(args.points))
            prompts = shifted[farthest_point_sampling(shifted.float(), args.prompts, start,
                                                      ties="last")].float()
        feats_exact = exact_pred.terms.feats
        exact_pred = calibrate_(model, exact_pred, prompts[: max(8, args.prompts // 8)])
        ref = exact_pred.predict(prompts, return_all=True, logits=True)
        fast_model = cast_model(copy.deepcopy(model), "fast", device)
        agree = {}
        kinds = {"fast (default)": {}, "fast erf GELU": dict(approx_gelu=False),
                 "fast fp32 point terms": dict(fp32_point_terms=True),
                 "fast plain torch": dict(kernel="torch"),
                 "fast packed f16": dict(heads="f16"),
                 "fast packed bf16x2": dict(heads="bf16x2")} if device.type == "cuda" \
            else {"fast (cpu fp32)": {}}
        print("\nagreement with exact (scaled init, same exact features):")
        for name, kw in kinds.items():
            try:
                fp = P.P3SAMPredictor(fast_model, numerics="fast", **kw)
                fp.set_features(feats_exact, shifted)
                a = agreement(ref, fp.predict(prompts, return_all=True, logits=True))
            except Exception as exc:
                a = {"error": f"{type(exc).__name__}: {exc}"}
            agree[name] = a
            print(f"    {name:<24} " + "  ".join(
                f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}" for k, v in a.items()))
        report["agreement"] = agree

    fast = report["results"].get("fast")
    if fast:
        print(f"\ntargets (fast): sonata+features {fast['sonata_s'] * 1e3:.1f} ms (<= 150), "
              f"heads {(fast['point_terms_s'] + fast['heads_s']) * 1e3:.1f} ms (<= 300), "
              f"peak {fast['peak_gpu_gb'] if fast['peak_gpu_gb'] is None else round(fast['peak_gpu_gb'], 2)} GB (<= 3)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
