"""X-Part MoE DiT (official ``PartFormerDITPlain``), weight-compatible, with a fast path.

Spec: xpart §2 (architecture, numerics), §11 items 1–4, 9; layout §1.4 (942 keys at full size).

Structure (official key names kept for loading): ``x_embedder`` (Linear in→D),
``t_embedder.mlp.{0,2}`` (sinusoid of width D → 4D → D), ``part_embed`` [valid_num, D],
``blocks.{i}`` and ``final_layer.{norm_final,linear}``.  Every official quirk is reproduced
where it happens (look for "official quirk" below):

* self-attention: the three projections are concatenated and viewed per head as
  [q | k | v] slices of ``cat(to_q, to_k, to_v)`` (head h's "key" is columns 128–255 of its
  384-wide slice) — §2.6; cross-attention: the same with ``cat(to_k, to_v)`` — §2.7;
* RMS q/k norm with PyTorch's dtype handling (:mod:`turbopart.nn.norms`);
* global attention on odd blocks over all K·(1+n) tokens, time tokens included — §2.6;
* long skips, skip tensor concatenated first — §2.5;
* MoE: softmax top-k without renormalisation, fp32 training-mode combine, shared expert —
  :mod:`turbopart.nn.moe`, §2.8;
* time token first, sin-first sinusoid of t ∈ [0, 1] — §2.3;
* fp32 residual stream by dtype promotion (fp32 part embedding + bf16 projections) — §2.9;
* part embedding rows chosen by an explicit index argument [K] (the official draws
  ``torch.randperm(valid_num)[:K]`` on the CPU generator at every call; see
  :func:`draw_part_index`) — §2.2 step 3.

Numerics (``prepare(numerics)``; spec §2.9): activations of every Linear/SDPA run in the
*compute dtype* (bf16 on CUDA, fp32 on the CPU); LayerNorm runs and returns fp32; the
residual stream is fp32.  ``exact`` keeps fp32 weights and runs under bf16 autocast on CUDA,
the official unfused projections and the official per-expert MoE loop.  ``fast`` expects bf16
Linear weights (``turbopart.weights`` loads them so), fuses q/k/v (one [3D, D] GEMM) and
cross k/v, and runs the MoE as sorted-token grouped GEMMs without host synchronisation.
Fused weights are *views*: the official parameters are re-pointed into the stacked tensors,
so no second copy is kept.

The ``fast`` sampling step (:class:`~turbopart.xpart.dit_runner.DiTRunner`) runs
:meth:`PartFormerDiT.forward_fused`: the same function as ``forward`` with the memory-bound
glue fused (:mod:`turbopart.nn.kernels.rownorm`): every fp32 residual update writes the
LayerNorm(s) that read it (two for the parallel cross-attentions, the next block's norm1, the
final norm), skips are kept as the compute-dtype copies the concatenation reads, q/k RMSNorms
read the fused projection outputs, the MoE combine rides in the residual update
(:class:`StepOptions`).  ``forward`` keeps the per-block modules (``exact``, golden runs).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import BACKENDS as SDPA_BACKENDS, attention, backend_context
from ..nn.kernels import gemm, rownorm
from ..nn.moe import (MoE, PAD, combine_routes, ffn, grouped_mm_supported, linear, linear_wb,
                      moe_grouped_parts)
from ..nn.norms import apply_norm, norm_eps, rms_norm, rms_rounding
from ..runtime.precision import Numerics, autocast

TARGET = "partgen.models.partformer_dit.PartFormerDITPlain"

#: Constructor defaults of the official class (used for keys a config leaves out).
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "input_size": 1024, "in_channels": 4, "hidden_size": 1024,
    "use_self_attention": True, "use_cross_attention": True, "use_cross_attention_2": True,
    "encoder_hidden_dim": 1024, "encoder_hidden2_dim": 1024, "depth": 24, "num_heads": 16,
    "qk_norm": False, "qkv_bias": True, "norm_type": "layer", "qk_norm_type": "rms",
    "with_decoupled_ca": False, "decoupled_ca_dim": 16, "decoupled_ca_weight": 1.0,
    "use_pos_emb": False, "guidance_cond_proj_dim": None, "num_moe_layers": 6,
    "num_experts": 8, "moe_top_k": 2,
    # read from **kwargs by the official constructor
    "use_bbox_cond": False, "num_freqs": 8, "use_part_embed": False, "valid_num": 50,
    "use_attention_pooling": False,
}


def default_params() -> dict:
    """The official ``model/config.json`` params (``infer.yaml`` model, full size)."""
    return {
        "use_self_attention": True, "use_cross_attention": True, "use_cross_attention_2": True,
        "use_bbox_cond": False, "num_freqs": 8, "use_part_embed": True, "valid_num": 50,
        "input_size": 1024, "in_channels": 64, "hidden_size": 2048,
        "encoder_hidden_dim": 1024, "encoder_hidden2_dim": 1024, "depth": 21, "num_heads": 16,
        "qk_norm": True, "qkv_bias": False, "qk_norm_type": "rms", "with_decoupled_ca": False,
        "decoupled_ca_dim": 4096, "decoupled_ca_weight": 1.0, "use_attention_pooling": False,
        "use_pos_emb": False, "num_moe_layers": 6, "num_experts": 8, "moe_top_k": 2,
    }


def tiny_config() -> dict:
    """The golden ``dit`` case's configuration (hidden 32, 4 heads, depth 5, 2 MoE layers)."""
    p = default_params()
    p.update({"input_size": 32, "in_channels": 8, "hidden_size": 32, "encoder_hidden_dim": 40,
              "encoder_hidden2_dim": 48, "depth": 5, "num_heads": 4, "decoupled_ca_dim": 24,
              "num_moe_layers": 2, "num_experts": 4, "moe_top_k": 2})
    return {"target": TARGET, "params": p}


def resolve_params(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Official constructor arguments from a config (``{"target","params"}`` or bare params)."""
    if config is None:
        params = default_params()
    else:
        params = dict(config.get("params", config)) if "params" in config or "target" in config \
            else dict(config)
        params.pop("target", None)
    out = dict(OFFICIAL_DEFAULTS)
    out.update({k: v for k, v in params.items() if not str(k).startswith("_")})
    if out["use_bbox_cond"]:
        raise ValueError("use_bbox_cond=true cannot be built: the official file does not define "
                         "BboxEmbedder (spec xpart §2.4)")
    if out["hidden_size"] % out["num_heads"]:
        raise ValueError("hidden_size must be divisible by num_heads")
    return out


def draw_part_index(num_parts: int, valid_num: int = 50,
                    generator: torch.Generator | None = None, *, deterministic: bool = False,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Part-embedding rows for one DiT call: ``randperm(valid_num, generator)[:K]``.

    The official forward draws ``torch.randperm(valid_num)[:K]`` from the global CPU
    generator at every call; a CPU ``torch.Generator`` seeded like the global one gives the
    same permutation.  ``deterministic`` returns ``arange(K)`` (no randomness).
    """
    if num_parts > valid_num:
        raise ValueError(f"{num_parts} parts exceed the {valid_num} part embeddings (K <= "
                         f"valid_num; spec xpart §11 item 9)")
    if deterministic:
        return torch.arange(num_parts, device=device)
    if generator is None:
        raise ValueError("pass a torch.Generator (or deterministic=True): turbopart draws no "
                         "hidden global randomness")
    return torch.randperm(valid_num, generator=generator)[:num_parts].to(device)


# --------------------------------------------------------------------------- modules

class TimestepEmbedder(nn.Module):
    """Sinusoid (width D, sin first, t ∈ [0, 1] unscaled) → Linear(D, 4D) → GELU → Linear."""

    def __init__(self, hidden: int, freq_size: int, cond_proj_dim: int | None = None,
                 skip_unused: bool = False):
        super().__init__()
        self.num_channels = hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, freq_size), nn.GELU(),
                                 nn.Linear(freq_size, hidden))
        if cond_proj_dim is not None and not skip_unused:
            # Present in the layout when configured; the pipeline never passes a guidance
            # condition (it is not stored on the model), so it is never used.
            self.cond_proj = nn.Linear(cond_proj_dim, freq_size, bias=False)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """Official ``Timesteps(D)`` (shift 0, scale 1, period 1e4), op for op in fp32."""
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32,
                                                   device=t.device)
        exponent = exponent / (half - 0.0)
        freqs = torch.exp(exponent)
        arg = t.reshape(-1)[:, None].float() * freqs[None, :]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if self.num_channels % 2:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb

    def forward(self, t: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        """[B] timesteps → [B, 1, D] in the compute dtype."""
        h = linear(self.sinusoid(t).to(cd), self.mlp[0])
        return linear(F.gelu(h), self.mlp[2]).unsqueeze(1)


def _qk_norm(kind: str, enabled: bool, head_dim: int) -> nn.Module:
    if not enabled:
        return nn.Identity()
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6, elementwise_affine=True)
    return nn.LayerNorm(head_dim, eps=1e-6, elementwise_affine=True)


class _Attn(nn.Module):
    """Shared helpers of the two attention kinds."""

    heads: int
    head_dim: int
    rms_mode: str
    #: ``fast``: low-precision copies of RMS q/k-norm weights (only when exactly
    #: representable), so PyTorch's fused RMSNorm kernel runs on bf16 inputs.
    lp_norms: dict[str, torch.Tensor]

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.lp_norms.get(name)
        if w is not None and x.dtype == w.dtype and self.rms_mode == "single":
            # One fused kernel: bf16(x · rstd · w) with fp32 math, the same value as the
            # composite for a bf16-exact weight (up to the fp32 rounding of rstd).
            return F.rms_norm(x, (x.shape[-1],), w, norm_eps(getattr(self, name)))
        return apply_norm(getattr(self, name), x, self.rms_mode)

    def _norm_pair(self, x: torch.Tensor, first: str, second: str,
                   pair_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise x[..., 0, :] with norm ``first`` and x[..., 1, :] with ``second``."""
        if pair_weight is not None and not self.lp_norms:
            y = rms_norm(x, pair_weight, norm_eps(getattr(self, first)), self.rms_mode)
            return y[..., 0, :], y[..., 1, :]
        return self._norm(first, x[..., 0, :]), self._norm(second, x[..., 1, :])

    def set_lp_norms(self, dtype: torch.dtype | None) -> None:
        """Keep ``dtype`` copies of the RMS q/k-norm weights that ``dtype`` holds exactly."""
        self.lp_norms = {}
        if dtype is None or dtype == torch.float32:
            return
        for name in ("q_norm", "k_norm", "k_norm_dca"):
            mod = getattr(self, name, None)
            if isinstance(mod, nn.RMSNorm) and mod.weight is not None:
                w = mod.weight.detach()
                lp = w.to(dtype)
                if torch.equal(lp.float(), w.float()):
                    self.lp_norms[name] = lp


def _pair_weight(a: nn.Module, b: nn.Module) -> torch.Tensor | None:
    """Stacked [2, d] weight when two norms are RMSNorms with one eps (fusable)."""
    if isinstance(a, nn.RMSNorm) and isinstance(b, nn.RMSNorm) and a.weight is not None \
            and b.weight is not None and norm_eps(a) == norm_eps(b):
        return torch.stack([a.weight.detach(), b.weight.detach()])
    return None


class SelfAttention(_Attn):
    """``attn1``: local (per part) or global (all parts, one sequence) self-attention."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool, qk_kind: str,
                 use_global: bool):
        super().__init__()
        self.heads, self.head_dim, self.use_global = heads, dim // heads, use_global
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_kind, qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_kind, qk_norm, self.head_dim)
        self.out_proj = nn.Linear(dim, dim)
        self.rms_mode = "single"
        self.lp_norms = {}
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused (w, b)
        self.qk_pair: torch.Tensor | None = None

    def fuse(self) -> None:
        """Stack [W_q; W_k; W_v] into one [3D, D] weight; the params become views of it."""
        if self.qkv is not None:
            return
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).detach()
        d = self.to_q.weight.shape[0]
        b = None
        if self.to_q.bias is not None:
            b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]).detach()
        for j, lin in enumerate((self.to_q, self.to_k, self.to_v)):
            lin.weight = nn.Parameter(w[j * d:(j + 1) * d], requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b[j * d:(j + 1) * d], requires_grad=False)
        self.qkv = (w, b)
        self.qk_pair = _pair_weight(self.q_norm, self.k_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: norm1 output [B, N, D] in the compute dtype; returns out_proj output."""
        b0, n0, d = x.shape
        if self.use_global:
            # Official quirk: global blocks flatten all parts (time tokens included) into one
            # sequence; only the attention core is joint.
            x = x.reshape(1, b0 * n0, d)
        bsz, n, _ = x.shape
        if self.qkv is not None:
            w, b = self.qkv
            u = linear_wb(x, w, b)
        else:
            u = torch.cat([linear(x, self.to_q), linear(x, self.to_k), linear(x, self.to_v)],
                          dim=-1)
        # Official quirk: view cat(q, k, v) as [heads, 3, head_dim] — head h takes
        # consecutive head_dim slices of the concatenation (spec §2.6).
        u = u.view(bsz, n, self.heads, 3, self.head_dim)
        q, k = self._norm_pair(u[..., :2, :], "q_norm", "k_norm", self.qk_pair)
        v = u[..., 2, :]
        cd = x.dtype
        o = attention(q.to(cd).transpose(1, 2), k.to(cd).transpose(1, 2), v.transpose(1, 2))
        o = linear(o.transpose(1, 2).reshape(bsz, n, d), self.out_proj)
        return o.reshape(b0, n0, d)


class CrossAttention(_Attn):
    """``attn2`` / ``attn2_2``: per-part cross-attention to the condition tokens."""

    def __init__(self, dim: int, kdim: int, heads: int, qkv_bias: bool, qk_norm: bool,
                 qk_kind: str, with_dca: bool = False, dca_dim: int = 16,
                 dca_weight: float = 1.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kdim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kdim, dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_kind, qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_kind, qk_norm, self.head_dim)
        self.out_proj = nn.Linear(dim, dim, bias=True)
        self.with_dca = with_dca
        if with_dca:
            self.kv_proj_dca = nn.Linear(kdim, 2 * dim, bias=qkv_bias)
            self.k_norm_dca = _qk_norm(qk_kind, qk_norm, self.head_dim)
            self.dca_dim, self.dca_weight = dca_dim, dca_weight
        self.rms_mode = "single"
        self.lp_norms = {}
        self.kv_fused: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """Stack [W_k; W_v] into one [2D, kdim] weight (params become views)."""
        if self.kv_fused is not None:
            return
        d = self.to_k.weight.shape[0]
        w = torch.cat([self.to_k.weight, self.to_v.weight]).detach()
        b = None
        if self.to_k.bias is not None:
            b = torch.cat([self.to_k.bias, self.to_v.bias]).detach()
        for j, lin in enumerate((self.to_k, self.to_v)):
            lin.weight = nn.Parameter(w[j * d:(j + 1) * d], requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b[j * d:(j + 1) * d], requires_grad=False)
        self.kv_fused = (w, b)

    def kv(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keys/values of the condition ``y`` [B, S, kdim] (compute dtype), after k_norm.

        Returns ``(k, v)`` as contiguous [B, H, S, hd] (plus ``(k_dca, v_dca)`` with the
        decoupled cross-attention).  They depend only on the condition: a sampling call
        computes them once (:class:`turbopart.xpart.dit_runner.DiTRunner`).
        """
        bsz = y.shape[0]
        extra: tuple[torch.Tensor, ...] = ()
        if self.with_dca:
            s = y.shape[1]
            ctx = y[:, s - self.dca_dim:]
            kvd = linear(ctx, self.kv_proj_dca).view(bsz, self.dca_dim, 2, self.heads,
                                                     self.head_dim)
            kd = self._norm("k_norm_dca", kvd[:, :, 0]).to(y.dtype)
            extra = (kd.transpose(1, 2).contiguous(), kvd[:, :, 1].transpose(1, 2).contiguous())
            y = y[:, :s - self.dca_dim]
        s = y.shape[1]
        if self.kv_fused is not None:
            w, b = self.kv_fused
            kvp = linear_wb(y, w, b)
        else:
            kvp = torch.cat([linear(y, self.to_k), linear(y, self.to_v)], dim=-1)
        # Official quirk: cat(k, v) viewed as [heads, 2, head_dim] (spec §2.7).
        kvp = kvp.view(bsz, s, self.heads, 2, self.head_dim)
        k = self._norm("k_norm", kvp[..., 0, :]).to(y.dtype)
        v = kvp[..., 1, :]
        return (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) + extra

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``x``: norm output [B, N, D] (compute dtype); ``kv`` from :meth:`kv`."""
        bsz, n, d = x.shape
        q = linear(x, self.to_q).view(bsz, n, self.heads, self.head_dim)
        q = self._norm("q_norm", q).to(x.dtype).transpose(1, 2)
        o = attention(q, kv[0], kv[1])
        if self.with_dca:
            o = o + self.dca_weight * attention(q, kv[2], kv[3])
        return linear(o.transpose(1, 2).reshape(bsz, n, d), self.out_proj)


class MLP(nn.Module):
    """Dense FFN ``fc1`` (D→4D) → GELU(exact) → ``fc2``."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.fc1)), self.fc2)


class DiTBlock(nn.Module):
    """One official ``PartFormerDitBlock`` (spec §2.5)."""

    def __init__(self, p: Mapping[str, Any], index: int):
        super().__init__()
        d, heads, depth = p["hidden_size"], p["num_heads"], p["depth"]
        self.index = index
        norm = (lambda: nn.LayerNorm(d, eps=1e-6)) if p["norm_type"] == "layer" else \
            (lambda: nn.RMSNorm(d, eps=1e-6))
        qk = "rms" if p["qk_norm_type"] == "rms" else "layer"
        self.use_self_attention = p["use_self_attention"]
        self.use_cross_attention = p["use_cross_attention"]
        self.use_cross_attention_2 = p["use_cross_attention_2"]
        self.is_global = (index + 1) % 2 == 0
        if self.use_self_attention:
            self.norm1 = norm()
            self.attn1 = SelfAttention(d, heads, p["qkv_bias"], p["qk_norm"], qk, self.is_global)
        if self.use_cross_attention:
            self.norm2 = norm()
            self.attn2 = CrossAttention(d, p["encoder_hidden_dim"], heads, p["qkv_bias"],
                                        p["qk_norm"], qk)
        if self.use_cross_attention_2:
            self.norm2_2 = norm()
            self.attn2_2 = CrossAttention(d, p["encoder_hidden2_dim"], heads, p["qkv_bias"],
                                          p["qk_norm"], qk, p["with_decoupled_ca"],
                                          p["decoupled_ca_dim"], p["decoupled_ca_weight"])
        self.norm3 = nn.LayerNorm(d, eps=1e-6) if p["norm_type"] == "layer" else \
            nn.RMSNorm(d, eps=1e-6)
        self.use_moe = depth - index <= p["num_moe_layers"]
        if self.use_moe:
            self.moe = MoE(d, p["num_experts"], p["moe_top_k"], 4 * d)
        else:
            self.mlp = MLP(d)
        self.has_skip = index > depth // 2
        if self.has_skip:
            self.skip_norm = norm()
            self.skip_linear = nn.Linear(2 * d, d)
        self.cd = torch.float32
        self.rms_mode = "single"

    def cross_kv(self, obj: torch.Tensor | None, geo: torch.Tensor | None
                 ) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Cross-attention keys/values of both streams (compute-dtype conditions)."""
        a = self.attn2.kv(obj) if self.use_cross_attention else None
        b = self.attn2_2.kv(geo) if self.use_cross_attention_2 else None
        return a, b

    def _n(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return apply_norm(module, x, self.rms_mode)

    def forward(self, h: torch.Tensor, obj: torch.Tensor | None, geo: torch.Tensor | None,
                skip: torch.Tensor | None = None, kv: tuple | None = None,
                record: dict | None = None) -> torch.Tensor:
        """h [K, L, D] (fp32 residual stream) → h.  ``kv``: cached ``cross_kv`` or None."""
        cd = self.cd
        if self.has_skip:
            # Official quirk: the skip tensor comes FIRST in the concatenation.  The fp32
            # halves are cast straight into one compute-dtype buffer (same values as
            # casting the fp32 concatenation, one pass less).
            d = h.shape[-1]
            cat = torch.empty(*h.shape[:-1], 2 * d, device=h.device, dtype=cd)
            cat[..., :d] = skip
            cat[..., d:] = h
            h = self._n(self.skip_norm, linear(cat, self.skip_linear))
        if self.use_self_attention:
            h = h + self.attn1(self._n(self.norm1, h).to(cd))
        if kv is None:
            kv = self.cross_kv(None if obj is None else obj.to(cd),
                               None if geo is None else geo.to(cd))
        # Both cross-attentions read the same h; official order: (h + a) + b.
        out = h
        if self.use_cross_attention:
            out = out + self.attn2(self._n(self.norm2, h).to(cd), kv[0])
        if self.use_cross_attention_2:
            out = out + self.attn2_2(self._n(self.norm2_2, h).to(cd), kv[1])
        h = out
        x3 = self._n(self.norm3, h)
        if self.use_moe:
            rec = {} if record is not None else None
            if self.moe.impl == "grouped":
                xp = _padded(x3, cd)
                y = self.moe(xp[:, :x3.shape[-1]], record=rec, x_padded=xp)
                y = y.view(*h.shape[:-1], -1)
            else:
                y = self.moe(x3.to(cd), record=rec)
            if record is not None:
                record[f"block{self.index}.moe_topk_idx"] = rec["topk_idx"]
                record[f"block{self.index}.moe_topk_weight"] = rec["topk_weight"]
        else:
            y = self.mlp(x3.to(cd))
        h = h + y
        if record is not None:
            record[f"block{self.index}"] = h
        return h


def _padded(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """Norm output [..., D] → [T, D+PAD] compute-dtype rows with the bias column set to 1."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    out = torch.empty(x2.shape[0], d + PAD, device=x.device, dtype=cd)
    out[:, :d] = x2
    out[:, d:] = 0.0
    out[:, d] = 1.0
    return out


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, h: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        # Official: LayerNorm, drop the time token, Linear.
        x = apply_norm(self.norm_final, h)[:, 1:]
        return linear(x.to(cd), self.linear)


# --------------------------------------------------------------------------- fused fast step

#: Triton kernel groups of the fused ``fast`` step (:class:`StepOptions`):
#: ``ln`` residual update + LayerNorm(s) in one pass (time-token/part-embedding assembly,
#: skip concatenation halves and the final norm included); ``qk`` per-head q/k RMSNorm
#: reading the fused projection outputs; ``moe`` the MoE combine folded into the residual
#: update (needs ``ln``).  ``all`` = these.
KERNEL_GROUPS = ("ln", "qk", "moe")
#: Experimental groups, only when named (``all+gelu`` or a list): ``gelu`` the dense FFN's and
#: the shared expert's first Linear with its GELU as one Triton GEMM
#: (:mod:`turbopart.nn.kernels.gemm`).
OPTIONAL_KERNEL_GROUPS = ("gelu",)
#: Attention kinds whose SDPA backend can be chosen separately.
ATTN_KINDS = ("local", "global", "cross")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a ``fast`` DiT step runs (see :meth:`PartFormerDiT.forward_fused`).

    * ``fused``: the fused-stream step (False: the per-block modules, ``DiTBlock.forward``);
    * ``kernels``: the Triton kernel groups in use (each falls back to its PyTorch
      formulation, which computes the same function);
    * ``sdpa``: SDPA backend per attention kind (``"auto"``: PyTorch's choice);
    * ``kv_layout``: cross-attention K/V computed per step (uncached blocks): ``"strided"``
      = k normalised in place inside the fused k/v GEMM output and both read as strided
      views, ``"contiguous"`` = the cache's [B, H, S, hd] copies.
    """

    fused: bool = True
    kernels: frozenset = frozenset()
    sdpa: tuple = tuple((k, "auto") for k in ATTN_KINDS)
    kv_layout: str = "strided"

    @staticmethod
    def parse_kernels(spec: str | Sequence[str] | None) -> tuple[bool, frozenset]:
        """``"all"``/``"1"``: the default groups; ``"none"``/``"torch"``: the fused step with
        PyTorch ops only; ``"legacy"``/``"0"``/``"off"``: the per-block modules; or a comma
        list of groups (``all`` may appear in it, e.g. ``all,gelu`` or ``all+gelu``)."""
        if spec is None:
            spec = "all"
        if not isinstance(spec, str):
            spec = ",".join(spec)
        s = spec.strip().lower().replace("+", ",")
        if s in ("legacy", "0", "off", "false", "blocks"):
            return False, frozenset()
        if s in ("1", "on", "true", "default", ""):
            return True, frozenset(KERNEL_GROUPS)
        if s in ("none", "torch"):
            return True, frozenset()
        names = set(x.strip() for x in s.split(",") if x.strip())
        if "all" in names:
            names = (names - {"all"}) | set(KERNEL_GROUPS)
        names = frozenset(names)
        bad = names - set(KERNEL_GROUPS) - set(OPTIONAL_KERNEL_GROUPS)
        if bad:
            raise ValueError(f"unknown DiT kernel group(s) {sorted(bad)}; choose from "
                             f"{KERNEL_GROUPS + OPTIONAL_KERNEL_GROUPS}, 'all', 'none' or "
                             f"'legacy'")
        return True, names

    @staticmethod
    def parse_sdpa(spec: str | None) -> tuple:
        """``"cudnn"`` (all kinds) or ``"local=flash,global=cudnn,cross=cudnn"``."""
        out = {k: "auto" for k in ATTN_KINDS}
        s = (spec or "auto").strip().lower()
        for part in s.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                kind, name = (x.strip() for x in part.split("=", 1))
                kinds = [kind]
            else:
                kinds, name = list(ATTN_KINDS), part
            if name not in SDPA_BACKENDS or any(k not in ATTN_KINDS for k in kinds):
                raise ValueError(f"bad SDPA spec {spec!r}: kinds {ATTN_KINDS}, backends "
                                 f"{SDPA_BACKENDS}")
            for k in kinds:
                out[k] = name
        return tuple(out.items())

    @property
    def uniform_sdpa(self) -> str | None:
        """The backend when all kinds use the same one (else None)."""
        names = {n for _, n in self.sdpa}
        return names.pop() if len(names) == 1 else None

    def backend(self, kind: str) -> str:
        return dict(self.sdpa)[kind]

    def describe(self) -> str:
        if not self.fused:
            path = "legacy"
        else:
            path = "fused[" + (",".join(g for g in KERNEL_GROUPS + OPTIONAL_KERNEL_GROUPS
                                        if g in self.kernels) or "torch") + "]"
        sd = self.uniform_sdpa or ",".join(f"{k}={n}" for k, n in self.sdpa)
        return f"{path} sdpa={sd} kv={self.kv_layout}"


def _ln_spec(mod: nn.Module) -> tuple:
    """(fp32 weight | None, fp32 bias | None, eps) of a LayerNorm for the fused kernels."""
    w = None if mod.weight is None else mod.weight.detach().float().contiguous()
    b = None if mod.bias is None else mod.bias.detach().float().contiguous()
    return w, b, float(mod.eps)


def _rms_ok(mod: nn.Module, head_dim: int) -> bool:
    return isinstance(mod, nn.RMSNorm) and mod.weight is not None and \
        head_dim & (head_dim - 1) == 0


def _rms_w(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach().float().contiguous()


class PartFormerDiT(nn.Module):
    """``PartFormerDITPlain`` with the official state-dict layout.

    Call :meth:`prepare` once after loading (the loader does not); then ``forward`` or a
    :class:`~turbopart.xpart.dit_runner.DiTRunner`.
    """

    def __init__(self, params: Mapping[str, Any], skip_unused: bool = False):
        super().__init__()
        p = dict(params)
        self.params = p
        d = p["hidden_size"]
        self.depth, self.hidden_size, self.in_channels = p["depth"], d, p["in_channels"]
        self.num_heads = p["num_heads"]
        self.x_embedder = nn.Linear(p["in_channels"], d)
        self.t_embedder = TimestepEmbedder(d, 4 * d, p["guidance_cond_proj_dim"], skip_unused)
        self.use_pos_emb = p["use_pos_emb"]
        if self.use_pos_emb:
            self.register_buffer("pos_embed", torch.zeros(1, p["input_size"], d))
        self.use_part_embed = p["use_part_embed"]
        self.valid_num = p["valid_num"]
        if self.use_part_embed:
            self.part_embed = nn.Parameter(torch.zeros(p["valid_num"], d))
        self.blocks = nn.ModuleList([DiTBlock(p, i) for i in range(p["depth"])])
        self.final_layer = FinalLayer(d, p["in_channels"])
        self.numerics = Numerics.EXACT
        self.cd = torch.float32
        self.prepared = False

    # ------------------------------------------------------------------ preparation

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def prepare(self, numerics: Numerics | str = Numerics.FAST, *,
                compute_dtype: torch.dtype | None = None, moe_impl: str | None = None,
                fuse: bool | None = None, rms_mode: str | None = None) -> "PartFormerDiT":
        """Choose the arithmetic for ``numerics`` on the weights' device (call after loading).

        * compute dtype: bf16 on CUDA; on the CPU the Linear weights' dtype (fp32 unless a
          test loaded bf16 weights), or ``compute_dtype``;
        * ``fuse`` (default: ``fast``): stacked q/k/v and k/v weights (views, no copy);
        * ``moe_impl``: ``"grouped"`` (default for ``fast`` where ``torch._grouped_mm`` runs)
          or ``"loop"`` (the official per-expert loop; default for ``exact``);
        * ``rms_mode``: RMSNorm rounding for bf16 inputs (default: the installed PyTorch's).
        """
        num = Numerics.parse(numerics)
        dev = self.device
        if dev.type == "meta":
            raise RuntimeError("load the weights before prepare()")
        wdt = self.x_embedder.weight.dtype
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if dev.type == "cuda" else wdt
        fast = num is Numerics.FAST
        fuse = fast if fuse is None else fuse
        if moe_impl is None:
            moe_impl = "grouped" if fast and grouped_mm_supported(
                dev.type, dev.index, compute_dtype) else "loop"
        rms_mode = rms_mode or rms_rounding()
        self.numerics, self.cd = num, compute_dtype
        for m in self.modules():
            if hasattr(m, "rms_mode"):
                m.rms_mode = rms_mode
            if isinstance(m, DiTBlock):
                m.cd = compute_dtype
            if isinstance(m, _Attn):
                m.set_lp_norms(compute_dtype if fast else None)
        for blk in self.blocks:
            if fuse:
                if blk.use_self_attention:
                    blk.attn1.fuse()
                for name in ("attn2", "attn2_2"):
                    if hasattr(blk, name):
                        getattr(blk, name).fuse()
            if blk.use_moe:
                if moe_impl == "grouped":
                    blk.moe.stack()
                blk.moe.impl = moe_impl
        self.prepared = True
        return self

    def reset_non_persistent(self, device: torch.device) -> None:
        """No non-persistent buffers (kept for the loader contract)."""

    # ------------------------------------------------------------------ forward pieces

    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        """[B] (or a scalar) timesteps in [0, 1] → [B, 1, D] compute-dtype time tokens."""
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        return self.t_embedder(t, self.cd)

    def embed(self, x: torch.Tensor, c: torch.Tensor, part_index: torch.Tensor | None,
              record: dict | None = None) -> torch.Tensor:
        """Latents [K, n, C] + time tokens [K or 1, 1, D] → h [K, 1+n, D] (fp32 stream)."""
        k = x.shape[0]
        xe = linear(x.to(self.cd), self.x_embedder)
        if record is not None:
            record["x_embed"] = xe
        if self.use_pos_emb:
            xe = xe + self.pos_embed.to(xe.dtype)
        if self.use_part_embed:
            if part_index is None:
                raise ValueError("part_index [K] is required (see draw_part_index)")
            if k > self.valid_num:
                raise ValueError(f"K = {k} parts exceed valid_num = {self.valid_num}")
            idx = torch.as_tensor(part_index, device=xe.device).reshape(-1).long()
            # fp32 embedding + bf16 projection promotes the stream to fp32 (spec §2.9).
            xe = xe + self.part_embed[idx].unsqueeze(1)
        c = c.expand(k, 1, c.shape[-1]) if c.shape[0] != k else c
        # Official: the time token goes FIRST.
        return torch.cat([c, xe], dim=1)

    def run_blocks(self, h: torch.Tensor, obj: torch.Tensor | None, geo: torch.Tensor | None,
                   kv: list | None = None, record: dict | None = None,
                   block_fns: list | None = None) -> torch.Tensor:
        """All blocks with the long-skip stack (block i > depth//2 pops, i < depth//2 pushes)."""
        half = self.depth // 2
        skips: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            skip = skips.pop() if i > half else None
            fn = blk if block_fns is None else block_fns[i]
            h = fn(h, obj, geo, skip, None if kv is None else kv[i], record)
            if i < half:
                skips.append(h)
        return h

    # ------------------------------------------------------------------ fused fast step

    def fused_supported(self) -> bool:
        """Whether :meth:`forward_fused` applies: ``fast`` numerics and the official block
        structure (fp32 stream from the part embedding, LayerNorm blocks, self-attention)."""
        p = self.params
        return (self.numerics is Numerics.FAST and self.use_part_embed and not self.use_pos_emb
                and p["norm_type"] == "layer" and p["use_self_attention"])

    def forward_fused(self, x: torch.Tensor, c: torch.Tensor, part_index: torch.Tensor,
                      obj: torch.Tensor | None, geo: torch.Tensor | None, kv: list | None,
                      opts: StepOptions) -> torch.Tensor:
        """One ``fast`` step as a fused stream: velocity [K, n, C] (compute dtype).

        Same function as ``final_layer(run_blocks(embed(x, c, part_index)))`` up to fp32
        reduction order: every residual update is fused with the LayerNorm(s) that read its
        result (the next block's norm1 included), the skip concatenation's halves are written
        by the kernels that produce them (skips are kept as compute-dtype copies, which is
        what the concatenation reads), q/k RMSNorms read the fused projection outputs, the
        MoE combine rides in the residual update.  ``c``: time tokens [1 or K, 1, D];
        ``kv[i]``: cached ``cross_kv`` of block i or None (computed here from ``obj``/``geo``).
        """
        cd = self.cd
        k, n, _ = x.shape
        d, depth = self.hidden_size, self.depth
        half = depth // 2
        L = n + 1
        dev = x.device
        blocks = self.blocks
        use_ln = "ln" in opts.kernels
        xe = linear(x.to(cd), self.x_embedder)
        idx = torch.as_tensor(part_index, device=dev).reshape(-1).long()
        x1 = torch.empty(k, L, d, device=dev, dtype=cd)
        if use_ln:
            h = torch.empty(k, L, d, device=dev, dtype=torch.float32)
            rownorm.embed_ln(xe, c, self.part_embed, idx, _ln_spec(blocks[0].norm1), h, x1)
        else:
            # fp32 part embedding + compute-dtype projection → fp32 stream, time token first
            h = torch.cat([c.expand(k, 1, d), xe + self.part_embed[idx].unsqueeze(1)], dim=1)
            x1.copy_(apply_norm(blocks[0].norm1, h))
        del xe
        skips: list[torch.Tensor] = []
        cat: torch.Tensor | None = None
        out = None
        for i, blk in enumerate(blocks):
            if blk.has_skip:
                # Official quirk: skip first.  Both halves were written by earlier kernels.
                z = linear(cat, blk.skip_linear)
                cat = None
                x1 = torch.empty(k, L, d, device=dev, dtype=cd)
                h = self._update(z, opts, pre=blk.skip_norm, norms=[(blk.norm1, x1, 0)])
                del z
            o = self._self_attn_fused(blk.attn1, x1, opts).view(k, L, d)
            del x1
            moe = blk.use_moe and blk.moe.impl == "grouped"
            # MoE input rows [T, D+PAD] (bias column), allocated with a row stride that is a
            # multiple of 16 elements (aligned rows for the kernels and the grouped GEMM)
            x3 = torch.empty(k * L, d + -(-PAD // 16) * 16, device=dev,
                             dtype=cd)[:, :d + PAD] if moe else \
                torch.empty(k, L, d, device=dev, dtype=cd)
            f_norm = [(blk.norm3, x3, PAD if moe else 0)]
            cross = [(blk.attn2, blk.norm2, 0)] if blk.use_cross_attention else []
            if blk.use_cross_attention_2:
                cross.append((blk.attn2_2, blk.norm2_2, 1))
            if cross:
                xs = [torch.empty(k, L, d, device=dev, dtype=cd) for _ in cross]
                h = self._update(h, opts, adds=[o], norms=[(nm, xq, 0) for (_, nm, _), xq
                                                           in zip(cross, xs)])
                del o
                kvs = kv[i] if kv is not None and kv[i] is not None else \
                    self._step_kv(blk, obj, geo, opts)
                outs = [self._cross_fused(attn, xq, kvs[j], opts)
                        for (attn, _, j), xq in zip(cross, xs)]
                del xs, kvs
                h = self._update(h, opts, adds=outs, norms=f_norm)
                del outs
            else:
                h = self._update(h, opts, adds=[o], norms=f_norm)
                del o
            # feed-forward
            parts = None
            fc1_gelu = gemm.linear_gelu if "gelu" in opts.kernels else None
            if moe:
                parts = moe_grouped_parts(blk.moe, x3[:, :d], x3, fc1_gelu=fc1_gelu)
                adds = []
            elif blk.use_moe:
                adds = [blk.moe(x3.view(-1, d)).view(k, L, d)]
            elif fc1_gelu is not None:
                hid = fc1_gelu(x3.view(-1, d), blk.mlp.fc1.weight, blk.mlp.fc1.bias)
                adds = [linear(hid, blk.mlp.fc2).view(k, L, d)]
                del hid
            else:
                adds = [ffn(x3, blk.mlp.fc1, blk.mlp.fc2, inplace=True)]
            del x3
            # residual update fused with what reads it next
            if i == depth - 1:
                xf = torch.empty(k, L, d, device=dev, dtype=cd)
                self._update(h, opts, adds=adds, moe=parts, write_h=False,
                             norms=[(self.final_layer.norm_final, xf, 0)])
                h = None
                # Official: LayerNorm, drop the time token, Linear.
                out = linear(xf[:, 1:].contiguous(), self.final_layer.linear)
            elif blocks[i + 1].has_skip:
                cat = torch.empty(k, L, 2 * d, device=dev, dtype=cd)
                src = skips.pop()
                self._update(h, opts, adds=adds, moe=parts, write_h=False, hb=cat[..., d:],
                             skip_copy=(src, cat[..., :d]))
                h = None
                del src
            else:
                x1 = torch.empty(k, L, d, device=dev, dtype=cd)
                hb = None
                if i < half:
                    hb = torch.empty(k, L, d, device=dev, dtype=cd)
                    skips.append(hb)
                h = self._update(h, opts, adds=adds, moe=parts, hb=hb,
                                 norms=[(blocks[i + 1].norm1, x1, 0)])
            del adds, parts
        return out

    def _update(self, base: torch.Tensor, opts: StepOptions, *, pre: nn.Module | None = None,
                adds: Sequence[torch.Tensor] = (), moe: tuple | None = None,
                norms: Sequence[tuple[nn.Module, torch.Tensor, int]] = (),
                write_h: bool = True, hb: torch.Tensor | None = None,
                skip_copy: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor | None:
        """h = pre(base) + adds (+ MoE combine); write LN_i(h) into the ``norms`` outputs."""
        if "ln" in opts.kernels:
            if moe is not None and "moe" not in opts.kernels:
                adds = list(adds) + [combine_routes(*moe).view(base.shape)]
                moe = None
            h_out = None
            if write_h:
                h_out = base if (pre is None and base.dtype == torch.float32) else \
                    torch.empty(base.shape, device=base.device, dtype=torch.float32)
            rownorm.residual_ln(
                base, pre=None if pre is None else _ln_spec(pre), adds=adds, moe=moe,
                norms=[(_ln_spec(m), o, pad) for m, o, pad in norms], h_out=h_out,
                hb_out=hb, skip_copy=skip_copy)
            return h_out
        # The PyTorch formulation (the per-block modules' arithmetic, op for op).
        h = apply_norm(pre, base) if pre is not None else base
        for a in adds:
            h = h + a
        if moe is not None:
            h = h + combine_routes(*moe).view(h.shape)
        d = h.shape[-1]
        for mod, o, pad in norms:
            o2 = o.view(-1, o.shape[-1])
            o2[:, :d] = apply_norm(mod, h).reshape(-1, d)
            if pad:
                o2[:, d:] = 0.0
                o2[:, d] = 1.0
        if hb is not None:
            hb.copy_(h)
        if skip_copy is not None:
            skip_copy[1].copy_(skip_copy[0])
        return h

    def _sdpa(self, kind: str, opts: StepOptions, q, k, v) -> torch.Tensor:
        name = opts.backend(kind) if opts.uniform_sdpa is None else "auto"
        if name == "auto":
            return attention(q, k, v)
        with backend_context(name):
            return attention(q, k, v)

    def _self_attn_fused(self, attn: "SelfAttention", x1: torch.Tensor, opts: StepOptions
                         ) -> torch.Tensor:
        """Self-attention of the norm1 output [K, L, D] → out_proj output [K·L, D]."""
        k, L, d = x1.shape
        t = k * L
        hh, hd = attn.heads, attn.head_dim
        cd = x1.dtype
        x2 = x1.view(t, d)
        if attn.qkv is not None:
            u = linear_wb(x2, *attn.qkv)
        else:
            u = torch.cat([linear(x2, attn.to_q), linear(x2, attn.to_k), linear(x2, attn.to_v)],
                          dim=-1)
        # Official quirk: cat(q, k, v) viewed as [heads, 3, head_dim] (spec §2.6).
        u = u.view(t, hh, 3, hd)
        if "qk" in opts.kernels and _rms_ok(attn.q_norm, hd) and _rms_ok(attn.k_norm, hd):
            q = torch.empty(t, hh, hd, device=u.device, dtype=cd)
            kk = torch.empty(t, hh, hd, device=u.device, dtype=cd)
            rownorm.rms_heads(u[:, :, 0], _rms_w(attn.q_norm), norm_eps(attn.q_norm), q,
                              x2=u[:, :, 1], w2=_rms_w(attn.k_norm),
                              eps2=norm_eps(attn.k_norm), out2=kk,
                              double=attn.rms_mode == "double")
        else:
            q, kk = attn._norm_pair(u[:, :, :2], "q_norm", "k_norm", attn.qk_pair)
            q, kk = q.to(cd), kk.to(cd)
        v = u[:, :, 2]
        # Global blocks: all parts (time tokens included) as one sequence.
        b, n = (1, t) if attn.use_global else (k, L)
        o = self._sdpa("global" if attn.use_global else "local", opts,
                       q.reshape(b, n, hh, hd).transpose(1, 2),
                       kk.reshape(b, n, hh, hd).transpose(1, 2),
                       v.reshape(b, n, hh, hd).transpose(1, 2))
        return linear(o.transpose(1, 2).reshape(t, d), attn.out_proj)

    def _cross_fused(self, attn: "CrossAttention", xq: torch.Tensor, kv: tuple,
                     opts: StepOptions) -> torch.Tensor:
        """Cross-attention of a norm output [K, L, D] to cached/step K/V → [K, L, D]."""
        k, L, d = xq.shape
        t = k * L
        hh, hd = attn.heads, attn.head_dim
        q = linear(xq.view(t, d), attn.to_q).view(t, hh, hd)
        if "qk" in opts.kernels and _rms_ok(attn.q_norm, hd):
            rownorm.rms_heads(q, _rms_w(attn.q_norm), norm_eps(attn.q_norm), q,
                              double=attn.rms_mode == "double")
        else:
            q = attn._norm("q_norm", q).to(xq.dtype)
        q4 = q.reshape(k, L, hh, hd).transpose(1, 2)
        o = self._sdpa("cross", opts, q4, kv[0], kv[1])
        if attn.with_dca:
            o = o + attn.dca_weight * self._sdpa("cross", opts, q4, kv[2], kv[3])
        return linear(o.transpose(1, 2).reshape(t, d), attn.out_proj).view(k, L, d)

    def _step_kv(self, blk: "DiTBlock", obj: torch.Tensor | None, geo: torch.Tensor | None,
                 opts: StepOptions) -> tuple:
        """Cross K/V of an uncached block, computed in the step."""
        cd = self.cd
        a = self._kv_fused(blk.attn2, obj.to(cd), opts) if blk.use_cross_attention else None
        b = self._kv_fused(blk.attn2_2, geo.to(cd), opts) if blk.use_cross_attention_2 \
            else None
        return a, b

    def _kv_fused(self, attn: "CrossAttention", y: torch.Tensor, opts: StepOptions) -> tuple:
        hh, hd = attn.heads, attn.head_dim
        if (opts.kv_layout != "strided" or attn.with_dca or attn.kv_fused is None
                or not _rms_ok(attn.k_norm, hd)):
            return attn.kv(y)
        bsz, s, e = y.shape
        kvp = linear_wb(y.reshape(bsz * s, e), *attn.kv_fused).view(bsz * s, hh, 2, hd)
        # Official quirk: cat(k, v) viewed as [heads, 2, head_dim] (spec §2.7); k_norm in
        # place, then k and v are read as strided [B, H, S, hd] views.
        kh = kvp[:, :, 0]
        if "qk" in opts.kernels:
            rownorm.rms_heads(kh, _rms_w(attn.k_norm), norm_eps(attn.k_norm), kh,
                              double=attn.rms_mode == "double")
        else:
            kh.copy_(attn._norm("k_norm", kh))
        kvp = kvp.view(bsz, s, hh, 2, hd)
        return kvp[:, :, :, 0].transpose(1, 2), kvp[:, :, :, 1].transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, contexts: Mapping[str, torch.Tensor],
                part_index: torch.Tensor | None = None, *, record: dict | None = None,
                **_: Any) -> torch.Tensor:
        """Velocity [K, n, C] for latents ``x`` [K, n, C] at timesteps ``t`` [K] in [0, 1].

        ``contexts``: ``{"obj_cond": [K, S1, E1], "geo_cond": [K, S2, E2]}``.  ``part_index``
        [K]: the part-embedding rows (the official random draw, made explicit).  ``record``
        collects ``t_embed``, ``x_embed``, ``block{i}`` and the MoE routing.  Extra official
        keyword arguments (``aabb``, ``num_tokens``) are accepted and ignored.
        """
        with autocast(self.numerics, self.device), torch.no_grad():
            c = self.time_embed(t)
            if record is not None:
                record["t_embed"] = c
            h = self.embed(x, c, part_index, record)
            obj, geo = contexts.get("obj_cond"), contexts.get("geo_cond")
            h = self.run_blocks(h, obj, geo, None, record)
            return self.final_layer(h, self.cd)


def build(config: dict | None = None, *, skip_unused: bool = False) -> PartFormerDiT:
    """Build the DiT from its ``config.json`` (official form; ``None`` = full size)."""
    return PartFormerDiT(resolve_params(config), skip_unused=skip_unused)


def clone_model(model: PartFormerDiT) -> PartFormerDiT:
    """A deep copy (tests compare formulations on equal weights)."""
    return copy.deepcopy(model)


def materialize_random(model: PartFormerDiT, *, device: torch.device | str = "cpu",
                       numerics: Numerics | str = Numerics.EXACT, std: float = 0.02,
                       seed: int = 0, linear_dtype: torch.dtype | None = None
                       ) -> PartFormerDiT:
    """Give a meta-built model random weights directly on ``device`` (no CPU init).

    Plain init (benchmarks): matrices N(0, std²), biases 0, norm weights 1 / biases 0.
    Linear weights take ``linear_dtype`` (default: bf16 for ``fast`` on CUDA, else fp32);
    norms, ``part_embed`` and buffers stay fp32.
    """
    from ..runtime.precision import compute_dtype as _cdt
    from ..weights import materialize_random as _materialize
    device = torch.device(device)
    num = Numerics.parse(numerics)
    lin_dt = linear_dtype or _cdt(num, device)
    dtypes = {f"{mn}.{pn}" if mn else pn: lin_dt
              for mn, m in model.named_modules() if isinstance(m, nn.Linear)
              for pn, _ in m.named_parameters(recurse=False)}
    # exact: requires_grad like the official module, so autocast caches its bf16 casts
    return _materialize(model, device, dtypes=dtypes, std=std, seed=seed,
                        requires_grad=num is Numerics.EXACT)
