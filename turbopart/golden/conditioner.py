"""Golden runner for the ``conditioner`` case (official ``Conditioner``, tiny config).

The case's config is the official one with hard-coded widths remapped; our builder takes the
tiny Sonata config (``config_sonata`` in the case JSON) and the seg-feature widths (from the
weights) under ``"turbopart"``.  Recorded draws are injected (``rng.geo.*``, ``rng.obj.*``,
``rng.sonata.*``; the FPS picks are replayed as recorded).  The main outputs follow the
official CUDA behaviour; the ``cpu_numpy_aliasing.*`` outputs rerun the call with the CPU-only in-place CenterShift.
Object-token matches are computed with the cdist-equivalent search here, so that
``nearest_global_matches`` is the official expression; the product default (FPS source
index) is checked against it in tests.
"""
from __future__ import annotations

import copy

import torch

from . import Case
from ..weights import finish_module
from ..xpart import conditioner as cond_mod


def case_config(case: Case) -> dict:
    """The case config plus the ``turbopart`` extras our builder needs."""
    cfg = copy.deepcopy(case.config)
    w = case.prefixed("weight.")
    extra = dict(cfg.get("turbopart", {}))
    if "config_sonata" in case.meta:
        extra.setdefault("sonata", case.meta["config_sonata"])
    if "seg_feat_encoder.mlp.4.weight" in w:
        extra.setdefault("seg_feat_dim", int(w["seg_feat_encoder.mlp.4.weight"].shape[0]))
        extra.setdefault("seg_feat_hidden", int(w["seg_feat_encoder.mlp.0.weight"].shape[0]))
    cfg["turbopart"] = extra
    return cfg


def load_conditioner(config: dict, weights: dict[str, torch.Tensor], device="cpu"
                     ) -> cond_mod.Conditioner:
    with torch.device("meta"):
        model = cond_mod.build(config)
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True,
                          assign=True)
    return finish_module(model, device)


def run(case: Case) -> dict[str, torch.Tensor]:
    model = load_conditioner(case_config(case), case.prefixed("weight."))
    parts = case.input("part_surface_inbbox").float()
    obj = case.input("object_surface").float()
    k = parts.shape[0]
    # recorded draws, FPS picks included (tests check that our FPS reproduces them)
    draws = cond_mod.ConditionerDraws.from_rng(case.prefixed("rng."), model, k, picks=True)
    res = model(parts, obj, draws=draws, numerics="exact", obj_match="search",
                return_intermediates=True)
    out = {name: res[name] for name in (
        "geo_cond", "obj_cond", "geo_latents", "obj_latents", "geo_query_pc", "obj_query_pc",
        "sonata_point_feat", "nearest_local_matches", "nearest_global_matches") if name in res}
    if any(n.startswith("cpu_numpy_aliasing.") for n in case.outputs):
        alias = model(parts, obj, draws=draws, numerics="exact",
                      cpu_numpy_aliasing=True, return_intermediates=True)
        for name in ("geo_cond", "obj_cond", "object_surface_after_call"):
            if name in alias:
                out[f"cpu_numpy_aliasing.{name}"] = alias[name]
    return out
