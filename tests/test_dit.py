"""X-Part DiT: layout, golden parity, fused/grouped == reference, K/V cache, fidelity."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import MANIFESTS, case_path, needs_gpu
from turbopart import weights
from turbopart.golden import compare, load_case
from turbopart.nn import moe as moe_mod
from turbopart.nn.norms import rms_norm
from turbopart.xpart import dit as dit_mod
from turbopart.xpart.dit_runner import DiTRunner, denoise, part_indices, plan_cache_blocks

#: Measured on this configuration: 1.1e-2 (Frobenius norm of the difference over the norm
#: of the fp32 output).  Stated bound for bf16 ``fast`` against fp32 ``exact`` (the GPU test
#: at full size measures 2.2e-2 on an H100 with torch 2.11; BENCHMARKS.md: 2.0–2.6e-2).
FIDELITY_BOUND_CPU = 2.5e-2


# --------------------------------------------------------------------------- helpers

def tiny(**over) -> dict:
    cfg = dit_mod.tiny_config()
    cfg["params"].update(over)
    return cfg


def random_model(cfg: dict, seed: int = 0, scale: float = 0.2) -> dit_mod.PartFormerDiT:
    """A model with random weights of the golden recipe's flavour (every path contributes)."""
    with torch.device("meta"):
        m = dit_mod.build(cfg)
    g = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, mod in m.named_modules()
             if isinstance(mod, (nn.LayerNorm, nn.RMSNorm))}
    sd = {}
    for k, v in m.state_dict().items():
        if k in norms:
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bias"):
            t = 0.05 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v.shape[-1] if v.dim() > 1 else 1
            s = min(max(fan_in ** -0.5, 0.02), scale)
            t = s * torch.randn(v.shape, generator=g)
        sd[k] = t
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval()


def inputs(model: dit_mod.PartFormerDiT, k: int, n: int, s1: int, s2: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    x = torch.randn(k, n, p["in_channels"], generator=g)
    t = torch.full((k,), 0.37)
    ctx = {"obj_cond": torch.randn(k, s1, p["encoder_hidden_dim"], generator=g),
           "geo_cond": torch.randn(k, s2, p["encoder_hidden2_dim"], generator=g)}
    idx = torch.randperm(p["valid_num"], generator=g)[:k]
    return x, t, ctx, idx


def to_bf16_linears(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(mod.weight.detach().bfloat16(), requires_grad=False)
            if mod.bias is not None:
                mod.bias = nn.Parameter(mod.bias.detach().bfloat16(), requires_grad=False)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --------------------------------------------------------------------------- layout

def test_layout_matches_manifest():
    if MANIFESTS is None:
        pytest.skip("needs ../shared")
    man = json.load(open(MANIFESTS / "model.json"))["state_dict"]
    lay = weights.layout("model")
    assert len(lay) == 942
    assert lay == {k: tuple(v["shape"]) for k, v in man.items()}
    assert list(lay) == list(man)  # official order too


def test_layout_tiny_matches_golden_weights():
    case = load_case(case_path("dit"))
    lay = weights.layout("model", dit_mod.tiny_config())
    assert lay == {k: tuple(v.shape) for k, v in case.prefixed("weight.").items()}


def test_layout_options():
    base = set(weights.layout("model", tiny()))
    with_g = weights.layout("model", tiny(guidance_cond_proj_dim=16))
    assert set(with_g) - base == {"t_embedder.cond_proj.weight"}
    with torch.device("meta"):
        skipped = dit_mod.build(tiny(guidance_cond_proj_dim=16), skip_unused=True)
    assert set(skipped.state_dict()) == base
    dca = set(weights.layout("model", tiny(with_decoupled_ca=True)))
    assert {k for k in dca - base} == {f"blocks.{i}.attn2_2.{n}" for i in range(5)
                                       for n in ("kv_proj_dca.weight", "k_norm_dca.weight")}
    with pytest.raises(ValueError):
        dit_mod.build(tiny(use_bbox_cond=True))


# --------------------------------------------------------------------------- golden

def test_golden_dit():
    from turbopart.golden import dit as runner
    case = load_case(case_path("dit"))
    out = runner.run(case)
    checks = compare(case, out)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    worst = max(c.max_abs for c in checks)
    assert worst < 1e-5


def test_golden_sampling_loop_exact_and_fast():
    """The official denoising loop (5 steps) on the sampling case's recorded condition."""
    from turbopart.golden.dit import build_loaded
    case = load_case(case_path("sampling"))
    k = case.rng("init_latents").shape[0]
    n = len([key for key in case.tensors if key.endswith(".part_embed_randperm")])
    idx = torch.stack([case.rng(f"step{i}.part_embed_randperm")[:k] for i in range(n)])
    cond = {"obj_cond": case.tensors["output.cond.obj_cond"],
            "geo_cond": case.tensors["output.cond.geo_cond"]}
    for mode in ("exact", "fast"):
        model = build_loaded(case, "weight.model.", case.config["model"]).prepare(mode)
        seen = {}
        out = denoise(model, case.rng("init_latents"), cond, num_inference_steps=n,
                      part_index=idx, callback=lambda i, t, x, v: seen.update({i: (x, v)}))
        for i in range(n):
            x, v = seen[i]
            ref_x = case.tensors[f"output.step{i}.latents_after"]
            assert (x - ref_x).abs().max() < 1e-4
            if v is not None:
                assert (v - case.tensors[f"output.step{i}.model_output"]).abs().max() < 1e-4
        assert (seen[n - 1][1] is None) == (mode == "fast")  # fast skips the dt = 0 step
        assert (out - case.tensors["output.final_latents"]).abs().max() < 1e-4


# --------------------------------------------------------------------------- formulations

@pytest.mark.parametrize("over", [
    {},
    {"depth": 6, "num_heads": 2, "num_experts": 3, "moe_top_k": 3, "num_moe_layers": 3,
     "qkv_bias": True},
    {"depth": 4, "moe_top_k": 1, "qk_norm_type": "layer", "norm_type": "rms",
     "with_decoupled_ca": True, "decoupled_ca_dim": 5, "decoupled_ca_weight": 0.5,
     "use_pos_emb": True, "input_size": 12},
    {"depth": 3, "qk_norm": False, "use_cross_attention": False, "num_moe_layers": 1},
])
def test_fused_grouped_equals_reference_fp32(over):
    cfg = tiny(**over)
    ref = random_model(cfg, seed=3)
    n = cfg["params"].get("input_size", 32) if over.get("use_pos_emb") else 32
    x, t, ctx, idx = inputs(ref, 4, n, 20, 24)
    fast = copy.deepcopy(ref).prepare("fast")
    ref.prepare("exact")
    if moe_mod.grouped_mm_supported("cpu", None, torch.float32):
        assert all(b.moe.impl == "grouped" for b in fast.blocks if b.use_moe)
    assert fast.blocks[0].attn1.qkv is not None
    a, b = ref(x, t, ctx, idx), fast(x, t, ctx, idx)
    assert a.shape == (4, n, cfg["params"]["in_channels"]) and a.dtype == torch.float32
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))
    # The fused weights are views: the state dict is unchanged, no second copy is kept.
    sa, sb = ref.state_dict(), fast.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    qkv_w = fast.blocks[0].attn1.qkv[0]
    assert fast.blocks[0].attn1.to_k.weight.untyped_storage().data_ptr() == \
        qkv_w.untyped_storage().data_ptr()


def test_moe_grouped_equals_loop():
    torch.manual_seed(0)
    for top_k, dtype in ((1, torch.float32), (2, torch.float32), (3, torch.float32),
                         (2, torch.bfloat16)):
        if not moe_mod.grouped_mm_supported("cpu", None, dtype):
            continue  # this PyTorch has no CPU grouped GEMM for dtype
        m = moe_mod.MoE(16, num_experts=4, top_k=top_k, inner_dim=24)
        for p in m.parameters():
            nn.init.normal_(p, std=0.3)
        m.to(dtype)
        x = torch.randn(37, 16).to(dtype)
        # starve expert 3 so that one group is empty
        with torch.no_grad():
            m.gate.weight[3] = -10.0 * x.float().mean(0).sign().to(dtype)
        loop = m(x, impl="loop")
        grouped = m(x, impl="grouped")
        assert loop.dtype == torch.float32
        tol = 0 if dtype == torch.bfloat16 else 1e-5
        assert (loop - grouped).abs().max() <= tol


def test_moe_routing_quirks():
    """Softmax top-k without renormalisation (weights do not sum to 1)."""
    m = moe_mod.MoE(8, num_experts=4, top_k=2, inner_dim=8)
    for p in m.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(10, 8)
    idx, w = m.route(x)
    probs = torch.softmax(x @ m.gate.weight.T, -1)
    assert torch.allclose(w, torch.gather(probs, 1, idx))
    assert (w.sum(-1) < 1).all()


def test_rms_norm_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g).bfloat16()
    w = 1 + 0.3 * torch.randn(16, generator=g)
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(rms_norm(x, w, 1e-6, "single"), (n * w).bfloat16())
    assert torch.equal(rms_norm(x, w, 1e-6, "double"), n.bfloat16().float() * w)
    assert torch.equal(rms_norm(xf, w, 1e-6), n * w)
    # The installed PyTorch's nn.RMSNorm is what "exact" reproduces.
    mod = nn.RMSNorm(16, eps=1e-6)
    mod.weight.data = w
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(rms_norm(x, w, 1e-6).float(), mod(x).float())


# --------------------------------------------------------------------------- runner

@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_kv_cached_runner_equals_forward(mode):
    model = random_model(tiny(with_decoupled_ca=True, decoupled_ca_dim=4), seed=5)
    model.prepare(mode)
    x, t, ctx, idx = inputs(model, 3, 32, 20, 24, seed=2)
    ref = model(x, t, ctx, idx)
    for cache in ("all", 2, "none", "auto"):
        r = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], cache_blocks=cache)
        assert r.cached_blocks == {"all": 5, 2: 2, "none": 0, "auto": 5}[cache]
        out = r(x, t[0], idx)
        # same arithmetic; only the time-MLP GEMM shape differs (1 row instead of K)
        assert (out - ref).abs().max() <= 1e-6 * float(ref.abs().max())
        # the part-embedding rows are an explicit argument
        other = r(x, t[0], idx.flip(0))
        assert not torch.equal(other, ref)


def test_plan_cache_blocks_follows_budget(monkeypatch):
    from turbopart.runtime import memory
    model = random_model(tiny(), seed=1).prepare("exact")
    per = 2 * 3 * (20 + 24) * 32 * 4
    fixed = None

    def fake_free(device):
        return int((fixed + 2.5 * per) / memory.DEFAULT_FRACTION) + 1

    from turbopart.xpart.dit_runner import step_activation_bytes
    fixed = step_activation_bytes(model, 3, 32, 24)
    monkeypatch.setattr(memory, "free_bytes", fake_free)
    assert plan_cache_blocks(model, 3, 32, 20, 24) == 2
    assert plan_cache_blocks(model, 3, 32, 20, 24, "all") == 5


def test_part_index_helpers():
    g = torch.Generator().manual_seed(32)
    idx = dit_mod.draw_part_index(3, 50, g)
    torch.manual_seed(32)
    assert torch.equal(idx, torch.randperm(50)[:3])  # the official global-CPU draw
    assert torch.equal(dit_mod.draw_part_index(4, deterministic=True), torch.arange(4))
    with pytest.raises(ValueError):
        dit_mod.draw_part_index(51, 50, g)
    with pytest.raises(ValueError):
        dit_mod.draw_part_index(3, 50)
    steps = part_indices(5, 3, 50, torch.Generator().manual_seed(1))
    assert steps.shape == (5, 3)
    case = load_case(case_path("dit"))
    assert torch.equal(case.rng("part_embed_index"), case.rng("part_embed_randperm")[:3])


def test_global_blocks_mix_parts_local_blocks_do_not():
    x_cfg = tiny(depth=1)  # block 0 only: local self-attention
    m = random_model(x_cfg, seed=2).prepare("exact")
    x, t, ctx, idx = inputs(m, 2, 32, 20, 24)
    a = m(x, t, ctx, idx)
    x2 = x.clone()
    x2[1] += 1.0
    b = m(x2, t, ctx, idx)
    assert torch.equal(a[0], b[0])
    m2 = random_model(tiny(depth=2), seed=2).prepare("exact")  # block 1 is global
    assert not torch.equal(m2(x, t, ctx, idx)[0], m2(x2, t, ctx, idx)[0])


def test_denoise_skip_noop_is_output_identical():
    model = random_model(tiny(), seed=4).prepare("fast")
    x, _, ctx, _ = inputs(model, 3, 32, 20, 24)
    idx = part_indices(6, 3, 50, torch.Generator().manual_seed(0))
    a = denoise(model, x, ctx, num_inference_steps=6, part_index=idx, skip_noop=True)
    b = denoise(model, x, ctx, num_inference_steps=6, part_index=idx, skip_noop=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- fidelity

def test_fidelity_fast_bf16_vs_exact_cpu():
    """bf16 ``fast`` against fp32 ``exact``: relative error below the stated bound; and
    ``fast`` equals the bf16 emulation of ``exact`` (fp32 weights cast per op, unfused,
    per-expert loop) up to rounding-order noise."""
    case = load_case(case_path("dit"))
    from turbopart.golden.dit import build_loaded
    exact = build_loaded(case)
    # bf16-exact norm weights so that fast takes its fused RMSNorm path too
    for mod in exact.modules():
        if isinstance(mod, nn.RMSNorm):
            mod.weight.data = mod.weight.data.bfloat16().float()
    emul = copy.deepcopy(exact).prepare("exact", compute_dtype=torch.bfloat16)
    fast = to_bf16_linears(copy.deepcopy(exact)).prepare("fast")
    assert fast.cd == torch.bfloat16 and fast.blocks[0].attn1.lp_norms
    x, t = case.input("x"), case.input("t")
    ctx = {"obj_cond": case.input("obj_cond"), "geo_cond": case.input("geo_cond")}
    idx = case.rng("part_embed_index")
    ref = exact(x, t, ctx, idx)
    out = fast(x, t, ctx, idx)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < FIDELITY_BOUND_CPU
    em = emul(x, t, ctx, idx)
    same = (em == out).float().mean()
    assert same > 0.99 and rel(out, em) < 2e-3


@needs_gpu
def test_fidelity_fast_vs_exact_full_size_gpu():
    """Full-size random weights (N(0, 0.02²)) on the GPU, K = 2: fast vs exact."""
    dev = torch.device("cuda")
    with torch.device("meta"):
        exact = dit_mod.build(None)
    dit_mod.materialize_random(exact, device=dev, numerics="exact", seed=0)
    fast = copy.deepcopy(exact)
    to_bf16_linears(fast)
    exact.prepare("exact")
    fast.prepare("fast")
    g = torch.Generator(device=dev).manual_seed(0)
    k = 2
    x = torch.randn(k, 1024, 64, device=dev, generator=g)
    obj = torch.randn(k, 4096, 1024, device=dev, generator=g).bfloat16()
    geo = torch.randn(k, 4096, 1024, device=dev, generator=g).bfloat16()
    idx = torch.tensor([3, 17], device=dev)
    ref = DiTRunner(exact, obj, geo, cache_blocks="none")(x, 0.5, idx)
    runner = DiTRunner(fast, obj, geo, cache_blocks="all")
    out = runner(x, 0.5, idx)
    assert rel(out, ref) < FIDELITY_BOUND_CPU   # the stated bound (2.2e-2 measured)
    eager = DiTRunner(fast, obj, geo, cache_blocks="all", cuda_graph=False)(x, 0.5, idx)
    assert rel(out, eager) < 1e-3


def test_load_component_roundtrip(tmp_path):
    """Random tiny checkpoint in the official layout → loader (fast: bf16 Linears) → run."""
    weights.write_random(tmp_path, tiny=True, components=["model", "scheduler"])
    assert "model" in weights.check_dir(tmp_path, ["model"])
    for mode in ("exact", "fast"):
        model = weights.load_component(tmp_path, "model", numerics=mode, device="cpu")
        model.prepare(mode)
        x, t, ctx, idx = inputs(model, 2, 32, 20, 24)
        out = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"])(x, 0.5, idx)
        assert out.shape == (2, 32, 8) and torch.isfinite(out).all()
    sched = weights.load_component(tmp_path, "scheduler")
    assert sched.num_train_timesteps == 1000


@pytest.mark.skipif(not __import__("os").environ.get("TURBOPART_SLOW_TESTS"),
                    reason="compiles with inductor (~30 s on 2 CPU cores); "
                           "set TURBOPART_SLOW_TESTS=1")
def test_compiled_blocks_equal_eager_bf16():
    """Each compiled block matches the eager block on the same inputs (bf16 rounding-order
    noise only); end to end the runner stays within the bf16 fidelity bound (this tiny
    random model amplifies per-block rounding noise several-fold per block)."""
    model = to_bf16_linears(random_model(tiny(), seed=6)).prepare("fast")
    x, t, ctx, idx = inputs(model, 3, 32, 20, 24)
    eager_runner = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"])
    runner = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], compile=True)
    out = runner(x, 0.5, idx)
    assert runner.block_fns is not None
    assert rel(out, eager_runner(x, 0.5, idx)) < FIDELITY_BOUND_CPU
    with torch.no_grad():
        h = model.embed(x, model.time_embed(torch.tensor([0.5])), idx)
        skips = []
        for i, blk in enumerate(model.blocks):
            skip = skips.pop() if i > model.depth // 2 else None
            ref = blk(h, None, None, skip, runner.kv[i], None)
            got = runner.block_fns[i](h, None, None, skip, runner.kv[i], None)
            assert rel(got - h, ref - h) < 2e-3, i
            h = ref
            if i < model.depth // 2:
                skips.append(h)


@needs_gpu
def test_cuda_numerics_assumptions():
    """What ``exact`` assumes about CUDA autocast holds on the installed PyTorch."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(512, 16, 128, device=dev, generator=g).bfloat16()
    rms = nn.RMSNorm(128, eps=1e-6).to(dev)
    ln = nn.LayerNorm(256, eps=1e-6).to(dev)
    with torch.no_grad():
        rms.weight.normal_(1.0, 0.1, generator=g)
        ln.weight.normal_(1.0, 0.1, generator=g)
    h = torch.randn(512, 256, device=dev, generator=g)
    from turbopart.nn.norms import layer_norm
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        official_q = rms(x)
        official_ln = ln(h)
    ours = rms_norm(x, rms.weight, 1e-6)
    assert torch.equal(ours.to(torch.bfloat16), official_q.to(torch.bfloat16))
    assert official_ln.dtype == torch.float32
    assert torch.equal(layer_norm(h, ln.weight, ln.bias, 1e-6), official_ln)


@needs_gpu
def test_grouped_moe_equals_loop_cuda_bf16():
    dev = torch.device("cuda")
    if not moe_mod.grouped_mm_supported("cuda", None, torch.bfloat16):
        pytest.skip("no grouped GEMM for bf16 on this GPU")
    torch.manual_seed(0)
    m = moe_mod.MoE(256, num_experts=8, top_k=2, inner_dim=1024).to(dev)
    for p in m.parameters():
        nn.init.normal_(p, std=0.05)
    m.to(torch.bfloat16)
    x = torch.randn(3000, 256, device=dev).bfloat16()
    loop = m(x, impl="loop")
    grouped = m(x, impl="grouped")
    assert rel(grouped, loop) < 2e-3
    assert (grouped == loop).float().mean() > 0.9


@needs_gpu
def test_runner_cuda_graph_equals_eager_tiny():
    dev = torch.device("cuda")
    model = random_model(tiny(), seed=7).to(dev)
    to_bf16_linears(model).prepare("fast")
    x, t, ctx, idx = inputs(model, 3, 32, 20, 24)
    x, idx = x.to(dev), idx.to(dev)
    ctx = {k: v.to(dev) for k, v in ctx.items()}
    eager = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], cuda_graph=False)
    graph = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], cuda_graph=True)
    for step, tt in enumerate((0.0, 0.3, 0.7)):
        a, b = eager(x, tt, idx.roll(step)), graph(x, tt, idx.roll(step))
        assert graph.graph is not None
        assert rel(b, a) < 1e-3


@needs_gpu
def test_runner_graphs_only_small_steps_by_default(monkeypatch):
    """The default captures a step of at most GRAPH_MAX_TOKENS latent tokens in a graph and
    runs larger steps eagerly; TURBOPART_DIT_GRAPH=1 / 0 overrides."""
    from turbopart.xpart import dit_runner as R
    dev = torch.device("cuda")
    model = random_model(tiny(), seed=7).to(dev)
    to_bf16_linears(model).prepare("fast")
    _, _, ctx, _ = inputs(model, 3, 32, 20, 24)
    obj, geo = ctx["obj_cond"].to(dev), ctx["geo_cond"].to(dev)
    monkeypatch.delenv("TURBOPART_DIT_GRAPH", raising=False)
    assert DiTRunner(model, obj, geo, latent_tokens=32).use_graph       # 96 tokens
    monkeypatch.setattr(R, "GRAPH_MAX_TOKENS", 64)
    assert not DiTRunner(model, obj, geo, latent_tokens=32).use_graph
    monkeypatch.setenv("TURBOPART_DIT_GRAPH", "1")
    assert DiTRunner(model, obj, geo, latent_tokens=32).use_graph
    monkeypatch.setattr(R, "GRAPH_MAX_TOKENS", 4096)
    monkeypatch.setenv("TURBOPART_DIT_GRAPH", "0")
    assert not DiTRunner(model, obj, geo, latent_tokens=32).use_graph


# --------------------------------------------------------------------------- fused fast step

from turbopart.nn import kernels as nn_kernels  # noqa: E402
from turbopart.xpart.dit import StepOptions  # noqa: E402

FUSED_CONFIGS = [
    {},
    {"depth": 6, "num_heads": 2, "num_experts": 3, "moe_top_k": 3, "num_moe_layers": 3,
     "qkv_bias": True},
    {"depth": 4, "with_decoupled_ca": True, "decoupled_ca_dim": 5, "num_moe_layers": 1},
    {"depth": 3, "qk_norm": False, "use_cross_attention": False, "num_moe_layers": 1},
]


@pytest.mark.parametrize("over,bf16", [(c, False) for c in FUSED_CONFIGS] +
                         [(c, True) for i, c in enumerate(FUSED_CONFIGS) if i != 1])
def test_fused_step_torch_ops_equal_legacy(over, bf16):
    """The fused stream with its PyTorch formulations is the per-block arithmetic, bitwise
    (skip copies, concatenation halves, MoE parts + combine, strided per-step K/V)."""
    model = random_model(tiny(**over), seed=11)
    if bf16:
        to_bf16_linears(model)
    model.prepare("fast")
    assert model.fused_supported()
    x, t, ctx, idx = inputs(model, 3, 32, 20, 24, seed=4)
    legacy = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], kernels="legacy")
    ref = legacy(x, 0.37, idx)
    assert not legacy.opts.fused
    for cache, layout in (("all", "strided"), ("none", "strided"), ("none", "contiguous"),
                          (2, "strided")):
        r = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], kernels="none",
                      cache_blocks=cache, kv_layout=layout)
        assert r.opts.fused and not r.opts.kernels
        out = r(x, 0.37, idx)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(out, ref), (cache, layout, rel(out, ref))


def test_fused_step_default_and_switches(monkeypatch):
    model = random_model(tiny(), seed=1).prepare("fast")
    x, t, ctx, idx = inputs(model, 2, 32, 20, 24)
    r = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"])
    assert r.opts.fused  # the fused stream is the default fast step
    assert r.opts.kernels == (frozenset({"ln", "qk", "moe"}) if nn_kernels.available("cpu")
                              else frozenset())
    monkeypatch.setenv("TURBOPART_DIT_KERNELS", "legacy")
    monkeypatch.setenv("TURBOPART_DIT_SDPA", "local=flash,cross=cudnn")
    monkeypatch.setenv("TURBOPART_DIT_KV_LAYOUT", "contiguous")
    r = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"])
    assert not r.opts.fused and r.opts.kv_layout == "contiguous"
    assert dict(r.opts.sdpa) == {"local": "flash", "global": "auto", "cross": "cudnn"}
    assert r.opts.uniform_sdpa is None
    assert "legacy" in r.describe()
    # exact always runs the per-block modules with PyTorch's own SDPA choice
    ex = random_model(tiny(), seed=1).prepare("exact")
    monkeypatch.setenv("TURBOPART_DIT_KERNELS", "all")
    r = DiTRunner(ex, ctx["obj_cond"], ctx["geo_cond"], sdpa="flash")
    assert not r.opts.fused and r.opts.uniform_sdpa == "auto"
    assert StepOptions.parse_kernels("ln,qk") == (True, frozenset({"ln", "qk"}))
    assert StepOptions.parse_kernels("all+gelu") == (True, frozenset({"ln", "qk", "moe",
                                                                     "gelu"}))
    assert StepOptions.parse_kernels("0") == (False, frozenset())
    assert StepOptions.parse_kernels("none") == (True, frozenset())
    assert StepOptions.parse_sdpa("cudnn") == tuple((k, "cudnn") for k in
                                                    ("local", "global", "cross"))
    with pytest.raises(ValueError):
        StepOptions.parse_kernels("ln,fp8")
    with pytest.raises(ValueError):
        StepOptions.parse_sdpa("cross=fast")
    # configurations outside the official block structure keep the per-block modules
    rms = random_model(tiny(norm_type="rms"), seed=1).prepare("fast")
    assert not rms.fused_supported()
    assert not DiTRunner(rms, ctx["obj_cond"], ctx["geo_cond"]).opts.fused


def test_fused_step_failure_falls_back_loudly(monkeypatch):
    """A kernel that fails to compile/launch: warning, then the per-block modules."""
    from turbopart.nn.kernels import rownorm
    model = random_model(tiny(), seed=2).prepare("fast")
    x, t, ctx, idx = inputs(model, 2, 32, 20, 24)
    ref = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], kernels="legacy")(x, 0.5, idx)
    r = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"])
    r.opts = StepOptions(fused=True, kernels=frozenset({"ln"}))

    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed")
    monkeypatch.setattr(rownorm, "residual_ln", broken)
    with pytest.warns(UserWarning, match="falling back"):
        out = r(x, 0.5, idx)
    assert not r.opts.fused
    assert torch.equal(out, ref)


def test_moe_parts_and_combine_equal_grouped():
    if not moe_mod.grouped_mm_supported("cpu", None, torch.float32):
        pytest.skip("no CPU grouped GEMM")
    torch.manual_seed(0)
    m = moe_mod.MoE(16, num_experts=4, top_k=2, inner_dim=24)
    for p in m.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(37, 16)
    xp = moe_mod.pad_tokens(x)
    ref = m(x, impl="grouped")
    ys, inv, w, shared = moe_mod.moe_grouped_parts(m, x, xp)
    assert torch.equal(moe_mod.combine_routes(ys, inv, w, shared), ref)


def test_step_activation_estimate_fused():
    from turbopart.xpart.dit_runner import step_activation_bytes
    with torch.device("meta"):
        m = dit_mod.build(None)
    m.cd = torch.bfloat16
    fused = step_activation_bytes(m, 8, 1024, 4096, fused=True)
    legacy = step_activation_bytes(m, 8, 1024, 4096, fused=False)
    # one uncached block's K/V (0.54 GB at K = 8) plus the stream and MoE transients
    assert 1.0e9 < fused < legacy < 4e9


needs_kernels = pytest.mark.skipif(
    not nn_kernels.available("cpu") and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 with triton installed")


def _kdev():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@needs_kernels
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_rownorm_kernels_equal_torch(dt):
    import torch.nn.functional as F
    from turbopart.nn.kernels import rownorm
    from turbopart.nn.norms import layer_norm
    dev = _kdev()
    g = torch.Generator(device=dev).manual_seed(0)
    t, d = 37, 48

    def rn(*shape):
        return torch.randn(*shape, device=dev, generator=g)
    h = 3 * rn(t, d)
    a, b = rn(t, d).to(dt), rn(t, d).to(dt)
    w1, b1, w2, b2 = 1 + 0.1 * rn(d), rn(d), 1 + 0.1 * rn(d), rn(d)
    tol = 0 if dt == torch.bfloat16 else 5e-6  # bf16: rounding of fp32 values that agree

    def close(x, y, frac=0.995):
        assert x.dtype == y.dtype
        if dt == torch.bfloat16:
            assert (x == y).float().mean() >= frac
            assert (x.float() - y.float()).abs().max() <= 2 ** -6 * y.float().abs().max()
        else:
            assert (x - y).abs().max() <= tol * max(1.0, float(y.abs().max()))
    # h + a + b → two LayerNorms (one into padded MoE rows), bf16 copy, skip copy
    o1 = torch.full((t, d + 16), 7.0, device=dev, dtype=dt)[:, :d + 8]
    o2 = torch.empty(t, d, device=dev, dtype=dt)
    cat = torch.empty(t, 2 * d, device=dev, dtype=dt)
    src = rn(t, d).to(dt)
    hh = h.clone()
    rownorm.residual_ln(hh, adds=[a, b], norms=[((w1, b1, 1e-6), o1, 8),
                                                ((w2, b2, 1e-5), o2, 0)],
                        h_out=hh, hb_out=cat[:, d:], skip_copy=(src, cat[:, :d]))
    ref = (h + a) + b
    assert torch.equal(hh, ref)
    close(o1[:, :d], layer_norm(ref, w1, b1, 1e-6).to(dt))
    assert torch.all(o1[:, d] == 1) and torch.all(o1[:, d + 1:] == 0)
    close(o2, layer_norm(ref, w2, b2, 1e-5).to(dt))
    assert torch.equal(cat[:, d:], ref.to(dt)) and torch.equal(cat[:, :d], src)
    # LayerNorm of a GEMM output first, then the MoE combine, into a new h
    z = rn(t, d).to(dt)
    ys, inv = rn(2 * t, d).to(dt), torch.randperm(2 * t, device=dev, generator=g)
    wt, sh = torch.rand(t, 2, device=dev, generator=g), rn(t, d).to(dt)
    hn = torch.empty(t, d, device=dev)
    rownorm.residual_ln(z, pre=(w1, b1, 1e-6), moe=(ys, inv, wt, sh),
                        norms=[((w2, b2, 1e-6), o2, 0)], h_out=hn)
    ref = layer_norm(z, w1, b1, 1e-6) + moe_mod.combine_routes(ys, inv, wt, sh)
    assert (hn - ref).abs().max() <= 1e-5 * float(ref.abs().max())
    close(o2, layer_norm(ref, w2, b2, 1e-6).to(dt))
    # [time token ; x_embed + part_embed[idx]] and its LayerNorm
    xe, c, pe = rn(3, 5, d).to(dt), rn(1, 1, d).to(dt), 0.1 * rn(50, d)
    idx = torch.tensor([4, 9, 1], device=dev)
    he, oe = torch.empty(3, 6, d, device=dev), torch.empty(3, 6, d, device=dev, dtype=dt)
    rownorm.embed_ln(xe, c, pe, idx, (w1, b1, 1e-6), he, oe)
    ref = torch.cat([c.expand(3, 1, d), xe + pe[idx].unsqueeze(1)], dim=1)
    assert torch.equal(he, ref)
    close(oe, layer_norm(ref, w1, b1, 1e-6).to(dt))
    # q/k RMSNorm of strided head slices; in place
    u = rn(t, 4, 3, 16).to(dt)
    wq, wk = (1 + 0.1 * rn(16)).to(dt).float(), (1 + 0.1 * rn(16)).to(dt).float()
    q, k = torch.empty(t, 4, 16, device=dev, dtype=dt), torch.empty(t, 4, 16, device=dev,
                                                                    dtype=dt)
    rownorm.rms_heads(u[:, :, 0], wq, 1e-6, q, x2=u[:, :, 1], w2=wk, out2=k)
    close(q, rms_norm(u[:, :, 0], wq, 1e-6, "single"))
    close(k, rms_norm(u[:, :, 1], wk, 1e-6, "single"))
    if dt == torch.bfloat16:
        qd = torch.empty_like(q)
        rownorm.rms_heads(u[:, :, 0], wq, 1e-6, qd, double=True)
        close(qd, rms_norm(u[:, :, 0], wq, 1e-6, "double").to(dt))
    v0 = u[:, :, 2].clone()
    rownorm.rms_heads(u[:, :, 1], wk, 1e-6, u[:, :, 1])
    close(u[:, :, 1], k, frac=1.0)
    assert torch.equal(u[:, :, 2], v0)
    del F


@needs_kernels
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_linear_gelu_kernel(dt):
    import torch.nn.functional as F
    from turbopart.nn.kernels.gemm import linear_gelu
    dev = _kdev()
    g = torch.Generator(device=dev).manual_seed(1)
    for m, k, n in ((37, 48, 40), (50, 64, 32)):
        x = torch.randn(m, k + 16, device=dev, generator=g).to(dt)[:, :k]  # strided rows
        w = (0.2 * torch.randn(n, k, device=dev, generator=g)).to(dt)
        b = torch.randn(n, device=dev, generator=g).to(dt)
        for bias in (b, None):
            ref = F.gelu(F.linear(x, w, bias))
            out = linear_gelu(x, w, bias)
            assert out.dtype == dt and out.shape == (m, n)
            if dt == torch.float32:
                assert (out - ref).abs().max() <= 1e-5 * float(ref.abs().max())
            else:  # accumulation order only: rare one-ulp flips
                assert (out == ref).float().mean() > 0.98
                assert (out.float() - ref.float()).abs().max() <= \
                    2 ** -7 * float(ref.float().abs().max())


@needs_kernels
@pytest.mark.parametrize("over", FUSED_CONFIGS[:3])
def test_fused_kernels_step_equals_legacy(over):
    """fp32: the Triton step computes the per-block function (reduction order only); bf16:
    within the bf16 fidelity bound of the per-block step."""
    dev = _kdev()
    for bf16 in (False, True):
        model = random_model(tiny(**over), seed=11).to(dev)
        if bf16 or dev.type == "cuda":
            to_bf16_linears(model)
        model.prepare("fast")
        x, t, ctx, idx = inputs(model, 3, 32, 20, 24, seed=4)
        x, idx = x.to(dev), idx.to(dev)
        ctx = {k: v.to(dev) for k, v in ctx.items()}
        ref = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], kernels="legacy",
                        cuda_graph=False)(x, 0.37, idx)
        for cache, kern in (("all", "all"), (1, "all+gelu")):
            r = DiTRunner(model, ctx["obj_cond"], ctx["geo_cond"], kernels=kern,
                          cache_blocks=cache)
            out = r(x, 0.37, idx)
            assert r.opts.fused and r.opts.kernels == \
                frozenset({"ln", "qk", "moe"} | ({"gelu"} if "gelu" in kern else set()))
            if model.cd == torch.float32:
                assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
            else:
                assert rel(out, ref) < FIDELITY_BOUND_CPU
