"""Conditioner: layout, golden parity, explicit draws, the cdist-free nearest-point search."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import MANIFESTS, case_path, needs_gpu
from turbopart import weights
from turbopart.xpart import conditioner as cond_mod
from turbopart.xpart.nearest import nearest_neighbors


def _manifest(name):
    if MANIFESTS is None:
        pytest.skip("needs ../shared/golden/manifests")
    with open(MANIFESTS / f"{name}.json") as f:
        return {k: tuple(v["shape"]) for k, v in json.load(f)["state_dict"].items()}


# --------------------------------------------------------------------------- layout

def test_layout_matches_manifest():
    assert weights.layout("conditioner") == _manifest("conditioner")


def test_skip_unused_omits_decoders_pre_kl_and_mask_token():
    full = weights.layout("conditioner")
    sd = weights.build("conditioner", skip_unused=True).state_dict()
    keys = set(sd)
    assert keys <= set(full)
    unused = ("pre_kl.", "post_kl.", "transformer.", "geo_decoder.")
    expect_missing = {k for k in full if k not in keys}
    assert "seg_feat_encoder.sonata.embedding.mask_token" in expect_missing
    for k in expect_missing:
        tail = k.replace("geo_encoder.local_encoder.", "").replace("obj_encoder.", "")
        assert tail.startswith(unused) or k.endswith("mask_token"), k
    kept = sum(v.numel() for v in sd.values())
    dropped = sum(torch.Size(full[k]).numel() for k in expect_missing)
    assert 0.42e9 < dropped < 0.44e9  # spec §1.5: ~0.43 B parameters not loaded
    assert kept + dropped == 768_258_114


def test_tiny_config_matches_golden_case_layout():
    cfg = cond_mod.tiny_config()
    lay = weights.layout("conditioner", cfg)
    path = case_path("conditioner")
    with open(path) as f:
        tensors = json.load(f)["tensors"]
    want = {k[len("weight."):]: tuple(v["shape"]) for k, v in tensors.items()
            if k.startswith("weight.")}
    assert lay == want


# --------------------------------------------------------------------------- golden

def _golden():
    from turbopart.golden import load_case
    from turbopart.golden.conditioner import case_config, load_conditioner
    case = load_case(case_path("conditioner"))
    return case, load_conditioner(case_config(case), case.prefixed("weight."))


def test_golden_conditioner():
    from turbopart.golden import compare
    from turbopart.golden.conditioner import run
    case, _ = _golden()
    checks = compare(case, run(case))
    bad = [(c.name, c.max_abs, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) == 12


def test_object_tokens_by_fps_index_equal_the_search():
    case, model = _golden()
    parts = case.input("part_surface_inbbox")
    obj = case.input("object_surface")
    draws = cond_mod.ConditionerDraws.from_rng(case.prefixed("rng."), model, parts.shape[0])
    fast = model(parts, obj, draws=draws, obj_match="index", return_intermediates=True)
    slow = model(parts, obj, draws=draws, obj_match="search", return_intermediates=True)
    assert torch.equal(fast["nearest_global_matches"], slow["nearest_global_matches"])
    assert torch.equal(fast["nearest_global_matches"], case.outputs["nearest_global_matches"])
    assert torch.equal(fast["obj_cond"], slow["obj_cond"])
    # one object copy or the official expanded [K, N, 7] view: same result
    exp = model(parts, obj.expand(parts.shape[0], -1, -1), draws=draws)
    assert torch.equal(exp["geo_cond"], fast["geo_cond"])
    assert set(exp) == {"obj_cond", "geo_cond"}


def test_random_draws_are_explicit_and_deterministic():
    case, model = _golden()
    parts = case.input("part_surface_inbbox")
    obj = case.input("object_surface")[0]

    def call(seed):
        return model(parts, obj, generator=torch.Generator().manual_seed(seed),
                     sonata_generator=torch.Generator().manual_seed(seed))
    a, b, c = call(1), call(1), call(2)
    assert torch.equal(a["obj_cond"], b["obj_cond"]) and torch.equal(a["geo_cond"], b["geo_cond"])
    assert not torch.equal(a["geo_cond"], c["geo_cond"])
    assert a["obj_cond"].shape == (3, 20, 40) and a["geo_cond"].shape == (3, 24, 48)
    # draws made by ConditionerDraws.complete follow the official order and sizes
    d = cond_mod.ConditionerDraws().complete(model, 3, torch.device("cpu"),
                                             torch.Generator().manual_seed(5))
    assert d.geo_randperm.shape == (1024,) and d.obj_randperm.shape == (1024,)
    assert d.geo_fps_start.max() < 480 and d.obj_fps_start.max() < 400


def test_batched_fps_equals_separate_runs():
    """Both encoders' FPS run as one batched loop; the picks equal per-encoder runs."""
    case, model = _golden()
    parts = case.input("part_surface_inbbox")
    obj = case.input("object_surface")[0]
    draws = cond_mod.ConditionerDraws.from_rng(case.prefixed("rng."), model, 3)
    both = model._sample(parts, obj[:, :3], draws)
    geo = model.geo_vae.encoder.sample(parts[..., :3], draws.geo_randperm, draws.geo_fps_start)
    objs = model.obj_encoder.encoder.sample(obj[None, :, :3], draws.obj_randperm,
                                            draws.obj_fps_start)
    assert torch.equal(both["geo"].query_idx, geo.query_idx)
    assert torch.equal(both["obj"].query_idx, objs.query_idx)
    rec = case.rng("geo.fps_index").view(3, -1) - torch.arange(3)[:, None] * 480
    assert torch.equal(geo.query_idx, rec)
    rec = case.rng("obj.fps_index").view(3, -1) - torch.arange(3)[:, None] * 400
    assert torch.equal(objs.query_idx, rec)
    replay = cond_mod.ConditionerDraws.from_rng(case.prefixed("rng."), model, 3, picks=True)
    assert torch.equal(model._sample(parts, obj[:, :3], replay)["obj"].query_idx, rec)


# --------------------------------------------------------------------------- nearest points

@pytest.mark.parametrize("seed", [0, 1])
def test_nearest_neighbors_equals_argmin_of_cdist(seed):
    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(6000, 3, generator=g) * 2 - 1).half().float()   # fp16 grid: duplicates
    pts = torch.cat([pts, pts[:1500], pts[:200]])[torch.randperm(7700, generator=g)]
    queries = torch.cat([pts[torch.randint(0, len(pts), (3, 300), generator=g)],
                         torch.rand(3, 200, 3, generator=g) * 2.2 - 1.1], dim=1)
    ref = torch.argmin(torch.cdist(queries, pts.expand(3, -1, -1)), dim=-1)
    for rows in (None, 257, 64):
        assert torch.equal(nearest_neighbors(queries, pts, max_rows=rows), ref)
    # duplicates: the first (lowest) index wins, as in argmin
    dup = torch.tensor([[0.5, 0.5, 0.5]] * 30 + [[0.1, 0.2, 0.3]])
    q = torch.tensor([[[0.5, 0.5, 0.5], [0.1, 0.2, 0.31]]])
    assert nearest_neighbors(q, dup).tolist() == [[0, 30]]
    # tiny inputs take cdist's direct formula
    small = pts[:20]
    qs = queries[:, :10]
    assert torch.equal(nearest_neighbors(qs, small),
                       torch.argmin(torch.cdist(qs, small.expand(3, -1, -1)), dim=-1))


@needs_gpu
def test_nearest_neighbors_fused_kernel_on_cuda():
    """fast's one-kernel search against the chunked cuBLAS formula: the same point, except
    where two points are (nearly) equally far (the five-term sum may round differently)."""
    g = torch.Generator().manual_seed(3)
    pts = (torch.rand(81920, 3, generator=g) * 2 - 1).half().float()   # duplicates
    queries = torch.cat([pts[torch.randint(0, len(pts), (4, 1500), generator=g)],
                         torch.rand(4, 500, 3, generator=g) * 2.2 - 1.1], dim=1)
    pts, queries = pts.cuda(), queries.cuda()
    ref = nearest_neighbors(queries, pts)
    got = nearest_neighbors(queries, pts, fused=True)
    assert got.shape == ref.shape and got.dtype == torch.long
    diff = got != ref
    assert float(diff.float().mean()) < 1e-3
    q = queries[diff]
    d_got = (pts[got[diff]] - q).norm(dim=-1)
    d_ref = (pts[ref[diff]] - q).norm(dim=-1)
    assert torch.allclose(d_got, d_ref, rtol=1e-5, atol=1e-6)
    # exact duplicates: the first index wins, as in argmin
    dup = torch.tensor([[0.5, 0.5, 0.5]] * 300 + [[0.1, 0.2, 0.3]], device="cuda")
    qd = torch.tensor([[[0.5, 0.5, 0.5], [0.1, 0.2, 0.31]]], device="cuda")
    assert nearest_neighbors(qd, dup, fused=True).tolist() == [[0, 300]]


@needs_gpu
def test_graphed_fps_is_bit_identical_on_cuda():
    from turbopart.geometry.fps import farthest_point_sampling
    from turbopart.xpart.graphed_fps import GraphedFPS
    g = torch.Generator(device="cuda").manual_seed(0)
    fps = GraphedFPS()
    for it in range(4):  # eager, capture, replay, replay
        pts = torch.rand(3, 2000, 3, generator=g, device="cuda")
        start = torch.randint(0, 2000, (3,), generator=g, device="cuda")
        ref = farthest_point_sampling(pts, 100, start, ties="first", init_dist=5e4)
        assert torch.equal(fps(pts, 100, start, ties="first", init_dist=5e4), ref)
    assert len(fps._graphs) == 1


def test_configs_are_the_official_ones():
    from turbopart.sonata.config import SonataConfig
    path = case_path("conditioner")
    with open(path) as f:
        case = json.load(f)
    tiny = cond_mod.tiny_config()
    assert tiny["params"] == case["config"]["params"]
    assert SonataConfig.from_official(tiny["turbopart"]["sonata"]) == \
        SonataConfig.from_official(case["config_sonata"])
    with open(MANIFESTS / "conditioner.json") as f:
        assert cond_mod.default_params() == json.load(f)["config"]["params"]
