"""Golden runner for the ``sonata`` case: the official ``get_feat`` path with an identity head.

Builds :class:`~turbopart.sonata.model.Sonata` from ``case.config`` (sonata.json
vocabulary; every size comes from the config), loads ``weight.*``, feeds ``input.points`` /
``input.normals`` (float64), injects ``rng.gridsample_index`` (voxel representatives) and
``rng.shuffle_orders_perm.*`` (curve shuffles), and returns every intermediate under the
golden names.  Numerics ``exact`` (fp32; fp16 attention only if the config enables flash).
"""
from __future__ import annotations

import torch

from ..sonata.config import SonataConfig
from ..sonata.features import point_features
from ..sonata.model import Sonata


def build_from_case(case) -> Sonata:
    cfg = SonataConfig.from_official(case.config)
    with torch.device("meta"):
        model = Sonata(cfg)
    weights = case.prefixed("weight.")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def perms_from_case(case, n_stages: int) -> list[torch.Tensor] | None:
    name = "shuffle_orders_perm.{}"
    if not case.has("rng." + name.format(0)):
        return None
    return [case.rng(name.format(s)) for s in range(n_stages)]


def run(case) -> dict[str, torch.Tensor]:
    model = build_from_case(case)
    choice = case.rng("gridsample_index") if case.has("rng.gridsample_index") else None
    perms = perms_from_case(case, model.config.num_stages)
    out = point_features(model, case.input("points"), case.input("normals"),
                         numerics="exact", voxel_choice=choice, perms=perms, debug=True)
    return dict(out.debug)
