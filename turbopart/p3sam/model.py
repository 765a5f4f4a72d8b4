"""The P3-SAM network: Sonata backbone, feature MLP and the promptable two-stage heads.

Module tree and state-dict keys are the official ones (spec p3sam §1.3, manifest
``golden/manifests/p3sam.json``: 513 tensors at full size)::

    sonata            PTv3 encoder (turbopart.sonata.model.Sonata)     sonata.*
    mlp               Linear(C→F) GELU Linear(F→F) GELU Linear(F→F)    C = sum(enc_channels)
    seg_mlp_{1,2,3}   Linear(F+6→F) GELU Linear(F→F) GELU Linear(F→1)  stage 1 (§4.1)
    seg_s2_mlp_g      Linear(F+9→S) GELU Linear(S→S) GELU Linear(S→S)  stage-2 global (§4.2)
    seg_s2_mlp_{1,2,3} Linear(S+F+9→S) GELU Linear(S→S) GELU Linear(S→1)
    iou_mlp           Linear(S+F+9→S) GELU Linear(S→S) GELU Linear(S→S) IoU head (§4.3)
    iou_mlp_out       Linear(S→S) GELU Linear(S→S) GELU Linear(S→3)

with F = ``feat_dim`` (512) and S = ``s2_dim`` (256) at full size.  The official
``build_P3SAM`` hard-codes those widths; our config carries them in its ``turbopart``
object so tiny test models work too.

This module holds the weights and a slow *reference* forward
(:meth:`P3SAM.forward_reference`, the official formulation with materialised
concatenations, for tests).  Inference goes through :mod:`turbopart.p3sam.predictor`,
which splits the first layers and never materialises a per-(point, prompt) concatenation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..sonata.config import SonataConfig
from ..sonata.model import Sonata

#: The official ``p3sam/config.json`` (``XPart/partgen/config/infer.yaml``): no architecture.
OFFICIAL_TARGET = "partgen.bbox_estimator.auto_mask_api.AutoMask"
OFFICIAL_PARAMS = {"ckpt_path": "checkpoints/p3sam.ckpt"}

#: Full-size head widths (the constants of the official ``build_P3SAM``).
FEAT_DIM = 512
S2_DIM = 256

#: The tiny configuration of the golden ``p3sam`` case (sonata 8/8/16/16/24, F 32, S 16).
TINY_SONATA = {
    "in_channels": 9, "order": ["z", "z-trans", "hilbert", "hilbert-trans"],
    "stride": [2, 2, 2, 2], "enc_depths": [2, 2, 2, 2, 2], "enc_channels": [8, 8, 16, 16, 24],
    "enc_num_head": [1, 1, 2, 2, 2], "enc_patch_size": [64, 64, 64, 64, 64], "mlp_ratio": 4,
    "qkv_bias": True, "qk_scale": None, "attn_drop": 0.0, "proj_drop": 0.0, "drop_path": 0.3,
    "shuffle_orders": True, "pre_norm": True, "enable_rpe": False, "enable_flash": False,
    "upcast_attention": False, "upcast_softmax": False, "traceable": True, "enc_mode": True,
    "mask_token": True,
}


def three_layer_mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """``[0] Linear, [1] GELU, [2] Linear, [3] GELU, [4] Linear`` (official key indices)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden),
                         nn.GELU(), nn.Linear(d_hidden, d_out))


@dataclasses.dataclass(frozen=True)
class P3SAMConfig:
    """Architecture of P3-SAM: the Sonata config plus the two head widths."""

    sonata: SonataConfig = dataclasses.field(default_factory=SonataConfig)
    feat_dim: int = FEAT_DIM  # F: width of the point features and the stage-1 heads
    s2_dim: int = S2_DIM  # S: width of the stage-2 and IoU heads

    @classmethod
    def from_json(cls, config: dict | None) -> "P3SAMConfig":
        """From a component ``config.json`` (official form + optional ``turbopart`` object)."""
        extra: dict[str, Any] = {}
        if config is not None:
            if not isinstance(config, dict):
                raise TypeError("p3sam config must be a dict (config.json)")
            extra = config.get("turbopart") or {}
            if not isinstance(extra, dict):
                raise TypeError("p3sam config: 'turbopart' must be an object")
        feat = int(extra.get("feat_dim", FEAT_DIM))
        s2 = int(extra.get("s2_dim", S2_DIM))
        if feat <= 0 or s2 <= 0:
            raise ValueError(f"p3sam config: feat_dim/s2_dim must be positive, got {feat}/{s2}")
        return cls(SonataConfig.from_official(extra.get("sonata")), feat, s2)

    def to_json(self) -> dict:
        return {"target": OFFICIAL_TARGET, "params": dict(OFFICIAL_PARAMS),
                "turbopart": {"sonata": self.sonata.to_official(), "feat_dim": self.feat_dim,
                              "s2_dim": self.s2_dim}}


class P3SAM(nn.Module):
    """Official P3-SAM module tree (``P3SAM`` / ``YSAM``), spec p3sam §1.3."""

    def __init__(self, config: P3SAMConfig | None = None, *, skip_unused: bool = False):
        super().__init__()
        config = config or P3SAMConfig()
        self.config = config
        sonata_cfg = config.sonata
        if skip_unused and sonata_cfg.mask_token:
            # sonata.embedding.mask_token is only read for inputs with a "mask" entry, which
            # P3-SAM never supplies (spec §1.6).
            sonata_cfg = dataclasses.replace(sonata_cfg, mask_token=False)
        fd, sd = config.feat_dim, config.s2_dim
        # Registration order = official state-dict order.
        self.sonata = Sonata(sonata_cfg)
        self.mlp = three_layer_mlp(sonata_cfg.out_channels, fd, fd)
        self.seg_mlp_1 = three_layer_mlp(fd + 6, fd, 1)
        self.seg_mlp_2 = three_layer_mlp(fd + 6, fd, 1)
        self.seg_mlp_3 = three_layer_mlp(fd + 6, fd, 1)
        self.seg_s2_mlp_g = three_layer_mlp(fd + 9, sd, sd)
        self.seg_s2_mlp_1 = three_layer_mlp(sd + fd + 9, sd, 1)
        self.seg_s2_mlp_2 = three_layer_mlp(sd + fd + 9, sd, 1)
        self.seg_s2_mlp_3 = three_layer_mlp(sd + fd + 9, sd, 1)
        self.iou_mlp = three_layer_mlp(sd + fd + 9, sd, sd)
        self.iou_mlp_out = three_layer_mlp(sd, sd, 3)

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    @property
    def s2_dim(self) -> int:
        return self.config.s2_dim

    @property
    def seg_heads(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
        return self.seg_mlp_1, self.seg_mlp_2, self.seg_mlp_3

    @property
    def seg_s2_heads(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
        return self.seg_s2_mlp_1, self.seg_s2_mlp_2, self.seg_s2_mlp_3

    # ------------------------------------------------------------------ reference forward
    @torch.no_grad()
    def forward_reference(self, feats: torch.Tensor, points: torch.Tensor,
                          prompts: torch.Tensor, iter: int = 1) -> dict[str, torch.Tensor]:
        """The official ``P3SAM.forward`` formulation (spec §4.1-4.3), slow; for tests.

        ``feats`` [N, F], ``points`` [N, 3], ``prompts`` [K, 3] (all in the frame the heads
        see).  Materialises every [K, N, ·] concatenation like the official code (memory
        O(K·N·(S+F+9))), in the dtype of the head weights.  Returns ``stage1_logits`` and
        ``stage2_logits`` [K, N, 3], ``stage2_global_feat`` [K, S], ``iou_feat`` [K, S],
        ``iou_logits`` and ``pred_iou`` [K, 3], ``mask_1/2/3`` [K, N] (sigmoid, as returned
        officially).
        """
        if iter < 1:
            # Official quirk: iter=0 crashes (stage-2 outputs undefined); refuse clearly.
            raise ValueError("iter must be >= 1 (the official forward needs one stage-2 pass)")
        dt = self.seg_mlp_1[0].weight.dtype
        k, n = prompts.shape[0], points.shape[0]
        f = feats.to(dt)[None].expand(k, n, -1)
        p = points.to(dt)[None].expand(k, n, -1)
        q = prompts.to(dt)[:, None].expand(k, n, -1)
        x1 = torch.cat([f, p, q], dim=-1)  # [K, N, F+6]
        stage1 = torch.cat([h(x1) for h in self.seg_heads], dim=-1)  # [K, N, 3]
        logits = stage1
        for _ in range(iter):
            x2 = torch.cat([x1, logits], dim=-1)  # [K, N, F+9]
            g = self.seg_s2_mlp_g(x2).amax(dim=1)  # [K, S]
            x3 = torch.cat([g[:, None].expand(k, n, -1), x2], dim=-1)  # [K, N, S+F+9]
            logits = torch.cat([h(x3) for h in self.seg_s2_heads], dim=-1)
        stage2 = logits
        # Official quirk (§4.3): the IoU input ends with the *stage-2* logits, whereas the
        # stage-2 heads' input ends with the stage-1 logits.
        xi = torch.cat([g[:, None].expand(k, n, -1), x1, stage2], dim=-1)
        iou_feat = self.iou_mlp(xi).amax(dim=1)  # [K, S]
        iou_logits = self.iou_mlp_out(iou_feat)  # [K, 3]
        masks = torch.sigmoid(stage2.float())
        return {"stage1_logits": stage1, "stage2_logits": stage2, "stage2_global_feat": g,
                "iou_feat": iou_feat, "iou_logits": iou_logits,
                "pred_iou": torch.sigmoid(iou_logits.float()),
                "mask_1": masks[..., 0], "mask_2": masks[..., 1], "mask_3": masks[..., 2]}

    def forward(self, feats: torch.Tensor, points: torch.Tensor, prompts: torch.Tensor,
                iter: int = 1) -> dict[str, torch.Tensor]:
        """Alias of :meth:`forward_reference` (inference uses ``P3SAMPredictor``)."""
        return self.forward_reference(feats, points, prompts, iter)


# ---------------------------------------------------------------------- builder contract

def default_params() -> dict:
    """The official ``p3sam/config.json`` ``params`` (full size)."""
    return dict(OFFICIAL_PARAMS)


def tiny_config() -> dict:
    """A tiny ``config.json`` (the sizes of the golden ``p3sam`` case)."""
    return {"target": OFFICIAL_TARGET, "params": dict(OFFICIAL_PARAMS),
            "turbopart": {"sonata": dict(TINY_SONATA), "feat_dim": 32, "s2_dim": 16}}


def build(config: dict | None = None, *, skip_unused: bool = False) -> P3SAM:
    """Build P3-SAM from its ``config.json`` (None: official full size), weights unset."""
    return P3SAM(P3SAMConfig.from_json(config), skip_unused=skip_unused)


def init_random_(model: nn.Module, *, std: float = 0.02, generator: torch.Generator | None = None
                 ) -> nn.Module:
    """Plain random init in place (the rule of ``turbopart.weights.random_state_dict``), for
    benchmarks without a weight directory; parameters keep their device and dtype."""
    from ..weights import materialize_random
    p = next(model.parameters())
    return materialize_random(model, p.device, std=std, generator=generator,
                              dtypes={k: v.dtype for k, v in model.named_parameters()})


__all__ = ["P3SAM", "P3SAMConfig", "build", "default_params", "tiny_config", "three_layer_mlp",
           "init_random_", "FEAT_DIM", "S2_DIM"]
