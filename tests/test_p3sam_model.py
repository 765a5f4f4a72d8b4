"""P3-SAM network: official layout, split (fast) formulation == official formulation, golden."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from turbopart import weights
from turbopart.p3sam import predictor as predictor_mod
from turbopart.p3sam.model import P3SAM, P3SAMConfig, build, tiny_config
from turbopart.p3sam.predictor import P3SAMPredictor

from conftest import (MANIFESTS, case_path, needs_gpu, needs_shared, needs_triton,
                      run_in_triton_interpreter)


def _tiny_model(seed: int = 0, feat_dim: int = 32, s2_dim: int = 16) -> P3SAM:
    cfg = tiny_config()
    cfg["turbopart"].update(feat_dim=feat_dim, s2_dim=s2_dim)
    torch.manual_seed(seed)
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("sonata."):
                # Larger than the default init so every term (incl. rank-3 logits) matters.
                p.normal_(0.0, 0.25 if p.dim() > 1 else 0.1)
    return model.eval()


def _inputs(n: int, k: int, feat_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, feat_dim, generator=g)
    pts = torch.rand(n, 3, generator=g) * 2 - 1
    prompts = pts[torch.randperm(n, generator=g)[:k]]
    return feats, pts, prompts


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


# ---------------------------------------------------------------------------- layout

@needs_shared
def test_layout_equals_manifest():
    manifest = json.loads((MANIFESTS / "p3sam.json").read_text())
    expected = {k: tuple(v["shape"]) for k, v in manifest["state_dict"].items()}
    got = weights.layout("p3sam")
    assert list(got) == list(expected)  # same keys, same (official) order
    assert got == expected
    assert len(got) == 513
    assert sum(torch.Size(s).numel() for s in got.values()) == 112_728_649


def test_skip_unused_drops_only_the_mask_token():
    full = weights.build("p3sam").state_dict()
    lean = weights.build("p3sam", skip_unused=True).state_dict()
    assert set(full) - set(lean) == {"sonata.embedding.mask_token"}
    assert set(lean) <= set(full)


def test_config_round_trip_and_defaults():
    assert weights.default_config("p3sam")["params"] == {"ckpt_path": "checkpoints/p3sam.ckpt"}
    cfg = P3SAMConfig.from_json(tiny_config())
    assert (cfg.feat_dim, cfg.s2_dim, cfg.sonata.out_channels) == (32, 16, 72)
    again = P3SAMConfig.from_json(cfg.to_json())
    assert again == cfg
    full = P3SAMConfig.from_json(None)
    assert (full.feat_dim, full.s2_dim, full.sonata.out_channels) == (512, 256, 1232)


def test_tiny_layout_matches_golden_weights():
    from turbopart.golden import load_case
    case = load_case(case_path("p3sam"))
    shapes = {k: tuple(v.shape) for k, v in case.prefixed("weight.").items()}
    assert weights.layout("p3sam", tiny_config()) == shapes


def test_random_tiny_checkpoint_loads_and_predicts(tmp_path):
    """`turbopart weights random --tiny` layout -> load_component -> Sonata + heads."""
    weights.write_random(tmp_path, tiny=True, components=["p3sam"], init="plain", seed=3)
    model = weights.load_component(tmp_path, "p3sam", numerics="exact")
    assert "sonata.embedding.mask_token" not in model.state_dict()  # skip_unused
    g = torch.Generator().manual_seed(0)
    pts = (torch.rand(500, 3, generator=g, dtype=torch.float64) * 2 - 1)
    nrm = torch.nn.functional.normalize(torch.randn(500, 3, generator=g, dtype=torch.float64), dim=1)
    pred = P3SAMPredictor(model, numerics="exact")
    shifted = pred.set_points(pts, nrm, generator=torch.Generator().manual_seed(1))
    # The official in-place CenterShift: x/y centred, z starting at 0.
    assert torch.allclose(shifted[:, 2].min(), torch.zeros((), dtype=shifted.dtype))
    out = pred.predict(shifted[:7])
    assert out.masks.shape == (7, 500) and out.pred_iou.shape == (7, 3)
    assert torch.isfinite(out.pred_iou).all()


# ---------------------------------------------------------------------------- split == official

@pytest.mark.parametrize("n,k,chunk,batch", [
    (257, 1, None, None),  # one prompt, everything in one piece
    (257, 5, 16, 2),  # tiny point chunks: running maxima over many chunks, ragged batches
    (300, 7, 299, 3),  # a last chunk of one point
    (50, 4, 3, 4),  # many chunks of 3 points
])
def test_split_formulation_equals_reference(n, k, chunk, batch):
    model = _tiny_model()
    feats, pts, prompts = _inputs(n, k, model.feat_dim)
    ref = model.forward_reference(feats, pts, prompts)
    pred = P3SAMPredictor(model, numerics="exact", device="cpu", kernel="torch",
                          max_point_chunk=chunk, max_prompt_batch=batch)
    pred.set_features(feats, pts)
    out = pred.predict(prompts, logits=True, return_all=True)
    if chunk:
        assert pred.last_batch["point_chunk"] == min(chunk, n)
    _close(out.stage1_logits, ref["stage1_logits"])
    _close(out.stage2_logits, ref["stage2_logits"])
    _close(out.global_feat, ref["stage2_global_feat"])
    _close(out.iou_feat, ref["iou_feat"])
    _close(out.iou_logits, ref["iou_logits"])
    _close(out.pred_iou, ref["pred_iou"])
    # The logits are not near 0 here, so the thresholded masks agree exactly.
    ref_masks = torch.stack([ref[f"mask_{h}"] for h in (1, 2, 3)], 1) > 0.5
    assert torch.equal(out.all_masks, ref_masks)
    best = torch.argmax(ref["pred_iou"], -1)
    assert torch.equal(out.best_head, best)
    assert torch.equal(out.masks, ref_masks[torch.arange(k), best])
    _close(out.iou, ref["pred_iou"][torch.arange(k), best])
    assert out.masks.dtype == torch.bool and out.masks.shape == (k, n)
    assert out.all_masks.any() and not out.all_masks.all()  # non-trivial masks


def test_two_stage2_iterations_equal_reference():
    model = _tiny_model(seed=2)
    feats, pts, prompts = _inputs(120, 3, model.feat_dim, seed=4)
    ref = model.forward_reference(feats, pts, prompts, iter=2)
    pred = P3SAMPredictor(model, numerics="exact", device="cpu", max_point_chunk=41)
    pred.set_features(feats, pts)
    out = pred.predict(prompts, logits=True, iters=2)
    for ours, name in ((out.stage1_logits, "stage1_logits"), (out.stage2_logits, "stage2_logits"),
                       (out.global_feat, "stage2_global_feat"), (out.iou_feat, "iou_feat"),
                       (out.pred_iou, "pred_iou")):
        _close(ours, ref[name])
    with pytest.raises(ValueError):
        pred.predict(prompts, iters=0)


def test_other_head_widths():
    model = _tiny_model(seed=3, feat_dim=24, s2_dim=40)
    feats, pts, prompts = _inputs(150, 3, 24, seed=5)
    ref = model.forward_reference(feats, pts, prompts)
    pred = P3SAMPredictor(model, numerics="fast", device="cpu", max_point_chunk=50)
    pred.set_features(feats, pts)
    out = pred.predict(prompts, logits=True)
    _close(out.stage2_logits, ref["stage2_logits"])
    _close(out.pred_iou, ref["pred_iou"])


def test_best_head_ties_take_the_first_and_masks_are_strict():
    model = _tiny_model()
    with torch.no_grad():  # equal predicted IoUs for the three masks
        model.iou_mlp_out[4].weight.zero_()
        model.iou_mlp_out[4].bias.fill_(0.3)
        # Stage-2 head 1 outputs exactly 0 everywhere: sigmoid(0) = 0.5 is not > 0.5.
        model.seg_s2_mlp_1[4].weight.zero_()
        model.seg_s2_mlp_1[4].bias.zero_()
    feats, pts, prompts = _inputs(100, 3, model.feat_dim)
    pred = P3SAMPredictor(model, numerics="exact", device="cpu")
    pred.set_features(feats, pts)
    out = pred.predict(prompts, return_all=True)
    assert torch.equal(out.best_head, torch.zeros(3, dtype=torch.long))
    assert not out.masks.any() and not out.all_masks[:, 0].any()
    assert torch.allclose(out.iou, torch.sigmoid(torch.tensor(0.3)))


def test_sizes_follow_the_memory_budget(monkeypatch):
    model = _tiny_model()
    feats, pts, prompts = _inputs(400, 6, model.feat_dim)
    pred = P3SAMPredictor(model, numerics="exact", device="cpu")
    pred.set_features(feats, pts)
    big = pred.predict(prompts, logits=True)
    assert pred.last_batch["prompt_batch"] == 6 and pred.last_batch["point_chunk"] == 400
    # A tiny budget gives small chunks and batches, the same numbers.
    monkeypatch.setattr("turbopart.runtime.memory.CPU_BUDGET", 60_000)
    monkeypatch.setattr("turbopart.runtime.memory.MIN_BUDGET", 1, raising=False)
    small = pred.predict(prompts, logits=True)
    assert pred.last_batch["point_chunk"] < 400 or pred.last_batch["prompt_batch"] < 6
    _close(small.stage2_logits, big.stage2_logits, 1e-6)
    assert torch.equal(small.masks, big.masks)


def test_out_of_memory_degrades_to_smaller_batches(monkeypatch):
    model = _tiny_model()
    feats, pts, prompts = _inputs(120, 8, model.feat_dim)
    pred = P3SAMPredictor(model, numerics="exact", device="cpu")
    pred.set_features(feats, pts)
    ref = pred.predict(prompts)
    real = P3SAMPredictor._predict_batched

    def flaky(self, q, kb, chunk, *a):
        if kb > 2 or chunk > 50:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, q, kb, chunk, *a)

    monkeypatch.setattr(P3SAMPredictor, "_predict_batched", flaky)
    out = pred.predict(prompts)
    assert pred.last_batch["prompt_batch"] <= 2 and pred.last_batch["point_chunk"] <= 50
    assert torch.equal(out.masks, ref.masks) and torch.allclose(out.pred_iou, ref.pred_iou)


def test_failing_fused_kernel_falls_back_to_torch(monkeypatch):
    model = _tiny_model()
    feats, pts, prompts = _inputs(90, 3, model.feat_dim)
    pred = P3SAMPredictor(model, numerics="fast", device="cpu")
    pred.set_features(feats, pts)
    ref = pred.predict(prompts)

    def broken(*a, **k):
        raise RuntimeError("PTX compile error (simulated)")

    monkeypatch.setattr(predictor_mod._TritonPairs, "logits", broken)
    pred.kernel_name = "triton"  # as chosen by kernel="auto" on a CUDA machine
    with pytest.warns(RuntimeWarning, match="Triton kernel unavailable"):
        out = pred.predict(prompts)
    assert pred.kernel_name == "torch" and torch.equal(out.masks, ref.masks)


# ---------------------------------------------------------------------------- golden

def test_golden_p3sam():
    from turbopart.golden import compare, load_case
    from turbopart.golden.p3sam import run
    case = load_case(case_path("p3sam"))
    checks = compare(case, run(case))
    bad = [(c.name, c.max_abs, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert {c.name for c in checks} >= {"stage1_logits", "stage2_logits", "pred_iou", "feats"}


def test_golden_heads_from_recorded_features():
    """The heads alone, fed with the case's own features (independent of Sonata)."""
    from turbopart.golden import compare_tensor, load_case
    from turbopart.golden.p3sam import build_from_case
    case = load_case(case_path("p3sam"))
    model = build_from_case(case)
    out = case.outputs
    pts = out["points_after_get_feat"]
    pred = P3SAMPredictor(model, numerics="exact", device="cpu", max_point_chunk=700,
                          max_prompt_batch=4)
    pred.set_features(out["feats"], pts)
    res = pred.predict(pts[case.rng("prompt_fps_index")], logits=True)
    got = {"stage1_logits": res.stage1_logits, "stage2_logits": res.stage2_logits,
           "stage2_global_feat": res.global_feat, "iou_feat": res.iou_feat,
           "iou_logits": res.iou_logits, "pred_iou": res.pred_iou}
    for name, t in got.items():
        c = compare_tensor(name, t, out[name])
        assert c.ok, (name, c.max_abs, c.detail)
    assert torch.equal(res.best_head, out["pred_iou"].argmax(-1))


# ---------------------------------------------------------------------------- triton kernel

_INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from turbopart.p3sam.predictor import (SplitHeads, point_terms, evaluate_prompts,
                                           _TorchPairs, _TritonPairs)
    import tests.test_p3sam_model as t
    model = t._tiny_model()
    feats, pts, prompts = t._inputs(37, 3, model.feat_dim)   # 37: a ragged last tile
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        heads = SplitHeads.from_model(model, compute_dtype=dt)
        terms = point_terms(heads, feats, pts)
        a = evaluate_prompts(heads, terms, prompts, _TorchPairs(1000))
        b = evaluate_prompts(heads, terms, prompts, _TritonPairs(tune=False))
        for name in ("stage1_logits", "stage2_logits", "global_feat", "iou_feat", "iou_logits"):
            x, y = getattr(a, name), getattr(b, name)
            err = (x - y).abs().max().item() / max(1.0, x.abs().max().item())
            assert err < tol, (dt, name, err)
    print("ok")
""")


@needs_triton
def test_triton_kernel_logic_in_interpreter():
    """The fused kernel's tiling, masking, rank-3 terms and atomic max, on the CPU."""
    run_in_triton_interpreter(_INTERPRET_SCRIPT, timeout=600)


@needs_gpu
@pytest.mark.skipif(not predictor_mod.triton_available("cuda"), reason="needs triton")
@pytest.mark.parametrize("approx", [False, True])
def test_triton_fast_agrees_with_exact_on_gpu(approx):
    model = _tiny_model(feat_dim=64, s2_dim=32).cuda()
    feats, pts, prompts = _inputs(5000, 9, 64)
    exact = P3SAMPredictor(model, numerics="exact")
    exact.set_features(feats.cuda(), pts.cuda())
    ref = exact.predict(prompts.cuda(), logits=True, return_all=True)
    fast = P3SAMPredictor(model, numerics="fast", kernel="triton", approx_gelu=approx)
    fast.set_features(feats.cuda(), pts.cuda())
    out = fast.predict(prompts.cuda(), logits=True, return_all=True)
    scale = ref.stage2_logits.abs().max().item()
    assert (out.stage2_logits - ref.stage2_logits).abs().max().item() < 0.05 * scale
    assert (out.all_masks == ref.all_masks).float().mean().item() > 0.99
    assert (out.pred_iou - ref.pred_iou).abs().max().item() < 0.02


# ---------------------------------------------------------------------------- half kernel

_HALF_INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from turbopart.p3sam import predictor as P
    import tests.test_p3sam_model as t
    model = t._tiny_model()
    feats, pts, prompts = t._inputs(37, 3, model.feat_dim)   # 37: a ragged last tile
    ref_heads = P.SplitHeads.from_model(model, compute_dtype=torch.float32)
    a = P.evaluate_prompts(ref_heads, P.point_terms(ref_heads, feats, pts), prompts,
                           P._TorchPairs(1000))
    heads = P.SplitHeads.from_model(model, compute_dtype=torch.bfloat16)
    terms = P.point_terms(heads, feats, pts, dtype=torch.float16)
    for cfgs in (P.HALF_INTERPRET_CONFIGS, P.HALF_INTERPRET_CONFIGS[::-1]):  # TC / CUDA-core
        P.HALF_INTERPRET_CONFIGS = cfgs
        P._HalfPairs._half_tuned.clear()
        k = P._HalfPairs(tune=False, dtype=torch.float16)
        b = P.evaluate_prompts(heads, terms, prompts, k)
        assert k.fallbacks == 0 and P._HalfPairs._broken is None
        for name in ("stage1_logits", "stage2_logits", "global_feat", "iou_feat", "iou_logits"):
            x, y = getattr(a, name), getattr(b, name)
            err = (x - y).abs().max().item() / max(1.0, x.abs().max().item())
            assert err < 1e-2, (cfgs[0], name, err)   # bf16 weights + fp16 activations
    print("ok")
""")


@needs_triton
def test_half_kernel_logic_in_interpreter():
    """The packed 16-bit kernel (fp16): tiling, both logit layers, rank-3 terms, max heads."""
    run_in_triton_interpreter(_HALF_INTERPRET_SCRIPT, timeout=600)


def test_heads_variant_option(monkeypatch):
    model = _tiny_model()
    with pytest.raises(ValueError, match="heads must be one of"):
        P3SAMPredictor(model, numerics="fast", device="cpu", heads="fp8")
    monkeypatch.setenv("TURBOPART_P3SAM_HEADS", "nonsense")
    with pytest.warns(RuntimeWarning, match="TURBOPART_P3SAM_HEADS"):
        assert predictor_mod.heads_variant_default() == predictor_mod.DEFAULT_HEADS_VARIANT
    monkeypatch.setenv("TURBOPART_P3SAM_HEADS", "f16")
    pred = P3SAMPredictor(model, numerics="fast", device="cpu")  # CPU: torch kernel
    assert pred.heads_variant == "f16" and pred.kernel_name == "torch"
    assert pred.point_dtype == torch.float32  # the half kernel is never used here
    exact = P3SAMPredictor(model, numerics="exact", device="cpu", kernel="torch")
    assert not exact._half


def _torch_impl(monkeypatch):
    """Let the bf16 Triton kernel class run as the PyTorch kernel (CPU tests)."""
    monkeypatch.setattr(predictor_mod._TritonPairs, "logits",
                        lambda self, *a: predictor_mod._TorchPairs(10 ** 9).logits(*a))
    monkeypatch.setattr(predictor_mod._TritonPairs, "max",
                        lambda self, *a: predictor_mod._TorchPairs(10 ** 9).max(*a))


def test_half_kernel_failure_falls_back_to_bf16_kernel(monkeypatch):
    P = predictor_mod
    _torch_impl(monkeypatch)
    monkeypatch.setattr(P._HalfPairs, "_broken", None)

    def broken(self, *a, **k):
        raise RuntimeError("PTX assembly aborted (simulated)")

    monkeypatch.setattr(P._HalfPairs, "_run_half", broken)
    model = _tiny_model()
    feats, pts, prompts = _inputs(40, 3, model.feat_dim)
    heads = P.SplitHeads.from_model(model, compute_dtype=torch.bfloat16)
    terms = P.point_terms(heads, feats, pts, dtype=torch.float16)
    ref = P.evaluate_prompts(heads, terms, prompts, P._TorchPairs(10 ** 9))
    k = P._HalfPairs(tune=False, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="half kernel unavailable"):
        out = P.evaluate_prompts(heads, terms, prompts, k)
    assert P._HalfPairs._broken and k.fallbacks == 4  # stage 1, global, stage 2, IoU
    for name in ("stage1_logits", "stage2_logits", "global_feat", "iou_feat", "iou_logits"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_half_kernel_range_check():
    P = predictor_mod
    model = _tiny_model()
    heads = P.SplitHeads.from_model(model, compute_dtype=torch.bfloat16)
    u = torch.randn(50, 3 * heads.s2_dim)
    v = torch.randn(4, 3 * heads.s2_dim)
    r = torch.randn(4, 3, 50)
    k16 = P._HalfPairs(tune=False, dtype=torch.float16)
    wts = k16._weights(heads.stage2, False)
    assert k16._in_range(u, v, r, heads.stage2_wl, wts)
    assert not k16._in_range(u * 1e5, v, r, heads.stage2_wl, wts)
    assert not k16._in_range(u, v, r * 1e5, heads.stage2_wl, wts)
    kb = P._HalfPairs(tune=False, dtype=torch.bfloat16)
    assert kb._in_range(u * 1e5, v, r, heads.stage2_wl, kb._weights(heads.stage2, False))
    # fp16 per-point terms that would overflow are refused by the predictor check
    assert P._half_terms_ok(u.half()) and not P._half_terms_ok(torch.full((3, 3), 3e4).half())
    # the padded tensor-core output layer puts w3_h / 2 in column h
    w3 = wts["w3_tc"].float().reshape(3, heads.s2_dim, 16)
    for h in range(3):
        assert torch.allclose(w3[h, :, h], (heads.stage2.w3[h] * 0.5).half().float())
        assert not w3[h, :, [c for c in range(16) if c != h]].any()


@needs_gpu
@pytest.mark.skipif(not predictor_mod.triton_available("cuda"), reason="needs triton")
@pytest.mark.parametrize("heads", ["f16", "bf16x2"])
def test_half_kernel_agrees_with_exact_on_gpu(heads):
    model = _tiny_model(feat_dim=64, s2_dim=32).cuda()
    feats, pts, prompts = _inputs(5000, 9, 64)
    exact = P3SAMPredictor(model, numerics="exact")
    exact.set_features(feats.cuda(), pts.cuda())
    ref = exact.predict(prompts.cuda(), logits=True, return_all=True)
    predictor_mod._HalfPairs._broken = None
    fast = P3SAMPredictor(model, numerics="fast", kernel="triton", heads=heads)
    fast.set_features(feats.cuda(), pts.cuda())
    out = fast.predict(prompts.cuda(), logits=True, return_all=True)
    assert predictor_mod._HalfPairs._broken is None and fast.last_batch.get("heads") == heads
    scale = ref.stage2_logits.abs().max().item()
    assert (out.stage2_logits - ref.stage2_logits).abs().max().item() < 0.05 * scale
    assert (out.all_masks == ref.all_masks).float().mean().item() > 0.99
    assert (out.pred_iou - ref.pred_iou).abs().max().item() < 0.02
