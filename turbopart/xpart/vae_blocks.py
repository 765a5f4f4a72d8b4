"""Attention blocks of the ShapeVAE (official ``autoencoders/attention_blocks.py`` layout).

Every block computes with an explicit matmul dtype ``cdt`` that reproduces what the
official code gets under ``torch.autocast("cuda", bfloat16)`` (spec xpart §5.4):

* ``nn.Linear``: input, weight and bias rounded to ``cdt``, output in ``cdt``;
* ``LayerNorm`` (ln_*, q_norm, k_norm, ln_post): computed in fp32, **returns fp32**;
* GELU (exact erf) in the dtype of its input; SDPA on q/k/v rounded to ``cdt``;
* residual sums follow type promotion (bf16 + bf16 stays bf16 inside the VAE).

On the CPU ``cdt`` is the weights' dtype (fp32 for the golden cases); on CUDA it is bf16 for
both numerics (``exact``: fp32 weights rounded per call, as autocast does; ``fast``: weights
already stored in bf16).  Head layouts (spec xpart §3.2, README "Attention head layout"):
``c_qkv`` output viewed per head as ``[q | k | v]`` ([H, 3, d]); ``c_kv`` output per head as
``[k | v]`` ([H, 2, d]).  q_norm / k_norm are LayerNorms over the head dim (eps 1e-6).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import attention

#: LayerNorm eps inside the attention blocks (ln_1/2/3, q_norm, k_norm); ln_post uses 1e-5.
BLOCK_EPS = 1e-6


def compute_dtype(device: torch.device | str, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype of a VAE forward: bf16 on CUDA (the official autocast), otherwise
    the dtype the weights are stored in (fp32 normally; bf16 when a test loads bf16)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return weight.dtype if weight.is_floating_point() else torch.float32


def linear(x: torch.Tensor, layer: nn.Linear, cdt: torch.dtype) -> torch.Tensor:
    """``layer(x)`` with autocast semantics: everything rounded to ``cdt`` first.

    On CUDA an inner dimension that is not a multiple of 8 (the encoders' 55 input columns)
    is zero-padded on both operands: aligned rows for the tensor-core GEMM, same sums."""
    w, b = layer.weight, layer.bias
    if w.dtype != cdt:
        w = w.to(cdt)
    if b is not None and b.dtype != cdt:
        b = b.to(cdt)
    x = x.to(cdt)
    pad = -x.shape[-1] % 8
    if pad and x.is_cuda:
        x = F.pad(x, (0, pad))
        w = F.pad(w, (0, pad))
    return F.linear(x, w, b)


def layer_norm(x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
    """LayerNorm in fp32, fp32 result (autocast runs layer_norm in fp32); Identity passes."""
    if not isinstance(ln, nn.LayerNorm):
        return x
    w = None if ln.weight is None else ln.weight.float()
    b = None if ln.bias is None else ln.bias.float()
    return F.layer_norm(x.float(), ln.normalized_shape, w, b, ln.eps)


def head_norm(x: torch.Tensor, ln: nn.Module, cdt: torch.dtype, fused: bool
              ) -> torch.Tensor:
    """``layer_norm(x, ln).to(cdt)`` of a head view ``[B, N, H, d]`` (q_norm / k_norm),
    as a new ``[B, N, H, d]`` tensor.

    ``fused`` (the caller's weights are stored in ``cdt``, i.e. ``fast``), on a device where
    Triton runs: one kernel pass over the strided heads
    (:func:`~turbopart.nn.kernels.rownorm.ln_heads`: fp32 statistics, one rounding to
    ``cdt``, the same rounding points; only the fp32 reduction order differs) instead of
    PyTorch's copy → fp32 LayerNorm → cast, whose kernel is slow on 64-wide rows (≈ 45 ms
    of a K = 8 conditioner call).  Otherwise, and after a kernel failure, the PyTorch ops.
    """
    def ref():
        return layer_norm(x, ln).to(cdt)
    if not (fused and isinstance(ln, nn.LayerNorm) and ln.weight is not None
            and ln.bias is not None and x.dim() == 4):
        return ref()
    from ..nn import kernels
    if not kernels.available(x.device):
        return ref()
    from ..nn.kernels import rownorm
    b, n, h, d = x.shape
    out = torch.empty((b, n, h, d), dtype=cdt, device=x.device)

    def fused_path():
        rownorm.ln_heads(x.view(b * n, h, d), ln.weight, ln.bias, ln.eps,
                         out.view(b * n, h, d))
        return out
    return kernels.run_or_fallback("ln_heads", fused_path, ref)


def _norm(d: int, qk_norm: bool) -> nn.Module:
    return nn.LayerNorm(d, eps=BLOCK_EPS) if qk_norm else nn.Identity()


class QKNorm(nn.Module):
    """The official ``attn.attention`` submodule: per-head q_norm / k_norm (or identities)."""

    def __init__(self, head_dim: int, qk_norm: bool):
        super().__init__()
        self.q_norm = _norm(head_dim, qk_norm)
        self.k_norm = _norm(head_dim, qk_norm)


class MLP(nn.Module):
    """c_fc → GELU (exact) → c_proj."""

    def __init__(self, width: int, expand_ratio: int = 4):
        super().__init__()
        self.c_fc = nn.Linear(width, width * expand_ratio)
        self.c_proj = nn.Linear(width * expand_ratio, width)

    def forward(self, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.c_fc, cdt)), self.c_proj, cdt)


class SelfAttention(nn.Module):
    """Official ``MultiheadAttention``: c_qkv (per head [q|k|v]), qk LayerNorm, SDPA, c_proj."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKNorm(width // heads, qk_norm)

    def forward(self, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = linear(x, self.c_qkv, cdt).view(b, n, self.heads, 3, -1)
        fused = self.c_qkv.weight.dtype == cdt
        q = head_norm(qkv[..., 0, :], self.attention.q_norm, cdt, fused)
        k = head_norm(qkv[..., 1, :], self.attention.k_norm, cdt, fused)
        v = qkv[..., 2, :]
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return linear(out.transpose(1, 2).reshape(b, n, -1), self.c_proj, cdt)


class KV(NamedTuple):
    """Cached cross-attention keys/values, [B, H, T, d] each, in the matmul dtype."""
    k: torch.Tensor
    v: torch.Tensor


class CrossAttention(nn.Module):
    """Official ``MultiheadCrossAttention``: c_q, c_kv (per head [k|v]), qk LayerNorm, c_proj."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool,
                 data_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.c_q = nn.Linear(width, width, bias=qkv_bias)
        self.c_kv = nn.Linear(data_width or width, 2 * width, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKNorm(width // heads, qk_norm)

    def kv(self, data_normed: torch.Tensor, cdt: torch.dtype) -> KV:
        """Keys (after k_norm) and values of ``data`` (already through ln_2)."""
        b, t, _ = data_normed.shape
        kv = linear(data_normed, self.c_kv, cdt).view(b, t, self.heads, 2, -1)
        k = head_norm(kv[..., 0, :], self.attention.k_norm, cdt, self.c_kv.weight.dtype == cdt)
        return KV(k.transpose(1, 2).contiguous(), kv[..., 1, :].transpose(1, 2).contiguous())

    def kv_into(self, data_normed: torch.Tensor, cdt: torch.dtype, out: KV, start: int) -> None:
        """:meth:`kv` of rows ``start:start+t`` written into preallocated ``out``."""
        t = data_normed.shape[1]
        kv = self.kv(data_normed, cdt)
        out.k[:, :, start:start + t] = kv.k
        out.v[:, :, start:start + t] = kv.v

    def query(self, x_normed: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """q after q_norm, [B, H, N, d] (a transposed view)."""
        b, n, _ = x_normed.shape
        q = linear(x_normed, self.c_q, cdt).view(b, n, self.heads, -1)
        return head_norm(q, self.attention.q_norm, cdt,
                         self.c_q.weight.dtype == cdt).transpose(1, 2)

    def attend(self, q: torch.Tensor, kv: KV, cdt: torch.dtype) -> torch.Tensor:
        b, _, n, _ = q.shape
        out = attention(q, kv.k, kv.v)
        return linear(out.transpose(1, 2).reshape(b, n, -1), self.c_proj, cdt)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN self-attention block: x + attn(ln_1 x); x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.attn = SelfAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width, eps=BLOCK_EPS)
        self.mlp = MLP(width)
        self.ln_2 = nn.LayerNorm(width, eps=BLOCK_EPS)

    def forward(self, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        x = x + self.attn(layer_norm(x, self.ln_1), cdt)
        return x + self.mlp(layer_norm(x, self.ln_2), cdt)


class Transformer(nn.Module):
    """``resblocks.{i}``: a stack of :class:`ResidualAttentionBlock` (no final norm)."""

    def __init__(self, width: int, layers: int, heads: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, qkv_bias, qk_norm) for _ in range(layers))

    def forward(self, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, cdt)
        return x


class ResidualCrossAttentionBlock(nn.Module):
    """x + attn(ln_1 x, ln_2 data); x + mlp(ln_3 x).  ``kv`` / ``forward_kv`` split the data
    side off so it can be computed once and reused (encoder object copies, decoder chunks)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, qk_norm: bool,
                 mlp_expand_ratio: int = 4, data_width: int | None = None):
        super().__init__()
        self.attn = CrossAttention(width, heads, qkv_bias, qk_norm, data_width)
        self.ln_1 = nn.LayerNorm(width, eps=BLOCK_EPS)
        self.ln_2 = nn.LayerNorm(data_width or width, eps=BLOCK_EPS)
        self.ln_3 = nn.LayerNorm(width, eps=BLOCK_EPS)
        self.mlp = MLP(width, mlp_expand_ratio)

    def kv(self, data: torch.Tensor, cdt: torch.dtype, rows: int | None = None) -> KV:
        """Keys/values of ``data`` [B, T, C]; with ``rows`` the data side (ln_2 in fp32,
        c_kv, k_norm) runs in row chunks so that only the final K/V are ever whole."""
        b, t, _ = data.shape
        if rows is None or rows >= t:
            return self.attn.kv(layer_norm(data, self.ln_2), cdt)
        h = self.attn.heads
        d = self.attn.c_kv.weight.shape[0] // (2 * h)
        out = KV(data.new_empty(b, h, t, d, dtype=cdt), data.new_empty(b, h, t, d, dtype=cdt))
        for s in range(0, t, rows):
            self.attn.kv_into(layer_norm(data[:, s:s + rows], self.ln_2), cdt, out, s)
        return out

    def forward_kv(self, x: torch.Tensor, kv: KV, cdt: torch.dtype) -> torch.Tensor:
        x = x + self.attn.attend(self.attn.query(layer_norm(x, self.ln_1), cdt), kv, cdt)
        return x + self.mlp(layer_norm(x, self.ln_3), cdt)

    def forward(self, x: torch.Tensor, data: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        return self.forward_kv(x, self.kv(data, cdt), cdt)
