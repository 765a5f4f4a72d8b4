"""Sonata (PTv3 encoder): transform, serialization, sparse conv, patches, model, golden parity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MANIFESTS, case_path, needs_gpu
from turbopart.sonata import Sonata, SonataConfig, point_features
from turbopart.sonata import serialization as ser
from turbopart.sonata.sparse_conv import (build_neighbour_table, kernel_offsets,
                                          neighbour_pairs, submanifold_conv)
from turbopart.sonata.structure import build_plan, grid_pool, patch_partition
from turbopart.sonata.transform import center_shift, fnv64, grid_sample, prepare_input

TINY = dict(enc_depths=(2, 2, 2, 2, 2), enc_channels=(8, 8, 16, 16, 24),
            enc_num_head=(1, 1, 2, 2, 2), enc_patch_size=(64,) * 5, enable_flash=False)


# --------------------------------------------------------------------------- references

def ref_morton(x: int, y: int, z: int, depth: int) -> int:
    v = 0
    for i in range(depth):
        v |= ((x >> i) & 1) << (3 * i + 2) | ((y >> i) & 1) << (3 * i + 1) | \
             ((z >> i) & 1) << (3 * i)
    return v


def ref_hilbert(x: int, y: int, z: int, depth: int) -> int:
    """Spec p3sam §2.6 step by step, one bit at a time (slow reference)."""
    g = [[(c >> (depth - 1 - b)) & 1 for b in range(depth)] for c in (x, y, z)]
    for b in range(depth):
        for d in range(3):
            for lo in range(b + 1, depth):
                if g[d][b]:
                    g[0][lo] ^= 1
                else:
                    g[0][lo], g[d][lo] = g[d][lo], g[0][lo]
    bits = [g[d][b] for b in range(depth) for d in range(3)]
    acc, v = 0, 0
    for bit in bits:
        acc ^= bit
        v = (v << 1) | acc
    return v


def ref_fnv_numpy(g: np.ndarray) -> np.ndarray:
    a = g.astype(np.uint64)
    h = np.full(len(a), np.uint64(14695981039346656037), dtype=np.uint64)
    for j in range(3):
        h = h * np.uint64(1099511628211)
        h = np.bitwise_xor(h, a[:, j])
    return h


def random_cloud(n: int, seed: int, dtype=torch.float64, radius: float = 0.08):
    """Points on a slightly squashed sphere: a surface-like cloud with voxel neighbours."""
    g = torch.Generator().manual_seed(seed)
    d = F.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=1)
    pts = d * radius * torch.tensor([1.0, 0.8, 0.6], dtype=torch.float64)
    return pts.to(dtype), d.to(dtype)


def tiny_model(seed: int = 0, **over) -> Sonata:
    cfg = SonataConfig.tiny(**over)
    assert SonataConfig.tiny() == SonataConfig(**TINY)
    model = Sonata(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                std = min(max(fan_in ** -0.5, 0.02), 0.2)
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


# --------------------------------------------------------------------------- config

def test_config_roundtrip_and_sizes():
    cfg = SonataConfig()
    assert cfg.out_channels == 1232 and cfg.num_stages == 5 and cfg.scale(0) == 0.25
    off = cfg.to_official()
    assert off["enc_channels"] == [48, 96, 192, 384, 512] and off["drop_path"] == 0.3
    assert SonataConfig.from_official(off) == cfg
    assert SonataConfig.from_official(None) == cfg
    tiny = SonataConfig.from_official({**TINY, "order": ["z", "hilbert"], "unknown": 1})
    assert tiny.order == ("z", "hilbert") and tiny.out_channels == 72
    with pytest.raises(ValueError):
        SonataConfig(order=("peano",))


def test_state_dict_matches_manifest():
    with torch.device("meta"):
        model = Sonata(SonataConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == 453
    assert ours["enc.enc0.block0.cpe.0.weight"] == (48, 3, 3, 3, 48)
    assert sum(p.numel() for p in model.parameters()) == 108_461_376
    if MANIFESTS is None:
        pytest.skip("needs ../shared manifests")
    man = json.loads((MANIFESTS / "p3sam.json").read_text())["state_dict"]
    ref = {k[len("sonata."):]: tuple(v["shape"]) for k, v in man.items()
           if k.startswith("sonata.")}
    assert ours == ref


# --------------------------------------------------------------------------- serialization

@pytest.mark.parametrize("depth", list(range(1, 17)))
def test_morton_and_hilbert_match_per_bit_reference(depth):
    g = torch.Generator().manual_seed(depth)
    coords = torch.randint(0, 2 ** depth, (64, 3), generator=g)
    z = ser.morton_code(coords)
    zt = ser.morton_code(coords, trans=True)
    h = ser.hilbert_code(coords, depth)
    ht = ser.hilbert_code(coords, depth, trans=True)
    for i, (x, y, w) in enumerate(coords.tolist()):
        assert z[i] == ref_morton(x, y, w, depth)
        assert zt[i] == ref_morton(y, x, w, depth)
        assert h[i] == ref_hilbert(x, y, w, depth)
        assert ht[i] == ref_hilbert(y, x, w, depth)
    both = ser.encode_orders(coords, depth, ("hilbert-trans", "z", "hilbert", "z-trans"))
    assert torch.equal(both, torch.stack([ht, z, h, zt]))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_hilbert_is_a_continuous_bijection_on_the_cube(depth):
    r = torch.arange(2 ** depth)
    cube = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    h = ser.hilbert_code(cube, depth)
    assert torch.equal(torch.sort(h).values, torch.arange(8 ** depth))
    path = cube[torch.argsort(h)]
    steps = (path[1:] - path[:-1]).abs().sum(1)
    assert torch.all(steps == 1)  # a Hilbert curve moves to a face neighbour every step


def test_serialize_orders_perm_and_batch():
    g = torch.Generator().manual_seed(3)
    coords = torch.unique(torch.randint(0, 300, (2000, 3), generator=g), dim=0)
    depth = ser.depth_for(int(coords.max()))
    code, order, inverse = ser.serialize(coords, depth, ("z", "z-trans", "hilbert",
                                                         "hilbert-trans"), [2, 0, 3, 1])
    assert torch.equal(code[1], ser.morton_code(coords))
    assert torch.equal(code[0], ser.hilbert_code(coords, depth))
    ar = torch.arange(coords.shape[0])
    for j in range(4):
        assert torch.all(code[j][order[j]][1:] > code[j][order[j]][:-1])
        assert torch.equal(order[j][inverse[j]], ar)
    batch = torch.ones(coords.shape[0], dtype=torch.long)
    assert torch.equal(ser.encode(coords, depth, "z", batch),
                       ser.morton_code(coords) | (1 << (3 * depth)))
    assert ser.depth_for(0) == 1 and ser.depth_for(255) == 9 and ser.depth_for(400) == 9


# --------------------------------------------------------------------------- transform

def test_fnv_hash_and_voxel_order_match_numpy():
    g = np.random.default_rng(0).integers(0, 60000, (5000, 3))
    g[:100] = g[100:200]  # repeated voxels
    g -= g.min(0)
    ref = ref_fnv_numpy(g)
    ours = fnv64(torch.from_numpy(g)).numpy().view(np.uint64)
    assert np.array_equal(ours, ref)
    pts = torch.from_numpy(g.astype(np.float64) * 0.005 + 0.0025)
    gs = grid_sample(pts, 0.005, generator=torch.Generator().manual_seed(1))
    keys, inv = np.unique(ref, return_inverse=True)
    assert torch.equal(gs.inverse, torch.from_numpy(inv.reshape(-1)).long())
    # every representative lies in its own voxel, voxels in ascending unsigned key order
    assert torch.equal(gs.inverse[gs.index], torch.arange(len(keys)))
    assert torch.equal(gs.grid_coord, torch.from_numpy(g)[gs.index])


def test_prepare_input_shapes_dtypes_and_determinism():
    pts, nrm = random_cloud(3000, 0)
    a = prepare_input(pts, nrm, generator=torch.Generator().manual_seed(5))
    b = prepare_input(pts.numpy(), nrm.numpy(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.index, b.index)
    m = a.coord.shape[0]
    assert a.feat.shape == (m, 9) and a.feat.dtype == torch.float32
    assert torch.all(a.color == torch.tensor(1 / 255, dtype=torch.float32))
    assert a.shifted_points.dtype == torch.float64 and a.offset.tolist() == [m]
    sp = a.shifted_points
    assert float(sp[:, 2].min()) == 0.0
    assert abs(float(sp[:, 0].min() + sp[:, 0].max())) < 1e-12
    assert torch.equal(a.feat[:, :3], sp[a.index].float())
    assert torch.equal(a.feat[:, 6:], nrm[a.index].float())
    # float32 input: the shift is computed in float32 (NumPy float32 arithmetic)
    p32 = pts.float()
    s32 = center_shift(p32)
    mn, mx = p32.min(0).values, p32.max(0).values
    expect = p32 - torch.stack([(mn[0] + mx[0]) / 2, (mn[1] + mx[1]) / 2, mn[2]])
    assert s32.dtype == torch.float32 and torch.equal(s32, expect)


# --------------------------------------------------------------------------- sparse conv

def _dense_reference(coords, feats, weight, bias):
    size = int(coords.max()) + 1
    c_in = feats.shape[1]
    vol = torch.zeros(1, c_in, size, size, size, dtype=feats.dtype)
    vol[0, :, coords[:, 0], coords[:, 1], coords[:, 2]] = feats.t()
    out = F.conv3d(vol, weight.permute(0, 4, 1, 2, 3), bias, padding=1)
    return out[0, :, coords[:, 0], coords[:, 1], coords[:, 2]].t()


def test_single_voxel_pair_identity_for_every_offset():
    c = 4
    p = torch.tensor([5, 6, 7])
    for r in range(27):
        i, j, k = r // 9, (r // 3) % 3, r % 3
        q = p + torch.tensor([i - 1, j - 1, k - 1])
        coords = torch.stack([p, q]) if r != 13 else p[None]
        feats = torch.zeros(coords.shape[0], c, dtype=torch.float64)
        feats[-1] = torch.arange(1.0, c + 1, dtype=torch.float64)
        w = torch.zeros(c, 3, 3, 3, c, dtype=torch.float64)
        w[:, i, j, k, :] = torch.eye(c, dtype=torch.float64)
        table = build_neighbour_table(coords)
        for pairs in (None, neighbour_pairs(table)):
            out = submanifold_conv(feats, table, w, None, pairs=pairs)
            assert torch.equal(out[0], feats[-1]), r  # the input at p + offset appears at p
            if r != 13:
                assert torch.equal(out[1], torch.zeros(c, dtype=torch.float64)), r
    assert kernel_offsets()[13].tolist() == [0, 0, 0]


def test_sparse_conv_equals_dense_conv3d_and_chunking():
    g = torch.Generator().manual_seed(0)
    occ = torch.rand(9, 9, 9, generator=g) < 0.35
    coords = occ.nonzero()
    coords = coords[torch.randperm(coords.shape[0], generator=g)]
    c_in, c_out = 5, 7
    feats = torch.randn(coords.shape[0], c_in, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, 3, 3, 3, c_in, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    table = build_neighbour_table(coords)
    ours = submanifold_conv(feats, table, w, b)
    ref = _dense_reference(coords, feats, w, b)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    chunked = submanifold_conv(feats, table, w, b, rows_per_chunk=7)
    torch.testing.assert_close(chunked, ref, rtol=1e-12, atol=1e-12)
    paired = submanifold_conv(feats, table, w, b, pairs=neighbour_pairs(table))
    torch.testing.assert_close(paired, ref, rtol=1e-12, atol=1e-12)
    # batches never see each other
    batch = torch.zeros(coords.shape[0], dtype=torch.long)
    two = torch.cat([coords, coords])
    tb = build_neighbour_table(two, torch.cat([batch, batch + 1]))
    out2 = submanifold_conv(torch.cat([feats, feats]), tb, w, b)
    torch.testing.assert_close(out2, torch.cat([ref, ref]), rtol=1e-12, atol=1e-12)


def test_encoder_dense_and_pair_conv_formulations_agree():
    """The GPU (dense gather-GEMM) and CPU (per-offset pairs) paths give the same encoder."""
    model = tiny_model(7)
    pts, nrm = random_cloud(1500, 10)
    inp = prepare_input(pts, nrm, generator=torch.Generator().manual_seed(0))
    perms = [[3, 1, 0, 2]] * 5
    outs = []
    for pairs in (False, True):
        plans = build_plan(inp.grid_coord, model.config, perms, conv_pairs=pairs)
        assert (plans[0].conv_pairs is not None) == pairs
        with torch.no_grad():
            enc = model(inp.feat, plans, "exact")
            outs.append(model.multiscale(enc.feats, plans))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_grid_pool_matches_unique_rows():
    g = torch.Generator().manual_seed(1)
    coords = torch.unique(torch.randint(0, 500, (4000, 3), generator=g), dim=0)
    coords = coords[torch.randperm(coords.shape[0], generator=g)]
    ours, inv, counts = grid_pool(coords, 2)
    ref, rinv, rcounts = torch.unique(coords // 2, dim=0, sorted=True, return_inverse=True,
                                      return_counts=True)
    assert torch.equal(ours, ref) and torch.equal(inv, rinv) and torch.equal(counts, rcounts)


# --------------------------------------------------------------------------- patches

def _official_pad(n: int, k: int) -> list[int]:
    """Spec §2.8 in words: pad n up to a multiple of k, tail slots repeat k positions back."""
    if n <= k:
        return list(range(n))
    q = -(-n // k)
    slots = list(range(q * k))
    r = n % k
    if r:
        for s in range((q - 1) * k + r, q * k):
            slots[s] = s - k
    return slots


@pytest.mark.parametrize("n", [1, 63, 1000, 1024, 1025, 2500, 4096])
def test_patch_partition(n):
    pad, q, k = patch_partition(n, 1024)
    assert k == min(n, 1024) and q == -(-n // k) and pad.shape[0] == q * k
    assert pad.tolist() == _official_pad(n, 1024)
    patches = pad.view(q, k)
    for p in range(q):
        assert len(set(patches[p].tolist())) == k  # no token twice in a patch
    if q > 1:
        assert sorted(patches[-1].tolist()) == list(range(n - k, n))  # the last k tokens
        for p in range(q - 1):
            assert patches[p].tolist() == list(range(p * k, (p + 1) * k))
    # position i reads slot i, which holds position i
    assert torch.equal(pad[:n], torch.arange(n))


# --------------------------------------------------------------------------- model

def _naive_encoder_stage0_block0(model, inp, plans):
    """Independent fp64 evaluation of embedding + stage-0 block 0 (dense ops, loops)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    x = F.gelu(F.layer_norm(F.linear(inp.feat.double(), sd["embedding.stem.linear.weight"],
                                     sd["embedding.stem.linear.bias"]), (cfg.enc_channels[0],),
                            sd["embedding.stem.norm.weight"], sd["embedding.stem.norm.bias"]))
    p = "enc.enc0.block0."
    c = cfg.enc_channels[0]
    conv = _dense_reference(plans[0].grid_coord, x, sd[p + "cpe.0.weight"], sd[p + "cpe.0.bias"])
    conv = F.layer_norm(F.linear(conv, sd[p + "cpe.1.weight"], sd[p + "cpe.1.bias"]), (c,),
                        sd[p + "cpe.2.weight"], sd[p + "cpe.2.bias"])
    x = x + conv
    h = F.layer_norm(x, (c,), sd[p + "norm1.0.weight"], sd[p + "norm1.0.bias"])
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    heads = cfg.enc_num_head[0]
    d = c // heads
    n = x.shape[0]
    order = plans[0].order[0].tolist()
    k = min(n, cfg.enc_patch_size[0])
    out = torch.zeros(n, c, dtype=torch.float64)
    for pos in range(n):
        q = -(-n // k)
        start = pos // k * k if pos < (q - 1) * k else n - k  # the last patch: last k
        members = order[start:start + k]
        tok = order[pos]
        for hh in range(heads):
            qv = qkv[tok, hh * d:(hh + 1) * d]
            kk = qkv[members, c + hh * d:c + (hh + 1) * d]
            vv = qkv[members, 2 * c + hh * d:2 * c + (hh + 1) * d]
            att = torch.softmax(kk @ qv * cfg.scale(0), 0)
            out[tok, hh * d:(hh + 1) * d] = att @ vv
    a = F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    return conv, a


def test_block_matches_naive_reference():
    model = tiny_model(1)
    pts, nrm = random_cloud(700, 2)
    inp = prepare_input(pts, nrm, generator=torch.Generator().manual_seed(0))
    perms = [[1, 0, 3, 2]] * 5
    feats = point_features(model, pts, nrm, numerics="exact", voxel_choice=inp.index,
                           perms=[torch.tensor(p) for p in perms], debug=True)
    plans = build_plan(inp.grid_coord, model.config, perms)
    conv, attn = _naive_encoder_stage0_block0(model, inp, plans)
    torch.testing.assert_close(feats.debug["stage0.block0.cpe_out"].double(), conv,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats.debug["stage0.block0.attn_out"].double(), attn,
                               rtol=1e-4, atol=1e-5)


def test_point_features_head_determinism_and_other_configs():
    pts, nrm = random_cloud(1500, 4)
    for over in ({}, {"order": ("hilbert", "z"), "enc_depths": (1, 3, 2),
                      "enc_channels": (8, 16, 24), "enc_num_head": (2, 2, 3),
                      "enc_patch_size": (100, 50, 300), "stride": (2, 2)},
                 {"shuffle_orders": False, "enc_patch_size": (4096,) * 5}):
        model = tiny_model(2, **over)
        cfg = model.config
        a = point_features(model, pts, nrm, numerics="exact",
                           generator=torch.Generator().manual_seed(9))
        b = point_features(model, pts.float(), nrm.float(), numerics="fast",
                           generator=torch.Generator().manual_seed(9))
        assert a.point_feat.shape == (1500, cfg.out_channels)
        assert a.voxel_feat.shape[1] == cfg.out_channels
        assert torch.equal(a.point_feat, a.voxel_feat[a.inverse])
        assert torch.isfinite(a.point_feat).all()
        torch.testing.assert_close(a.point_feat, b.point_feat, rtol=1e-3, atol=1e-3)
    head = torch.nn.Sequential(torch.nn.Linear(cfg.out_channels, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 5))
    c = point_features(model, pts, nrm, head=head, numerics="exact",
                       generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(c.point_feat, head(a.voxel_feat)[a.inverse])
    c2 = point_features(model, pts, nrm, head=head, numerics="exact",
                        generator=torch.Generator().manual_seed(9))
    assert torch.equal(c.point_feat, c2.point_feat)


def test_flash_numerics_casts_attention_to_fp16():
    pts, nrm = random_cloud(1200, 6)
    plain = tiny_model(3)
    flash = tiny_model(3, enable_flash=True)
    kw = dict(numerics="exact", generator=torch.Generator().manual_seed(1))
    a = point_features(plain, pts, nrm, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    b = point_features(flash, pts, nrm, **kw)
    diff = (a.point_feat - b.point_feat).abs().max()
    assert 0 < diff < 2e-2  # fp16 q/k/v moves features a little, nothing more


def test_bf16_compute_path_runs(monkeypatch):
    """The fast CUDA dtype mix (bf16 matmuls, fp32 residual) exercised on the CPU."""
    import turbopart.sonata.features as feats_mod
    import turbopart.sonata.model as model_mod
    model = tiny_model(4)
    pts, nrm = random_cloud(1500, 7)
    ref = point_features(model, pts, nrm, numerics="exact",
                         generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(model_mod, "compute_dtype", lambda n, d: torch.bfloat16)
    monkeypatch.setattr(feats_mod, "compute_dtype", lambda n, d: torch.bfloat16)
    out = point_features(model, pts, nrm, numerics="fast",
                         generator=torch.Generator().manual_seed(2))
    assert out.point_feat.dtype == torch.bfloat16
    err = (out.point_feat.float() - ref.point_feat).abs().max()
    assert err < 0.1 * ref.point_feat.abs().max()
    # bf16-stored weights (what the loader gives ``fast``) work as well
    from turbopart.runtime.precision import param_dtypes
    dt = param_dtypes(model, "fast", "cuda")
    assert dt["enc.enc0.block0.cpe.0.weight"] == torch.bfloat16
    assert dt["embedding.stem.linear.weight"] == torch.float32
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.data = p.data.to(dt[k])
    out2 = point_features(model, pts, nrm, numerics="fast",
                          generator=torch.Generator().manual_seed(2))
    assert (out2.point_feat.float() - ref.point_feat).abs().max() < 0.1 * ref.point_feat.abs().max()


# --------------------------------------------------------------------------- golden

def test_golden_sonata_case():
    from turbopart import golden
    path = case_path("sonata")
    case = golden.load_case(path)
    from turbopart.golden import sonata as runner
    outputs = runner.run(case)
    checks = golden.compare(case, outputs)
    bad = [(c.name, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) == len(case.outputs)


def _tiny_head(case, prefix: str, width_in: int) -> torch.nn.Module:
    w = case.prefixed(prefix)
    hidden, out = w["0.weight"].shape[0], w["4.weight"].shape[0]
    head = torch.nn.Sequential(torch.nn.Linear(width_in, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, out))
    head.load_state_dict(w)
    return head


def test_golden_p3sam_features_with_head():
    """P3-SAM's get_feat (float64 points, 1232→512-style MLP head) = output.feats."""
    from turbopart import golden
    case = golden.load_case(case_path("p3sam"))
    model = Sonata(SonataConfig.from_official(case.config["sonata"]))
    model.load_state_dict(case.prefixed("weight.sonata."))
    head = _tiny_head(case, "weight.mlp.", model.config.out_channels)
    perms = [case.rng(f"shuffle_orders_perm.{s}") for s in range(5)]
    out = point_features(model, case.input("points"), case.input("normals"), head=head,
                         numerics="exact", voxel_choice=case.rng("gridsample_index"),
                         perms=perms)
    torch.testing.assert_close(out.point_feat, case.tensors["output.feats"], rtol=1e-4,
                               atol=1e-4)
    assert torch.equal(out.shifted_points, case.tensors["output.points_after_get_feat"])


def test_golden_conditioner_float32_features():
    """The conditioner's seg-feature extractor on float32 points = output.sonata_point_feat."""
    from turbopart import golden
    case = golden.load_case(case_path("conditioner"))
    model = Sonata(SonataConfig.from_official(case.meta["config_sonata"]))
    model.load_state_dict(case.prefixed("weight.seg_feat_encoder.sonata."))
    head = _tiny_head(case, "weight.seg_feat_encoder.mlp.", model.config.out_channels)
    obj = case.input("object_surface")[0]
    assert obj.dtype == torch.float32
    perms = [case.rng(f"sonata.shuffle_orders_perm.{s}") for s in range(5)]
    out = point_features(model, obj[:, :3], obj[:, 3:6], head=head, numerics="exact",
                         voxel_choice=case.rng("sonata.gridsample_index"), perms=perms)
    torch.testing.assert_close(out.point_feat, case.tensors["output.sonata_point_feat"][0],
                               rtol=1e-4, atol=1e-4)
    assert out.shifted_points.dtype == torch.float32


def test_generator_draws_official_cli_shuffles_first():
    model = tiny_model(6)
    pts, nrm = random_cloud(500, 9)
    out = point_features(model, pts, nrm, numerics="exact",
                         generator=torch.Generator().manual_seed(42), debug=True)
    perms = [out.debug[f"stage{s}.perm"].tolist() for s in range(5)]
    # spec p3sam §2.7: torch.manual_seed(42) then 5 x randperm(4)
    assert perms == [[2, 3, 0, 1], [2, 1, 3, 0], [0, 3, 2, 1], [1, 2, 0, 3], [2, 1, 3, 0]]
    fixed = point_features(tiny_model(6, shuffle_orders=False), pts, nrm, debug=True)
    assert all(fixed.debug[f"stage{s}.perm"].tolist() == [0, 1, 2, 3] for s in range(5))


@needs_gpu
def test_cuda_matches_cpu():
    model = tiny_model(5)
    pts, nrm = random_cloud(5000, 8)
    kw = dict(numerics="exact", generator=torch.Generator().manual_seed(3))
    ref = point_features(model, pts, nrm, **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    gpu = point_features(model.cuda(), pts.cuda(), nrm.cuda(), **kw)
    torch.testing.assert_close(gpu.point_feat.cpu(), ref.point_feat, rtol=1e-3, atol=1e-3)
    fast = point_features(model, pts.cuda(), nrm.cuda(), numerics="fast",
                          generator=torch.Generator().manual_seed(3))
    assert (fast.point_feat.float().cpu() - ref.point_feat).abs().max() < \
        0.1 * ref.point_feat.abs().max()
