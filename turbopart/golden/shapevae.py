"""Golden runner for the ``shapevae`` case (official ``VolumeDecoderShapeVAE``, tiny config).

Calls reproduced (README "shapevae"): ``encode(surface, sample_posterior=False)`` and
``encode(surface, sample_posterior=True)`` (each with its recorded randperm / FPS indices and,
for the sample, the recorded normal draw), ``decode(latents_mean)`` and
``query_geometry(queries, decoded)``.  Sizes come from the case's config and weights.
"""
from __future__ import annotations

import torch

from . import Case
from ..weights import finish_module
from ..xpart import vae as vae_mod


def load_vae(config: dict, weights: dict[str, torch.Tensor], device="cpu") -> vae_mod.ShapeVAE:
    """A full ShapeVAE (encoder included) from a config and official-key tensors."""
    with torch.device("meta"):
        model = vae_mod.build(config)
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True,
                          assign=True)
    return finish_module(model, device)


def recorded_fps(fps_index: torch.Tensor, batch: int, subset: int) -> torch.Tensor:
    """Recorded torch_cluster picks (global rows of the flattened [B·subset] array) as rows of
    each item's subset, [B, L]; the first pick of each item is its FPS start."""
    idx = fps_index.reshape(batch, -1)
    return idx - (torch.arange(batch) * subset)[:, None]


def _encode(model: vae_mod.ShapeVAE, case: Case, surface: torch.Tensor, tag: str):
    """Encoder with the recorded randperm and FPS picks injected (our FPS reproduces them
    from the start row; tests/test_vae.py checks that separately)."""
    b = surface.shape[0]
    n = model.encoder.sizes.num_input
    picks = recorded_fps(case.rng(f"{tag}.fps_index"), b, n)
    lat, (query_pc, input_pc, _) = model.encode_shape(
        surface, case.rng(f"{tag}.randperm"), picks[:, 0], return_points=True,
        query_idx=picks)
    return lat, query_pc, input_pc


def run(case: Case) -> dict[str, torch.Tensor]:
    model = load_vae(case.config, case.prefixed("weight."))
    surface = case.input("surface").float()
    out: dict[str, torch.Tensor] = {}

    lat, query_pc, input_pc = _encode(model, case, surface, "encode")
    post, moments = model.posterior(lat)
    out["encoder_latents"] = lat
    out["query_pc"] = query_pc
    out["input_pc"] = input_pc
    out["moments"] = moments
    out["latents_mean"] = post.mean

    if case.has("rng.encode_sample.eps"):
        lat_s, _, _ = _encode(model, case, surface, "encode_sample")
        post_s, _ = model.posterior(lat_s)
        out["latents_sample"] = post_s.sample(case.rng("encode_sample.eps"))

    cdt = model._cdt(surface.device)
    from ..xpart.vae_blocks import linear
    out["post_kl"] = linear(post.mean, model.post_kl, cdt)
    decoded = model.decode(post.mean)
    out["decoded"] = decoded
    if case.has("input.queries"):
        out["query_logits"] = model.query_geometry(case.input("queries").float(), decoded)
    return out
