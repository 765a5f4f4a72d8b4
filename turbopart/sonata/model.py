"""Sonata: the Point Transformer V3 encoder (encoder mode), natively in PyTorch.

Module tree and ``state_dict`` keys are the official ones (spec p3sam §1.4)::

    embedding.stem.linear.{weight,bias}  embedding.stem.norm.{weight,bias}  embedding.mask_token
    enc.enc{s}.down.proj.*  enc.enc{s}.down.norm.0.*                       (s >= 1)
    enc.enc{s}.block{i}.cpe.{0,1,2}.*  .norm1.0.*  .attn.qkv.*  .attn.proj.*  .norm2.0.*
    enc.enc{s}.block{i}.mlp.0.fc1.*  .mlp.0.fc2.*

The forward (spec p3sam §3) runs on a :class:`~turbopart.sonata.structure.StagePlan` list that
holds every index the encoder needs; the feature pass itself has no host synchronisation.

Numerics (``turbopart.runtime.precision``):

* ``exact``: fp32 everywhere; when ``enable_flash`` is on, q/k/v are cast to fp16 for the
  attention (the official flash path), otherwise plain fp32 attention (the non-flash path).
* ``fast`` on CUDA: bf16 matmuls (weights as loaded, or cast once and cached), LayerNorm
  statistics in fp32, the residual stream kept in fp32, the embedding (a 9→C linear on raw
  coordinates) in fp32.  On the CPU ``fast`` computes in fp32.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import attention, backend_context
from ..runtime.precision import Numerics, compute_dtype
from .config import SonataConfig
from .sparse_conv import SubMConv3d, submanifold_conv
from .structure import StagePlan


def attention_backend() -> str:
    """The SDPA backend the patch attention tries first: ``TURBOPART_SONATA_ATTN``, default
    ``"flash"`` (the algorithm of the official flash-attn path).  PyTorch's own first choice
    on Hopper, cuDNN, builds an execution plan for every new patch count: ≈ 15 ms per
    attention call of a mesh not seen before, 0.35 s of a first segmentation."""
    return os.environ.get("TURBOPART_SONATA_ATTN", "flash").strip().lower()


class Linear32(nn.Module):
    """A Linear kept in fp32 whatever the numerics (not a matmul module for ``param_dtypes``).

    Used for the embedding stem: its inputs are raw coordinates at 5 mm resolution, which
    bf16 would round to about a voxel.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class Embedding(nn.Module):
    """Official ``Embedding``: stem = Linear(in→C0), LayerNorm, GELU; optional mask token."""

    def __init__(self, in_channels: int, channels: int, mask_token: bool):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(
            linear=Linear32(in_channels, channels), norm=nn.LayerNorm(channels),
            act=nn.GELU()))
        # Present in the checkpoint; used only with a "mask" input, which nobody passes.
        self.mask_token = nn.Parameter(torch.empty(1, channels)) if mask_token else None


class GridPooling(nn.Module):
    """Official ``GridPooling`` parameters: proj (Linear), norm.0 (LayerNorm), act (GELU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = nn.Sequential(nn.LayerNorm(out_channels))
        self.act = nn.Sequential(nn.GELU())


class SerializedAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.channels, self.num_heads = channels, num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)


class MLP(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)


class Block(nn.Module):
    """Official pre-norm ``Block``: xCPE, serialized attention, MLP (spec p3sam §3.2)."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.cpe = nn.Sequential(SubMConv3d(channels, channels, 3, bias=True),
                                 nn.Linear(channels, channels), nn.LayerNorm(channels))
        self.norm1 = nn.Sequential(nn.LayerNorm(channels))
        self.attn = SerializedAttention(channels, num_heads, qkv_bias)
        self.norm2 = nn.Sequential(nn.LayerNorm(channels))
        self.mlp = nn.Sequential(MLP(channels, int(channels * mlp_ratio)))


class Stage(nn.Module):
    """``enc{s}``: optional ``down`` (GridPooling) then ``block0..``."""

    def __init__(self, config: SonataConfig, s: int):
        super().__init__()
        c = config.enc_channels[s]
        if s > 0:
            self.down = GridPooling(config.enc_channels[s - 1], c)
        else:
            self.down = None
        self.depth = config.enc_depths[s]
        for i in range(self.depth):
            self.add_module(f"block{i}", Block(c, config.enc_num_head[s], config.mlp_ratio,
                                               config.qkv_bias))

    def blocks(self) -> list[Block]:
        return [getattr(self, f"block{i}") for i in range(self.depth)]


@dataclass
class EncoderOutput:
    feats: list[torch.Tensor]                       # per stage: output of its last block
    debug: dict[str, torch.Tensor] = field(default_factory=dict)


class _Compute:
    """Dtypes of one forward and cached casts of parameters to them."""

    def __init__(self, owner: "Sonata", numerics: Numerics, device: torch.device):
        self.owner = owner
        self.numerics = numerics
        self.dtype = compute_dtype(numerics, device)
        if numerics is Numerics.EXACT:
            self.attn_dtype = torch.float16 if owner.config.enable_flash else torch.float32
        else:
            self.attn_dtype = self.dtype

    def p(self, t: torch.Tensor | None, dtype: torch.dtype | None = None):
        return None if t is None else self.owner._cast(t, dtype or self.dtype)

    def linear(self, x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.p(mod.weight), self.p(mod.bias))

    def norm(self, x: torch.Tensor, mod: nn.LayerNorm, out_dtype: torch.dtype | None = None):
        y = F.layer_norm(x, mod.normalized_shape, self.p(mod.weight, x.dtype),
                         self.p(mod.bias, x.dtype), mod.eps)
        return y if out_dtype is None else y.to(out_dtype)


class Encoder(nn.Module):
    def __init__(self, config: SonataConfig):
        super().__init__()
        for s in range(config.num_stages):
            self.add_module(f"enc{s}", Stage(config, s))


class Sonata(nn.Module):
    """PTv3 encoder with the official parameter names (``state_dict`` = ``sonata.*`` keys)."""

    def __init__(self, config: SonataConfig | dict | None = None):
        super().__init__()
        if not isinstance(config, SonataConfig):
            config = SonataConfig.from_official(config)
        self.config = config
        self.embedding = Embedding(config.in_channels, config.enc_channels[0],
                                   config.mask_token)
        self.enc = Encoder(config)
        self._casts: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def stages(self) -> list[Stage]:
        return [getattr(self.enc, f"enc{s}") for s in range(self.config.num_stages)]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` in ``dtype``; casts of parameters are made once and reused until they change."""
        if t.dtype == dtype:
            return t
        key = (id(t), dtype)
        hit = self._casts.get(key)
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        with torch.no_grad():
            c = t.detach().to(dtype)
        self._casts[key] = (t, t._version, c)
        return c

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half(): drop cached casts
        self._casts = {}
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._casts = {}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def init_random_(self, generator: torch.Generator | None = None, std: float = 0.02
                     ) -> "Sonata":
        """Plain random weights for tests/benchmarks (``turbopart.weights`` rule), in place;
        parameters keep their device and dtype."""
        from ..weights import materialize_random
        p = next(self.parameters())
        materialize_random(self, p.device, std=std, generator=generator,
                           dtypes={k: v.dtype for k, v in self.named_parameters()})
        return self

    # ------------------------------------------------------------------ forward pieces
    def _attention(self, ctx: _Compute, attn: SerializedAttention, h: torch.Tensor,
                   plan: StagePlan, j: int) -> torch.Tensor:
        """Serialized patch attention (spec p3sam §3.3): qkv → patches → SDPA → proj."""
        n, c = h.shape
        heads = attn.num_heads
        d = c // heads
        pt = plan.patches[j]
        qkv = ctx.linear(h, attn.qkv)
        g = qkv.index_select(0, pt.gather).view(pt.patches, pt.size, 3, heads, d)
        if g.dtype != ctx.attn_dtype:
            g = g.to(ctx.attn_dtype)  # official flash path: qkv.half()
        q, k, v = g.permute(2, 0, 3, 1, 4).unbind(0)  # [P, H, K, D], channel = (3, H, D)
        o = attention(q, k, v, scale=self.config.scale(plan.stage))
        o = o.permute(0, 2, 1, 3)[pt.out_patch, pt.out_pos].reshape(n, c)
        return ctx.linear(o, attn.proj)

    def _block(self, ctx: _Compute, blk: Block, x: torch.Tensor, plan: StagePlan, j: int,
               dbg: dict | None, name: str) -> torch.Tensor:
        conv, lin, ln = blk.cpe
        xc = x.to(ctx.dtype)
        c = submanifold_conv(xc, plan.neighbours, ctx.p(conv.weight), ctx.p(conv.bias),
                             rows_per_chunk=plan.conv_rows, pairs=plan.conv_pairs)
        c = ctx.norm(ctx.linear(c, lin), ln)
        x = x + c
        h = ctx.norm(x, blk.norm1[0], ctx.dtype)
        a = self._attention(ctx, blk.attn, h, plan, j)
        if dbg is not None:
            dbg[name + ".cpe_out"] = c
            dbg[name + ".attn_out"] = a
        x = x + a
        h = ctx.norm(x, blk.norm2[0], ctx.dtype)
        mlp = blk.mlp[0]
        x = x + ctx.linear(F.gelu(ctx.linear(h, mlp.fc1)), mlp.fc2)
        return x

    def _pool(self, ctx: _Compute, down: GridPooling, x: torch.Tensor, plan: StagePlan
              ) -> torch.Tensor:
        """GridPooling (spec p3sam §3.4): projection, then per-cluster max, LayerNorm, GELU."""
        y = ctx.linear(x, down.proj)
        out = y.new_empty(plan.n, y.shape[1])
        idx = plan.pooling_inverse[:, None].expand_as(y)
        out.scatter_reduce_(0, idx, y, reduce="amax", include_self=False)
        return F.gelu(ctx.norm(out, down.norm[0]))

    def forward(self, feat: torch.Tensor, plans: list[StagePlan],
                numerics: Numerics | str = Numerics.FAST, debug: bool = False
                ) -> EncoderOutput:
        """Run the encoder on the transform's ``feat`` [M0, in_channels] along ``plans``."""
        numerics = Numerics.parse(numerics)
        ctx = _Compute(self, numerics, feat.device)
        dbg: dict | None = {} if debug else None
        emb = self.embedding
        x = emb.stem.linear(feat)
        x = F.gelu(ctx.norm(x, emb.stem.norm))  # fp32: residual stream dtype
        if dbg is not None:
            dbg["embedding"] = x
        k = len(self.config.order)
        feats = []
        with backend_context(attention_backend()):
            for s, (stage, plan) in enumerate(zip(self.stages(), plans)):
                if s > 0:
                    x = self._pool(ctx, stage.down, x, plan).float()
                    if dbg is not None:
                        dbg[f"stage{s}.down"] = x
                for i, blk in enumerate(stage.blocks()):
                    # official order_index = i % len(order): block i attends along curve
                    # i mod k of the stage's shuffled list (stage 0's 3 blocks never use
                    # the 4th curve)
                    x = self._block(ctx, blk, x, plan, i % k, dbg, f"stage{s}.block{i}")
                    if dbg is not None:
                        dbg[f"stage{s}.block{i}"] = x
                feats.append(x)
        return EncoderOutput(feats, dbg or {})

    def multiscale(self, feats: list[torch.Tensor], plans: list[StagePlan],
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Concatenate every stage's output back onto stage-0 voxels (spec p3sam §3.6).

        Channels [stage 0 | stage 1 | ...]; stage s is gathered through the composed pooling
        inverses (stage-0 voxel → its stage-s ancestor).
        """
        dtype = dtype or feats[0].dtype
        parts = [feats[0].to(dtype)]
        idx = None
        for s in range(1, len(feats)):
            inv = plans[s].pooling_inverse
            idx = inv if idx is None else inv[idx]
            parts.append(feats[s].to(dtype).index_select(0, idx))
        return torch.cat(parts, dim=1)


def param_count(config: SonataConfig) -> int:
    """Number of parameters of the encoder (108,461,376 full size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Sonata(config).parameters())


__all__ = ["Sonata", "SonataConfig", "EncoderOutput", "Linear32", "param_count"]
