"""Sonata (Point Transformer V3, encoder mode) architecture config.

Field names follow the official ``XPart/partgen/config/sonata.json`` vocabulary (spec p3sam
§1.7); the defaults are that file (the full-size encoder used by P3-SAM and the X-Part
conditioner).  Keys of the official file that do not change inference (dropouts, drop path,
``pre_norm``/``enc_mode``/``traceable``, which are fixed to the official values, RPE and the
upcast switches, which must be off with flash attention) are accepted and ignored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

#: Keys of ``sonata.json`` with no effect on our inference module (spec p3sam §1.6-1.7).
_IGNORED_OFFICIAL = {
    "attn_drop": 0.0, "proj_drop": 0.0, "drop_path": 0.3, "pre_norm": True,
    "enable_rpe": False, "upcast_attention": False, "upcast_softmax": False,
    "traceable": True, "enc_mode": True,
}

#: Serialization curves the official encoder knows (spec p3sam §2.6).
ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")


@dataclass(frozen=True)
class SonataConfig:
    in_channels: int = 9
    order: tuple = ("z", "z-trans", "hilbert", "hilbert-trans")
    stride: tuple = (2, 2, 2, 2)
    enc_depths: tuple = (3, 3, 3, 12, 3)
    enc_channels: tuple = (48, 96, 192, 384, 512)
    enc_num_head: tuple = (3, 6, 12, 24, 32)
    enc_patch_size: tuple = (1024,) * 5
    mlp_ratio: float = 4
    qkv_bias: bool = True
    qk_scale: float | None = None
    shuffle_orders: bool = True
    enable_flash: bool = True
    mask_token: bool = True
    grid_size: float = 0.005  # transform.default() GridSample size (not in sonata.json)

    def __post_init__(self):
        # Normalise lists (JSON) to tuples so the config stays hashable.
        for f in ("order", "stride", "enc_depths", "enc_channels", "enc_num_head",
                  "enc_patch_size"):
            v = getattr(self, f)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, f, tuple(v))
        n = len(self.enc_depths)
        for f in ("enc_channels", "enc_num_head", "enc_patch_size"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"SonataConfig.{f} needs {n} entries (one per stage)")
        if len(self.stride) != n - 1:
            raise ValueError(f"SonataConfig.stride needs {n - 1} entries")
        for c, h in zip(self.enc_channels, self.enc_num_head):
            if c % h:
                raise ValueError(f"channels {c} not divisible by {h} heads")
        bad = [o for o in self.order if o not in ORDERS]
        if bad or not self.order:
            raise ValueError(f"unknown serialization order(s) {bad}; expected {ORDERS}")

    # ------------------------------------------------------------------ official vocabulary
    @classmethod
    def from_official(cls, d: dict | None) -> "SonataConfig":
        """Build from a ``sonata.json``-style dict (unknown keys ignored); None -> full size."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise TypeError("Sonata config must be a dict (sonata.json vocabulary)")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if d.get("enable_rpe"):
            raise ValueError("enable_rpe=True is not supported (the released model has no RPE)")
        if d.get("enc_mode") is False:
            raise ValueError("only the encoder (enc_mode=True) is supported")
        if d.get("pre_norm") is False:
            raise ValueError("only pre_norm=True is supported")
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "SonataConfig":
        """The tiny config of the golden cases (channels 8/8/16/16/24, 2 blocks per stage,
        patch 64, flash off; sum(enc_channels) = 72), for tests."""
        kw = dict(enc_depths=(2, 2, 2, 2, 2), enc_channels=(8, 8, 16, 16, 24),
                  enc_num_head=(1, 1, 2, 2, 2), enc_patch_size=(64,) * 5, enable_flash=False)
        kw.update(overrides)
        return cls(**kw)

    def to_official(self) -> dict:
        """The ``sonata.json`` dict of this config (lists, official extra keys included)."""
        d = asdict(self)
        grid = d.pop("grid_size")
        for k, v in list(d.items()):
            if isinstance(v, tuple):
                d[k] = list(v)
        d.update(_IGNORED_OFFICIAL)
        if grid != 0.005:
            d["grid_size"] = grid
        return d

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_stages(self) -> int:
        return len(self.enc_depths)

    @property
    def out_channels(self) -> int:
        """Width of the multi-scale feature: sum(enc_channels) (1232 full size)."""
        return int(sum(self.enc_channels))

    def head_dim(self, stage: int) -> int:
        return self.enc_channels[stage] // self.enc_num_head[stage]

    def scale(self, stage: int) -> float:
        """Attention softmax scale: qk_scale or head_dim^-0.5 (official ``qk_scale or ...``)."""
        return self.qk_scale or self.head_dim(stage) ** -0.5
