"""ShapeVAE: layout, golden parity, Fourier embedding, encoder sampling, the fast query API."""
from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import MANIFESTS, case_path, needs_gpu, needs_triton, run_in_triton_interpreter
from turbopart import weights
from turbopart.nn.fourier import FourierEmbedder, fourier_features, fourier_frequencies
from turbopart.xpart import vae as vae_mod


def _manifest(name):
    if MANIFESTS is None:
        pytest.skip("needs ../shared/golden/manifests")
    with open(MANIFESTS / f"{name}.json") as f:
        return {k: tuple(v["shape"]) for k, v in json.load(f)["state_dict"].items()}


def _random_vae(params=None, dtype=torch.float32, seed=0):
    """A tiny ShapeVAE with the golden case's init rule (every path contributes)."""
    model = vae_mod.ShapeVAE(params or vae_mod.tiny_params())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                s = min(max(1 / math.sqrt(p.shape[1]), 0.02), 0.2)
                p.copy_(s * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- layout

def test_layout_matches_manifest():
    assert weights.layout("shapevae") == _manifest("shapevae")


def test_skip_unused_leaves_out_encoder_and_pre_kl():
    full = weights.layout("shapevae")
    sd = weights.build("shapevae", skip_unused=True).state_dict()
    keys = set(sd)
    assert keys <= set(full)
    assert {k for k in full if k not in keys} == {
        k for k in full if k.startswith(("encoder.", "pre_kl."))}
    assert all(tuple(sd[k].shape) == full[k] for k in keys)


def test_configs_are_the_official_ones():
    with open(case_path("shapevae")) as f:
        assert vae_mod.tiny_config()["params"] == json.load(f)["config"]
    _manifest("shapevae")
    with open(MANIFESTS / "shapevae.json") as f:
        assert vae_mod.default_params() == json.load(f)["config"]["params"]


def test_tiny_config_builds_golden_layout():
    cfg = vae_mod.tiny_config()
    lay = weights.layout("shapevae", cfg)
    assert lay["geo_decoder.query_proj.weight"] == (32, 51)
    assert lay["encoder.input_proj.weight"] == (32, 55)
    assert lay["pre_kl.weight"] == (16, 32)


# --------------------------------------------------------------------------- golden

def test_golden_shapevae():
    from turbopart.golden import compare, load_case
    from turbopart.golden.shapevae import run
    case = load_case(case_path("shapevae"))
    checks = compare(case, run(case))
    bad = [(c.name, c.max_abs, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) == 9


# --------------------------------------------------------------------------- Fourier

def test_fourier_column_order_and_dtypes():
    x = torch.tensor([[0.3, -0.7, 0.11]], dtype=torch.float64)
    emb = FourierEmbedder(num_freqs=8, include_pi=False)
    assert emb.out_dim == 51
    f = emb(x)
    assert f.dtype == torch.float64 and f.shape == (1, 51)
    assert torch.equal(f[0, :3], x[0])
    for a in range(3):
        for k in range(8):
            assert f[0, 3 + 8 * a + k] == torch.sin(x[0, a] * 2.0 ** k)
            assert f[0, 27 + 8 * a + k] == torch.cos(x[0, a] * 2.0 ** k)
    # fp16 coordinates are embedded in fp32 (type promotion with the fp32 buffer)
    assert emb(x.half()).dtype == torch.float32
    padded = fourier_features(x.float(), emb.frequencies, out_dtype=torch.bfloat16, pad_to=56)
    assert padded.shape == (1, 56) and padded.dtype == torch.bfloat16
    assert torch.all(padded[:, 51:] == 0)
    assert torch.allclose(fourier_frequencies(3, True), torch.tensor([1.0, 2.0, 4.0]) * torch.pi)


# --------------------------------------------------------------------------- encoder

def test_encoder_sizes_follow_official_arithmetic():
    s = vae_mod.encoder_sizes(4096, 20, 81920, 0)
    assert (s.num_input, s.num_query) == (81920, 4096)
    s = vae_mod.encoder_sizes(32, 20, 1024, 0)
    assert (s.num_input, s.num_query) == (640, 32)
    s = vae_mod.encoder_sizes(24, 20, 1024, 0)
    assert (s.num_input, s.num_query) == (480, 24)
    assert vae_mod.encoder_sizes(1024, 20, 81920, 0).num_query == 1024


def test_fps_start_is_truncated_product_and_in_range():
    u = torch.tensor([0.0, 0.5, 0.999, 1 - 2 ** -24])
    s = vae_mod.fps_start_from_uniform(u, 81920)
    assert s.tolist()[:3] == [0, 40960, int(0.999 * 81920)]
    assert s[3] == 81919


def _surface(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(b, n, 3, generator=g) * 1.6 - 0.8
    nrm = torch.nn.functional.normalize(torch.randn(b, n, 3, generator=g), dim=-1)
    return torch.cat([xyz, nrm, torch.zeros(b, n, 1)], dim=-1)


def test_fps_reproduces_recorded_picks():
    from turbopart.golden import load_case
    from turbopart.golden.shapevae import load_vae, recorded_fps
    case = load_case(case_path("shapevae"))
    model = load_vae(case.config, case.prefixed("weight."))
    surf = case.input("surface")
    picks = recorded_fps(case.rng("encode.fps_index"), 1, 640)
    s = model.encoder.sample(surf[..., :3], case.rng("encode.randperm"), picks[:, 0])
    assert torch.equal(s.query_idx, picks)
    assert torch.equal(s.input_idx, case.rng("encode.randperm")[:640])


def test_shared_object_encoding_equals_per_copy_encoding():
    """The object encoder shares ln_2/c_kv over copies; the result equals K separate runs."""
    model = _random_vae()
    surf = _surface(1, 1024)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(1024, generator=g)
    start = torch.tensor([5, 77, 301])
    shared = model.encode_shape(surf, perm, start)
    copies = model.encode_shape(surf.expand(3, -1, -1), perm, start)
    single = torch.cat([model.encode_shape(surf, perm, start[i:i + 1]) for i in range(3)])
    assert shared.shape == (3, 32, 32)
    torch.testing.assert_close(shared, copies, rtol=0, atol=2e-6)
    torch.testing.assert_close(shared, single, rtol=0, atol=2e-6)
    # grouping the batch (memory-bounded) does not change anything
    sampled = model.encoder.sample(surf.expand(3, -1, -1)[..., :3], perm, start)
    grouped = model.encoder(surf.expand(3, -1, -1).contiguous(), sampled, torch.float32,
                            max_batch=1)
    torch.testing.assert_close(grouped, copies, rtol=0, atol=2e-6)


def test_encode_draws_from_generator_deterministically():
    model = _random_vae()
    surf = _surface(2, 1024)
    a = model.encode(surf, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    b = model.encode(surf, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    c = model.encode(surf, sample_posterior=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 32, 8)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError):
        model.encode_shape(_surface(1, 1000))


# --------------------------------------------------------------------------- query API

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_api_equals_module_forward(dtype):
    """The chunked query API computes the module's function.  Bit for bit where the CPU
    BLAS gives every row the same result whatever the row count; fp32 products on some CPUs
    (the H100 host's) change their blocking with the row count: within 1e-6 there."""
    model = _random_vae(dtype=dtype)

    def same(a, b):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    dec = model.decode(torch.randn(3, 32, 8, generator=g).to(dtype))
    pts = torch.rand(3, 3000, 3, generator=g) * 2.02 - 1.01
    ref = model.query_geometry(pts, dec)
    kv = model.geo_decoder.precompute_kv(dec)
    assert kv.k.shape == (3, 4, 32, 8) and kv.dtype == dtype
    for rows in (1024, 2500, 100000):
        out = model.geo_decoder.query(pts, kv, max_rows=rows)
        assert out.shape == (3, 3000) and out.dtype == dtype
        same(out, ref)
    packed = model.geo_decoder.query_packed(pts[:, :1500].reshape(-1, 3), [1500] * 3, kv,
                                            max_rows=1024)
    same(packed.view(3, -1), ref[:, :1500])
    # one query set shared by all parts (the coarse grid)
    shared = model.geo_decoder.query(pts[:1], kv, max_rows=2048)
    per = torch.cat([model.query_geometry(pts[:1], dec[i:i + 1]) for i in range(3)])
    tol = 0 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(shared.float(), per.float(), rtol=0, atol=max(tol, 1e-6))
    # coordinate dtype sets the Fourier precision as officially (fp16 -> fp32, fp64 -> fp64)
    for cd in (torch.float16, torch.float64):
        same(model.geo_decoder.query(pts.to(cd), kv), model.query_geometry(pts.to(cd), dec))


def test_geometry_decoder_without_ln_post_and_with_downsample():
    p = dict(vae_mod.tiny_params(), geo_decoder_ln_post=False, geo_decoder_downsample_ratio=2)
    model = _random_vae(p)
    keys = set(model.state_dict())
    assert "geo_decoder.latents_proj.weight" in keys
    assert not any(k.startswith("geo_decoder.ln_post") for k in keys)
    assert not any("geo_decoder.cross_attn_decoder.attn.attention" in k for k in keys)
    g = torch.Generator().manual_seed(0)
    dec = model.decode(torch.randn(2, 32, 8, generator=g))
    pts = torch.rand(2, 500, 3, generator=g) * 2 - 1
    kv = model.geo_decoder.precompute_kv(dec)
    assert torch.equal(model.geo_decoder.query(pts, kv), model.query_geometry(pts, dec))


@needs_gpu
def test_query_api_on_cuda_matches_forward():
    model = _random_vae().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    dec = model.decode(torch.randn(2, 32, 8, generator=g, device="cuda"))
    assert dec.dtype == torch.bfloat16  # the official autocast output
    pts = torch.rand(2, 5000, 3, generator=g, device="cuda", dtype=torch.float64) * 2 - 1
    kv = model.geo_decoder.precompute_kv(dec)
    out = model.geo_decoder.query(pts, kv, max_rows=2048)
    ref = model.query_geometry(pts, dec)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.02)
    shared = model.geo_decoder.query(pts[:1].half(), kv)
    assert shared.shape == (2, 5000)


def test_chunked_key_value_side_is_identical():
    from turbopart.xpart.vae_blocks import ResidualCrossAttentionBlock
    blk = ResidualCrossAttentionBlock(32, 4, qkv_bias=False, qk_norm=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(2, 1000, 32, generator=g)
        whole = blk.kv(x, torch.float32)
        parts = blk.kv(x, torch.float32, rows=77)
    assert whole.k.shape == (2, 4, 1000, 8)
    assert torch.equal(whole.k, parts.k) and torch.equal(whole.v, parts.v)


# --------------------------------------------------------------------------- fused query path

def _fused_model(dtype, seed=0):
    """Head dim 64 (the kernels' tile), tiny otherwise."""
    p = dict(vae_mod.tiny_params(), width=128, heads=2, num_latents=64)
    return _random_vae(p, dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_with_pytorch_ops_equals_eager(dtype):
    """The fused path's composition (broadcast residuals, packed rows, q_norm before SDPA,
    GEMM epilogues) with every kernel replaced by its PyTorch reference = the eager path."""
    model = _fused_model(dtype)
    geo = model.geo_decoder
    g = torch.Generator().manual_seed(0)
    dec = model.decode(torch.randn(3, 64, 8, generator=g).to(dtype))
    kv = geo.precompute_kv(dec)
    pts = torch.rand(3, 300, 3, generator=g, dtype=torch.float64) * 2.02 - 1.01
    geo.kernel = "eager"
    ref, ref_shared = geo.query(pts, kv), geo.query(pts[:1].half(), kv)
    geo.kernel = "fused"
    # the distinct compositions (without Triton, "gelu*" runs the "cublas" ops)
    for attn, gemm in (("triton", "cublas"), ("sdpa", "gelu"), ("sdpa", "triton_tma")):
        geo.fused_options = vae_mod.FusedOptions(attn, gemm)
        out = geo.query(pts, kv, max_rows=500)
        shared = geo.query(pts[:1].half(), kv, max_rows=600)
        assert out.dtype == dtype and out.shape == (3, 300)
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(shared.float(), ref_shared.float(), rtol=0, atol=1e-5)
    assert not geo.failed_modes


def test_query_mode_selection(monkeypatch):
    model = _fused_model(torch.float32)
    geo = model.geo_decoder
    monkeypatch.delenv("TURBOPART_DECODER", raising=False)
    assert geo.query_mode("cpu") == "eager"                # auto: no CUDA
    model.prepare("fast")
    assert geo.kernel == "fused" and geo.query_mode("cpu") == "fused"
    model.prepare("exact")
    assert geo.query_mode("cpu") == "eager"
    monkeypatch.setenv("TURBOPART_DECODER", "fused")        # the switch wins over prepare
    assert geo.query_mode("cpu") == "fused"
    monkeypatch.setenv("TURBOPART_DECODER", "compile")      # compile is CUDA-only
    assert geo.query_mode("cpu") == "eager"
    monkeypatch.setenv("TURBOPART_DECODER", "bogus")
    with pytest.raises(ValueError):
        geo.query_mode("cpu")
    monkeypatch.delenv("TURBOPART_DECODER")
    monkeypatch.setenv("TURBOPART_DECODER_GEMM", "tma")
    with pytest.raises(ValueError):
        vae_mod.FusedOptions.from_env()
    monkeypatch.setenv("TURBOPART_DECODER_GEMM", "triton_tma")
    monkeypatch.setenv("TURBOPART_DECODER_ATTN", "cudnn")
    assert vae_mod.FusedOptions.from_env() == vae_mod.FusedOptions("cudnn", "triton_tma")
    assert geo.bytes_per_row("fused") < geo.bytes_per_row("eager")
    assert geo.rows_per_chunk("cpu", max_rows=5000) <= 5000


def test_fused_failure_falls_back_to_eager(monkeypatch):
    model = _fused_model(torch.float32)
    geo = model.geo_decoder
    g = torch.Generator().manual_seed(1)
    kv = geo.precompute_kv(model.decode(torch.randn(2, 64, 8, generator=g)))
    pts = torch.rand(2, 50, 3, generator=g) * 2 - 1
    geo.kernel = "eager"
    ref = geo.query(pts, kv)

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(vae_mod, "_decode_chunk_fused", boom)
    geo.kernel = "fused"
    with pytest.warns(RuntimeWarning, match="exploded"):
        out = geo.query(pts, kv)
    assert torch.equal(out, ref)
    assert geo.failed_modes == {"fused"} and geo.query_mode("cpu") == "eager"


_KERNEL_SCRIPT = textwrap.dedent(r"""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import triton.language as tl
    from triton.runtime import interpreter as I

    # The interpreter's bf16 is not the GPU's: dot multiplies the raw uint16 bits and
    # fp32 -> bf16 truncates.  Compute bf16 dots in fp32 and round to nearest even.
    def _bits_to_f32(u):
        return (u.astype(np.uint32) << 16).view(np.float32)
    _conv = I._convert_float
    def _convert(x, src, dst, rounding):
        if src == tl.bfloat16 and dst == tl.float32:
            return _bits_to_f32(np.asarray(x).view(np.uint16)).view(np.uint32)
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(x).view(np.float32)))
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return _conv(x, src, dst, rounding)
    I._convert_float = _convert
    _dot = I.InterpreterBuilder.create_dot
    def _bdot(self, a, b, d, prec, imprecise):
        if a.dtype.scalar == tl.bfloat16:
            ad, bd = _bits_to_f32(a.data.view(np.uint16)), _bits_to_f32(b.data.view(np.uint16))
            return I.TensorHandle(np.matmul(ad, bd, dtype=np.float32) + d.data, d.dtype.scalar)
        return _dot(self, a, b, d, prec, imprecise)
    I.InterpreterBuilder.create_dot = _bdot

    from turbopart.nn.kernels import decoder_triton as K
    from turbopart.xpart import vae as vae_mod
    import tests.test_vae as t
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(bf)
    w, b = torch.rand(128, generator=g) + 0.5, torch.randn(128, generator=g) * 0.1
    x = rnd(37, 128, scale=3.0)
    assert torch.equal(K.layer_norm(x, w, b, 1e-6), K._ln_ref(x, w, b, 1e-6))
    a, p = rnd(10, 128), rnd(30, 128)                 # a shared by 3 row blocks of p
    xs, h = K.add_layer_norm(a, p, w, b, 1e-6)
    assert torch.equal(xs, K._add_ref(a, p)) and torch.equal(h, K._ln_ref(xs, w, b, 1e-6))
    ow, ob = rnd(1, 128, scale=0.1), rnd(1)
    ref = F.linear(K._ln_ref(xs, w, b, 1e-5).float(), ow.float(), ob.float())[:, 0]
    got = K.add_ln_dot(a, p, w, b, 1e-5, ow, ob)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max(), (got, ref)
    # attention: one key block = the flash arithmetic exactly (P rounded to bf16)
    B, H, T, D, n = 2, 2, 64, 64, 40
    k, v, q = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B * n, H * D)
    qw, qb = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g) * 0.1
    import os
    os.environ["TURBOPART_DECODER_SCORE_BOUND"] = "0"
    o = K.attention(q, k, v, qw, qb, 1e-6, n, config=K.AttnConfig(32, 64, 4, 1))
    qh = K._ln_ref(q.view(B, n, H, D), qw, qb, 1e-6).transpose(1, 2).float()
    s = qh @ k.float().transpose(-1, -2) * (0.125 * 1.4426950408889634)
    pm = torch.exp2(s - s.amax(-1, keepdim=True))
    o_ref = ((pm.to(bf).float() @ v.float()) / pm.sum(-1, keepdim=True)).to(bf)
    assert torch.equal(o, o_ref.transpose(1, 2).reshape(B * n, H * D))
    # the score bound (default): exponentials against c = |q| max|k| scale, no running max
    del os.environ["TURBOPART_DECODER_SCORE_BOUND"]
    o = K.attention(q, k, v, qw, qb, 1e-6, n, config=K.AttnConfig(32, 64, 4, 1))
    kn = k.float().norm(dim=-1).amax(-1)[:, :, None, None]
    c = qh.norm(dim=-1, keepdim=True) * kn * (0.125 * 1.4426950408889634)
    assert c.max() < K.SCORE_BOUND_LIMIT and (s.amax(-1, keepdim=True) <= c).all()
    pc = torch.exp2(s - c)
    o_ref = ((pc.to(bf).float() @ v.float()) / pc.sum(-1, keepdim=True)).to(bf)
    o_ref = o_ref.transpose(1, 2).reshape(B * n, H * D)
    assert (o.float() - o_ref.float()).abs().max() <= 0.01 * o_ref.float().abs().max()
    assert (o != o_ref).float().mean() < 0.05
    # a bound over the limit: the online softmax
    K.SCORE_BOUND_LIMIT, limit = -1.0, K.SCORE_BOUND_LIMIT
    o2 = K.attention(q, k, v, qw, qb, 1e-6, n, config=K.AttnConfig(32, 64, 4, 1))
    K.SCORE_BOUND_LIMIT = limit
    o_ref = ((pm.to(bf).float() @ v.float()) / pm.sum(-1, keepdim=True)).to(bf)
    assert torch.equal(o2, o_ref.transpose(1, 2).reshape(B * n, H * D))
    # shared queries (stride-0 part axis), two key blocks, no q_norm: vs the PyTorch path
    o = K.attention(q[:n], k, v, None, None, 1e-6, n, config=K.AttnConfig(16, 32, 4, 1))
    o_ref = K.attention_ref(q[:n], k, v, None, None, 1e-6, n)
    assert (o.float() - o_ref.float()).abs().max() < 0.02
    # Fourier operand of query_proj: bitwise the op sequence (fp64 and fp16 points)
    from turbopart.nn.fourier import fourier_frequencies
    fr = fourier_frequencies(8, False)
    for pts in (torch.rand(45, 3, generator=g, dtype=torch.float64) * 2.02 - 1.01,
                (torch.rand(45, 3, generator=g) * 2.02 - 1.01).half()):
        for fdt in (torch.float32, bf):
            f = K.fourier_rows(pts, fr, True, fdt, bf, 56)
            assert torch.equal(f, K.fourier_rows_ref(pts, fr, True, fdt, bf, 56)), pts.dtype
    # GEMM epilogues, pointer and TMA loads (ragged M); the persistent kernel's tile loop
    # does not run in Triton 3.6's interpreter (run-time loop bounds): GPU tests cover it
    xm, wm, bm = rnd(70, 128), rnd(96, 128, scale=0.1), rnd(96)
    res = rnd(35, 96)
    cfg = K.GemmConfig(32, 32, 32, 2, 4, 2)
    for mode in ("ptr", "tma"):
        for epi, r in ((0, None), (1, None), (2, res)):
            y = K.linear(xm, wm, bm, epi, r, mode=mode, config=cfg)
            y0 = K.linear_ref(xm, wm, bm, epi, r)
            assert (y.float() - y0.float()).abs().max() <= 0.01, (mode, epi)
            assert (y != y0).float().mean() < 0.01, (mode, epi)
        y = K.linear(xm, wm, None, mode=mode, config=cfg)
        assert (y.float() - F.linear(xm, wm).float()).abs().max() <= 0.01
    assert not K.disabled(), K.disabled()
    # the whole fused decoder with every kernel in Triton vs the eager op sequence
    model = t._fused_model(bf)
    geo = model.geo_decoder
    dec = model.decode(torch.randn(2, 64, 8, generator=g).to(bf))
    kv = geo.precompute_kv(dec)
    pts = torch.rand(2, 150, 3, generator=g, dtype=torch.float64) * 2.02 - 1.01
    geo.kernel = "eager"
    ref = geo.query(pts, kv)
    ref_shared = geo.query(pts[:1].half(), kv)
    small = K.GemmConfig(32, 64, 32, 2, 4, 2)
    for mode in ("ptr", "tma"):
        for nk in ((128, 128), (512, 128), (128, 512)):
            K.set_gemm_config(*nk, small, mode)
    geo.kernel = "fused"
    for attn, gemm in (("sdpa", "triton"), ("triton", "gelu_tma"), ("triton", "cublas")):
        geo.fused_options = vae_mod.FusedOptions(attn, gemm)
        for out, r in ((geo.query(pts, kv), ref), (geo.query(pts[:1].half(), kv), ref_shared)):
            err = (out.float() - r.float()).abs().max().item()
            # sdpa: fp32 reduction order only; triton attention: P rounded to bf16 (as
            # flash does on the GPU, unlike the CPU reference)
            tol = 0.02 if attn == "sdpa" else 0.1
            assert err <= tol * max(1.0, r.float().abs().max().item()), (attn, gemm, err)
    assert not K.disabled() and not geo.failed_modes, (K.disabled(), geo.failed_modes)
    print("ok")
""")


@needs_triton
def test_decoder_kernels_in_interpreter():
    """Tiling, masks, broadcast rows, epilogues and the fused decoder, on the CPU."""
    run_in_triton_interpreter(_KERNEL_SCRIPT)


@needs_gpu
def test_fourier_rows_on_cuda_is_the_op_sequence():
    """The Fourier kernel writes the query_proj operand bit for bit as PyTorch computes it
    (fp64 fine-level points, fp16 coarse grid; sin/cos, casts and zero padding)."""
    from turbopart.nn.fourier import fourier_frequencies
    from turbopart.nn.kernels import decoder_triton as K
    fr = fourier_frequencies(8, False, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    p64 = torch.rand(20000, 3, generator=g, device="cuda", dtype=torch.float64) * 2.02 - 1.01
    for pts in (p64, p64.half(), p64.float()):
        for fdt in (torch.float32, torch.bfloat16):
            f = K.fourier_rows(pts, fr, True, fdt, torch.bfloat16, 56)
            assert torch.equal(f, K.fourier_rows_ref(pts, fr, True, fdt, torch.bfloat16, 56))
    assert "fourier" not in K.disabled()


def test_gluon_linear_falls_back_off_hopper():
    """mode "gluon" takes the reference ops where its kernel does not apply (CPU tensors,
    epilogues other than GELU)."""
    from turbopart.nn.kernels import decoder_triton as K
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g).bfloat16()
    w = torch.randn(256, 64, generator=g).bfloat16()
    b = torch.randn(256, generator=g).bfloat16()
    for epi in (0, K.EPI_GELU):
        assert torch.equal(K.linear(x, w, b, epi, mode="gluon"), K.linear_ref(x, w, b, epi))
    assert "linear_gluon" not in K.disabled()


@needs_gpu
def test_gluon_gelu_gemm_on_hopper_is_the_triton_kernel():
    """The Gluon c_fc + GELU kernel gives the Triton GELU GEMM's bits (same erf formula and
    rounding points) at full decoder width, ragged row counts included."""
    from turbopart.nn.kernels import decoder_triton as K
    from turbopart.nn.kernels import gelu_gemm_gluon as G
    x0 = torch.empty(1, device="cuda")
    if not G.available(x0):
        pytest.skip("Gluon's Hopper API or an sm_90 GPU is missing")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(4096, 1024, generator=g, device="cuda") * 0.03).bfloat16()
    b = (torch.randn(4096, generator=g, device="cuda") * 0.02).bfloat16()
    for m in (1, 1000, 37000):
        x = torch.randn(m, 1024, generator=g, device="cuda").bfloat16()
        out = K.linear(x, w, b, K.EPI_GELU, mode="gluon")
        assert torch.equal(out, K.linear(x, w, b, K.EPI_GELU, mode="pers")), m
        ref = K.linear_ref(x, w, b, K.EPI_GELU)
        assert (out != ref).float().mean().item() < 1e-3, m
    assert "linear_gluon" not in K.disabled(), K.disabled()


@needs_gpu
def test_attention_kernel_both_softmax_paths_on_cuda(monkeypatch):
    """The score-bound tiles and the online softmax (bound over the limit, or switched off)
    both compile and agree with SDPA; no kernel is switched off."""
    from turbopart.nn.kernels import decoder_triton as K
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, D, n = 2, 16, 1024, 64, 3000
    k = F.layer_norm(torch.randn(B, H, T, D, generator=g, device="cuda"), (D,)).bfloat16()
    v = torch.randn(B, H, T, D, generator=g, device="cuda").bfloat16()
    q = torch.randn(n, H * D, generator=g, device="cuda").bfloat16()
    qw = torch.ones(D, device="cuda")
    qb = torch.zeros(D, device="cuda")
    ref = K.attention_ref(q, k, v, qw, qb, 1e-6, n).float()
    for switch in ("1", "0"):
        monkeypatch.setenv("TURBOPART_DECODER_SCORE_BOUND", switch)
        out = K.attention(q, k, v, qw, qb, 1e-6, n).float()
        assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert "attention" not in K.disabled(), K.disabled()


@needs_gpu
def test_fused_path_on_cuda_matches_eager():
    model = _fused_model(torch.bfloat16).cuda()
    geo = model.geo_decoder
    g = torch.Generator(device="cuda").manual_seed(0)
    dec = model.decode(torch.randn(2, 64, 8, generator=g, device="cuda").bfloat16())
    kv = geo.precompute_kv(dec)
    pts = torch.rand(2, 5000, 3, generator=g, device="cuda", dtype=torch.float64) * 2 - 1
    geo.kernel = "eager"
    ref = geo.query(pts, kv)
    geo.kernel = "fused"
    for attn in ("triton", "sdpa"):
        for gemm in vae_mod.GEMM_CHOICES:
            geo.fused_options = vae_mod.FusedOptions(attn, gemm)
            out = geo.query(pts, kv, max_rows=4096)
            torch.testing.assert_close(out.float(), ref.float(), rtol=0,
                                       atol=0.02 * max(1.0, ref.float().abs().max().item()))
    assert not geo.failed_modes


# --------------------------------------------------------------------------- head LayerNorm

def _bf16_ulps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x − y| in bf16 ulps of y (bit distance of same-sign values)."""
    a = x.view(torch.int16).int()
    b = y.view(torch.int16).int()
    return (a - b).abs()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the head LayerNorm kernel runs on "
                    "CUDA (its interpreter check is test_head_norm_kernel_in_interpreter)")
def test_head_norm_kernel_equals_torch_on_gpu():
    _check_head_norm(torch.device("cuda"))


def test_head_norm_kernel_in_interpreter():
    pytest.importorskip("triton")
    run_in_triton_interpreter(textwrap.dedent("""
        import torch
        from test_vae import _check_head_norm
        _check_head_norm(torch.device("cpu"))
        print("ok")
    """))


def _check_head_norm(dev):
    """q_norm / k_norm as one Triton pass (fast) against the PyTorch ops: the k half of a
    fused k/v output (strided heads), bf16 and fp32 results, same rounding points."""
    from torch import nn
    from turbopart.nn.kernels import rownorm
    from turbopart.xpart.vae_blocks import head_norm, layer_norm
    g = torch.Generator(device=dev).manual_seed(0)
    b, n, h, d = 2, 37, 4, 64
    kv = (3 * torch.randn(b, n, h, 2, d, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    ln = nn.LayerNorm(d, eps=1e-6).to(dev)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(d, device=dev, generator=g))
        ln.bias.copy_(0.1 * torch.randn(d, device=dev, generator=g))
    k = kv[..., 0, :]
    ref = layer_norm(k, ln).to(torch.bfloat16)
    got = head_norm(k, ln, torch.bfloat16, fused=True)
    assert got.shape == (b, n, h, d) and got.is_contiguous()
    ulps = _bf16_ulps(got, ref)
    assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.02
    out32 = torch.empty(b * n, h, d, device=dev)
    rownorm.ln_heads(k.view(b * n, h, d), ln.weight, ln.bias, 1e-6, out32)
    assert torch.allclose(out32.view(b, n, h, d), layer_norm(k, ln), atol=2e-5, rtol=2e-5)
    v0 = kv[..., 1, :].clone()
    heads = kv.view(b * n, h, 2, d)[:, :, 0]              # strided [rows, H, d] view
    rownorm.ln_heads(heads, ln.weight, ln.bias, 1e-6, heads)  # in place
    assert torch.equal(kv[..., 1, :], v0)
    assert int(_bf16_ulps(kv[..., 0, :], ref).max()) <= 1


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter runs the kernel on the CPU")
def test_head_norm_without_kernels_is_the_torch_ops():
    """On the CPU (no interpreter), and for exact (fused=False), head_norm is exactly the
    official op sequence."""
    from torch import nn
    from turbopart.xpart.vae_blocks import head_norm, layer_norm
    x = torch.randn(2, 5, 3, 2, 16, generator=torch.Generator().manual_seed(1))[..., 0, :]
    ln = nn.LayerNorm(16, eps=1e-6)
    for fused in (False, True):
        assert torch.equal(head_norm(x.bfloat16(), ln, torch.bfloat16, fused),
                           layer_norm(x.bfloat16(), ln).to(torch.bfloat16))
