"""Golden runner for ``sampling`` cases: a tiny end-to-end X-Part run.

Official call (case JSON ``official_call``): ``PartFormerPipeline.__call__`` with ready-made
surfaces and boxes, N steps, ``output_type="latent"``, then per part
``vae(final_latents[k] / scale_factor)`` and ``VanillaVolumeDecoder`` on a dense grid over
[−1.01, 1.01]³ (``'ij'`` indexing, float32 coordinates).

We build the three modules from the case's tiny configs (``config.model``, ``config.shapevae``,
``config.conditioner`` + ``config.conditioner_sonata``; every size is read from the config or
the weights), load ``weight.model.*`` / ``weight.shapevae.*`` / ``weight.conditioner.*``, and
inject the recorded draws: ``rng.init_latents`` (initial noise), ``rng.stepI.part_embed_randperm``
(first K entries used at step I) and ``rng.cond.*`` (conditioner randperm / FPS / Sonata
draws).  The loop is the one the pipeline runs (:func:`turbopart.xpart.dit_runner.denoise`).
"""
from __future__ import annotations

import copy

import torch

from . import Case
from ..runtime.precision import Numerics
from ..weights import finish_module
from ..xpart import conditioner as cond_mod
from ..xpart import decoding, dit, scheduler as sched_mod, vae as vae_mod
from ..xpart.dit_runner import denoise


def _load(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    module.load_state_dict(weights, strict=True, assign=True)
    return finish_module(module, "cpu")


def conditioner_config(case: Case) -> dict:
    cfg = copy.deepcopy(case.config["conditioner"])
    if "params" not in cfg:
        cfg = {"target": cond_mod.OFFICIAL_TARGET, "params": cfg}
    w = case.prefixed("weight.conditioner.")
    extra = dict(cfg.get("turbopart", {}))
    if "conditioner_sonata" in case.config:
        extra.setdefault("sonata", case.config["conditioner_sonata"])
    if "seg_feat_encoder.mlp.4.weight" in w:
        extra.setdefault("seg_feat_dim", int(w["seg_feat_encoder.mlp.4.weight"].shape[0]))
        extra.setdefault("seg_feat_hidden", int(w["seg_feat_encoder.mlp.0.weight"].shape[0]))
    cfg["turbopart"] = extra
    return cfg


def build_modules(case: Case):
    """(conditioner, dit, vae, scheduler) of the case, weights loaded, exact numerics."""
    with torch.device("meta"):
        cond = cond_mod.build(conditioner_config(case))
        model = dit.build({"target": dit.TARGET, "params": dict(case.config["model"])})
        vae = vae_mod.build({"target": vae_mod.OFFICIAL_TARGET,
                             "params": dict(case.config["shapevae"])})
    cond = _load(cond, case.prefixed("weight.conditioner."))
    model = _load(model, case.prefixed("weight.model."))
    model.prepare(Numerics.EXACT)
    vae = _load(vae, case.prefixed("weight.shapevae."))
    sched = sched_mod.build(case.config.get("scheduler"))
    return cond, model, vae, sched


def run(case: Case) -> dict[str, torch.Tensor]:
    cond_m, model, vae, sched = build_modules(case)
    obj = case.input("obj_surface").float()
    parts = case.input("part_surface_inbbox").float()
    if parts.dim() == 4:
        parts = parts[0]
    k = parts.shape[0]
    out: dict[str, torch.Tensor] = {}

    draws = cond_mod.ConditionerDraws.from_rng(case.prefixed("rng.cond."), cond_m, k)
    cond = cond_m(parts, obj, draws=draws, numerics=Numerics.EXACT, obj_match="search")
    for name, t in cond.items():
        out[f"cond.{name}"] = t

    steps = int(case.config.get("num_inference_steps",
                                sum(1 for n in case.tensors if n.startswith("rng.step")
                                    and n.endswith(".part_embed_randperm"))))
    perms = torch.stack([case.rng(f"step{i}.part_embed_randperm")[:k] for i in range(steps)])
    noise = case.rng("init_latents").float()
    dtypes = [noise.dtype]

    def record(i, t, x, v):
        out[f"step{i}.model_timestep"] = sched.model_timestep(i, dtypes[-1], k)
        out[f"step{i}.model_output"] = v
        out[f"step{i}.latents_after"] = x
        dtypes.append(x.dtype)
    latents = denoise(model, noise, cond, scheduler=sched, num_inference_steps=steps,
                      part_index=perms, skip_noop=False, callback=record)
    out["timesteps"] = sched.timesteps.clone()
    out["final_latents"] = latents

    # official: vae(final_latents[k:k+1] / scale_factor) per part (batched here)
    decoded = vae.decode(latents / vae.scale_factor)
    out["decoded_latents"] = decoded
    ref = case.outputs.get("grid_logits")
    res = int(ref.shape[-1]) - 1 if ref is not None else 16
    kv = vae.geo_decoder.precompute_kv(decoded)

    def query(points, ids):
        sub = kv.select(ids[0], ids[-1] + 1)
        return vae.geo_decoder.query(points, sub)
    out["grid_logits"] = decoding.decode_dense(query, list(range(k)), res).float()
    return out
