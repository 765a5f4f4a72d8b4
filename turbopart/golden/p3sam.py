"""Golden runner for the ``p3sam`` case: the whole network as ``mesh_sam`` drives it.

Official sequence (``P3-SAM/demo/auto_mask.py``): ``get_feat`` (Sonata + ``mlp``, which
shifts the caller's points in place) → prompts = shifted points at the FPS indices →
``get_mask`` → ``P3SAM.forward(iter=1)``.  We build :class:`~turbopart.p3sam.model.P3SAM`
from the case config (Sonata from ``config["sonata"]``, head widths from
``config["linear_width_map_used_at_construction"]``: the official 512 → F, 256 → S; or, if
absent, from the weight shapes), load ``weight.*``, inject ``rng.gridsample_index``,
``rng.shuffle_orders_perm.*`` and ``rng.prompt_fps_index``, and evaluate the prompts through
the *fast* split formulation (:class:`~turbopart.p3sam.predictor.P3SAMPredictor`) in fp32 on
the CPU (numerics ``exact``).
"""
from __future__ import annotations

import torch

from .. import weights as _weights
from ..p3sam.model import OFFICIAL_PARAMS, OFFICIAL_TARGET, P3SAM, P3SAMConfig
from ..p3sam.predictor import P3SAMPredictor
from ..sonata.config import SonataConfig


def head_widths(case) -> tuple[int, int]:
    """(F, S): the official 512 and 256 after the case's construction-time width remap."""
    w = case.prefixed("weight.")
    from_weights = (int(w["mlp.0.weight"].shape[0]), int(w["seg_s2_mlp_g.0.weight"].shape[0])) \
        if "mlp.0.weight" in w and "seg_s2_mlp_g.0.weight" in w else None
    wmap = case.config.get("linear_width_map_used_at_construction")
    if wmap:
        m = {int(k): int(v) for k, v in wmap.items()}
        fd, sd = m.get(512, 512), m.get(256, 256)
        # The concatenation widths must follow from F and S (518 = F+6, 521 = F+9, 777 = S+F+9).
        for official, ours in ((518, fd + 6), (521, fd + 9), (777, sd + fd + 9)):
            if official in m and m[official] != ours:
                raise ValueError(f"width map {official}->{m[official]} disagrees with "
                                 f"F={fd}, S={sd} (expected {ours})")
        if from_weights is not None and from_weights != (fd, sd):
            raise ValueError(f"width map gives F, S = {fd}, {sd} but the weights {from_weights}")
        return fd, sd
    if from_weights is None:
        return 512, 256
    return from_weights


def config_from_case(case) -> dict:
    """The case's architecture as our ``config.json`` (official form + ``turbopart``)."""
    fd, sd = head_widths(case)
    sonata = SonataConfig.from_official(case.config.get("sonata")).to_official()
    return {"target": OFFICIAL_TARGET, "params": dict(OFFICIAL_PARAMS),
            "turbopart": {"sonata": sonata, "feat_dim": fd, "s2_dim": sd}}


def build_from_case(case) -> P3SAM:
    with torch.device("meta"):
        model = P3SAM(P3SAMConfig.from_json(config_from_case(case)))
    model.load_state_dict(case.prefixed("weight."), strict=True, assign=True)
    return _weights.finish_module(model, "cpu")


def _perms(case, n_stages: int) -> list[torch.Tensor] | None:
    name = "rng.shuffle_orders_perm.{}"
    if not case.has(name.format(0)):
        return None
    return [case.tensors[name.format(s)] for s in range(n_stages)]


def run(case) -> dict[str, torch.Tensor]:
    model = build_from_case(case)
    pred = P3SAMPredictor(model, numerics="exact", device="cpu")
    choice = case.rng("gridsample_index") if case.has("rng.gridsample_index") else None
    shifted = pred.set_points(case.input("points"), case.input("normals"), voxel_choice=choice,
                              perms=_perms(case, model.config.sonata.num_stages), debug=True)
    prompts = shifted[case.rng("prompt_fps_index")]  # float64, like the official numpy slice
    res = pred.predict(prompts, logits=True, iters=int(case.config.get("iter", 1)))
    out: dict[str, torch.Tensor] = {k: v for k, v in pred.features.debug.items()
                                    if k.startswith("transform.")}
    masks = torch.sigmoid(res.stage2_logits)  # official forward returns sigmoid, fp32
    out.update({
        "feats": pred.features.point_feat,
        "prompts": prompts,
        "points_after_get_feat": shifted,
        "stage1_logits": res.stage1_logits,
        "stage2_logits": res.stage2_logits,
        "mask_1": masks[..., 0], "mask_2": masks[..., 1], "mask_3": masks[..., 2],
        "stage2_global_feat": res.global_feat,
        "iou_feat": res.iou_feat,
        "iou_logits": res.iou_logits,
        "pred_iou": res.pred_iou,
    })
    return out
