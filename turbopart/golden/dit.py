"""Golden runner for ``dit`` cases: ``PartFormerDITPlain`` forward on a tiny config.

Builds the DiT from ``case.config``, loads ``weight.*``, injects ``rng.part_embed_index``
and returns ``out`` / ``out_train_mode`` (both the training-mode MoE combine, which equals
the eval path in fp32), ``t_embed``, ``x_embed``, ``block{i}`` ([K, 1+n, D], time token
first) and, for MoE blocks, ``block{i}.moe_topk_idx`` / ``moe_topk_weight`` over all K·(1+n)
tokens, each row sorted by expert index (the official ``topk`` is unsorted).
"""
from __future__ import annotations

import torch

from . import Case
from ..runtime.precision import Numerics
from ..xpart import dit as dit_mod


def build_loaded(case: Case, prefix: str = "weight.", config: dict | None = None
                 ) -> dit_mod.PartFormerDiT:
    """The case's DiT with its weights, prepared for ``exact`` on the CPU (fp32).

    ``config``: the DiT config when the case holds several modules (the sampling case keeps
    it under ``config["model"]``).
    """
    with torch.device("meta"):
        model = dit_mod.build(case.config if config is None else config)
    sd = case.prefixed(prefix)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().prepare(Numerics.EXACT)


def run(case: Case) -> dict[str, torch.Tensor]:
    model = build_loaded(case)
    x, t = case.input("x"), case.input("t")
    ctx = {"obj_cond": case.input("obj_cond"), "geo_cond": case.input("geo_cond")}
    idx = case.rng("part_embed_index") if case.has("rng.part_embed_index") else \
        case.rng("part_embed_randperm")[:x.shape[0]]
    rec: dict[str, torch.Tensor] = {}
    out = model(x, t, ctx, idx, record=rec)
    res = {"out": out, "out_train_mode": out, "t_embed": rec["t_embed"],
           "x_embed": rec["x_embed"]}
    for key, val in rec.items():
        if not key.startswith("block"):
            continue
        if key.endswith(".moe_topk_idx"):
            w = rec[key.replace("_idx", "_weight")]
            order = torch.argsort(val, dim=-1)
            res[key] = torch.gather(val, -1, order)
            res[key.replace("_idx", "_weight")] = torch.gather(w, -1, order)
        elif not key.endswith(".moe_topk_weight"):
            res[key] = val
    return res
