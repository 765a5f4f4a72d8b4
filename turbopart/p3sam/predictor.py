"""Batched prompt evaluation of the P3-SAM heads without per-pair concatenations.

Official behaviour reproduced (spec p3sam §4): for every prompt q and point (f, p)

* stage 1: ``L1_h = seg_mlp_h([f, p, q])`` for h = 1..3;
* stage 2: ``G = max_n seg_s2_mlp_g([f, p, q, L1])``, ``L2_h = seg_s2_mlp_h([G, f, p, q, L1])``;
* IoU: ``iou = sigmoid(iou_mlp_out(max_n iou_mlp([G, f, p, q, L2])))`` (official quirk: the
  IoU input ends with the *stage-2* logits, the stage-2 input with the stage-1 logits);
* masks ``sigmoid(L2) > 0.5`` (strict; sigmoid first, as the official code), best mask =
  argmax of the three predicted IoUs (first index on ties, like ``np.argmax``).

Fast formulation (spec §7.2): every first Linear acts on a concatenation, so it splits into a
**per-point** term (f, p and the bias: one GEMM per point set, :class:`PointTerms`), a
**per-prompt** term (q, and G for the stage-2/IoU heads: a broadcast add) and a **rank-3
per-pair** term (the previous stage's three logits).  What is left per (point, prompt) pair is
GELU, the F×F / S×S hidden layers, and either the 1-wide output (a dot product) or the
S-wide output reduced by a running max over the points.  Stage 2 needs G, a max over *all*
points, so there are two passes over the points: pass 1 computes the stage-1 logits (kept,
fp32) and G; pass 2 computes the stage-2 logits and the IoU feature.

Two kernels (three with the 16-bit variant) evaluate the per-pair part:

* ``torch``: chunks of points × prompts with plain GEMMs (fp32 for ``exact``, bf16 weights
  for ``fast`` on CUDA).  Memory O(chunk × prompts × width); chunk sizes come from
  :mod:`turbopart.runtime.memory`; CPU, the ``exact`` numerics and the fallback.
* ``triton`` (CUDA, ``fast``): one fused kernel per head group.  A program owns a tile of
  points for one prompt; it forms ``GELU(U + V + R·Wr)`` in registers, runs the hidden
  layer(s) on tensor cores in bf16 with fp32 accumulation, fuses bias + GELU, and either
  writes the logits or folds the tile into the prompt's running max with ``atomic_max``.
  Nothing per pair is materialised, so a prompt batch costs only its logits (24 B per point).
* ``triton`` with ``heads="f16"`` / ``"bf16x2"`` (:class:`_HalfPairs`, switch
  ``TURBOPART_P3SAM_HEADS``): the same fused kernel with every per-pair element-wise step in
  packed 16-bit arithmetic (two values per instruction), BK = 32 tiles (no wgmma
  serialisation) and optionally the 1-wide logit layer on the tensor cores; it falls back to
  the kernel above, with a warning, if it does not compile or fp16 could overflow.

Numerics: ``exact`` is fp32 throughout (TF32 off), equal to the official forward up to float
summation order.  ``fast`` on CUDA: bf16 hidden-layer weights and activations with fp32
accumulation, per-point first-layer terms stored in bf16 (computed in TF32), and by default
the tanh form of GELU on the MUFU unit inside the Triton kernel; first-layer sums, logits,
maxima and the IoU head stay fp32.  Borderline points (|logit| ≈ 0) may flip (spec §7.2).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import memory
from ..runtime.precision import Numerics, compute_dtype

try:  # Triton is optional: CUDA fast path only.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

#: Number of heads of each multi-head stage (official: 3 masks).
NUM_MASKS = 3
#: Budget cap of the per-point term GEMM's fp32 temporaries (bytes).
TERMS_CHUNK_BYTES = 256 * 2**20
#: Budget cap of the PyTorch kernel's per-chunk activations: GEMMs of a few 100k rows are
#: already at full speed, more only raises the peak memory.
TORCH_KERNEL_CAP_BYTES = 8 * 2**30


# =========================================================================== results

@dataclass
class PromptPredictions:
    """Per-prompt outputs, prompts in the order given (all on the predictor's device)."""

    masks: torch.Tensor  # [P, N] bool: the best-of-3 mask of every prompt
    iou: torch.Tensor  # [P] float32: predicted IoU of that mask
    best_head: torch.Tensor  # [P] int64 in 0..2
    pred_iou: torch.Tensor  # [P, 3] float32 (sigmoid)
    all_masks: torch.Tensor | None = None  # [P, 3, N] bool when requested
    # With ``logits=True`` (golden runner, debugging):
    stage1_logits: torch.Tensor | None = None  # [P, N, 3] float32
    stage2_logits: torch.Tensor | None = None  # [P, N, 3] float32
    global_feat: torch.Tensor | None = None  # [P, S] stage-2 global feature (bias included)
    iou_feat: torch.Tensor | None = None  # [P, S] pooled IoU feature (bias included)
    iou_logits: torch.Tensor | None = None  # [P, 3]


# =========================================================================== split weights

class _Halved:
    """``halved()`` of a tail: its two weights that read a GELU (``w2t`` and the output
    weight named by ``OUT``) times 1/2, for kernels computing 2·GELU; made once."""

    OUT = "w3"

    def halved(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._half is None:
            self._half = (self.w2t * 0.5, getattr(self, self.OUT) * 0.5)
        return self._half


@dataclass
class _LogitTail(_Halved):
    """Hidden layer + 1-wide output of H heads: ``w3 · GELU(x W2ᵀ + b2) + b3``."""

    w2t: torch.Tensor  # [H, D, D] (in, out), compute dtype
    b2: torch.Tensor  # [H, D] fp32
    w3: torch.Tensor  # [H, D] fp32
    b3: torch.Tensor  # [H] fp32
    _half: tuple | None = None


@dataclass
class _MaxTail(_Halved):
    """Hidden layer + D-wide output, max-pooled over points: ``max_n (GELU(x W2ᵀ + b2) W3ᵀ) + b3``.

    The bias of the last layer is added after the max (exact: adding a constant commutes with
    a max under round-to-nearest, which is monotone).
    """

    w2t: torch.Tensor  # [1, D, D] (in, out), compute dtype
    b2: torch.Tensor  # [1, D] fp32
    w3t: torch.Tensor  # [D, D] (in, out), compute dtype
    b3: torch.Tensor  # [D] fp32
    _half: tuple | None = None

    OUT = "w3t"


@dataclass
class SplitHeads:
    """The P3-SAM heads with every first layer split (spec §7.2), ready for evaluation.

    Per-point columns ``T = 3F | S | 3S | S`` (stage-1 heads, stage-2 global, stage-2 heads,
    IoU), head-major inside each group.
    """

    feat_dim: int
    s2_dim: int
    compute_dtype: torch.dtype
    point_w: torch.Tensor  # [T, F+3] fp32: weights of [f, p] for every first layer
    point_b: torch.Tensor  # [T] fp32
    prompt_wq: torch.Tensor  # [T, 3] fp32: weights of q
    prompt_wg: torch.Tensor  # [4S, S] fp32: weights of G (stage-2 heads, IoU)
    glob_wl: torch.Tensor  # [S, 3] fp32: seg_s2_mlp_g weights of the stage-1 logits
    stage2_wl: torch.Tensor  # [3S, 3] fp32: stage-2 heads' weights of the stage-1 logits
    iou_wl: torch.Tensor  # [S, 3] fp32: iou_mlp weights of the stage-2 logits
    stage1: _LogitTail
    glob: _MaxTail
    stage2: _LogitTail
    iou: _MaxTail
    iou_out: list[tuple[torch.Tensor, torch.Tensor]]  # iou_mlp_out layers, fp32

    @property
    def groups(self) -> dict[str, tuple[int, int]]:
        """Column slices of the per-point terms: name -> (start, stop)."""
        f, s = self.feat_dim, self.s2_dim
        return {"stage1": (0, 3 * f), "glob": (3 * f, 3 * f + s),
                "stage2": (3 * f + s, 3 * f + 4 * s), "iou": (3 * f + 4 * s, 3 * f + 5 * s)}

    @classmethod
    def from_model(cls, model: nn.Module, *, compute_dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> "SplitHeads":
        fd, sd = int(model.feat_dim), int(model.s2_dim)
        dev = torch.device(device) if device is not None else model.seg_mlp_1[0].weight.device

        def lin(seq: nn.Sequential, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (seq[i].weight.detach().to(dev, torch.float32),
                    seq[i].bias.detach().to(dev, torch.float32))

        # First layers: column layout of the official concatenations (spec §4.1-4.3).
        s1 = [lin(h, 0) for h in model.seg_heads]  # [F, F+6]: f | p | q
        g_w, g_b = lin(model.seg_s2_mlp_g, 0)  # [S, F+9]: f | p | q | L1
        s2 = [lin(h, 0) for h in model.seg_s2_heads]  # [S, S+F+9]: G | f | p | q | L1
        i_w, i_b = lin(model.iou_mlp, 0)  # [S, S+F+9]: G | f | p | q | L2
        late = [w for w, _ in s2] + [i_w]  # the four layers whose input starts with G
        point_w = torch.cat([w[:, :fd + 3] for w, _ in s1] + [g_w[:, :fd + 3]]
                            + [w[:, sd:sd + fd + 3] for w in late])
        point_b = torch.cat([b for _, b in s1] + [g_b] + [b for _, b in s2] + [i_b])
        prompt_wq = torch.cat([w[:, fd + 3:fd + 6] for w, _ in s1] + [g_w[:, fd + 3:fd + 6]]
                              + [w[:, sd + fd + 3:sd + fd + 6] for w in late])
        prompt_wg = torch.cat([w[:, :sd] for w in late])
        glob_wl = g_w[:, fd + 6:fd + 9]
        stage2_wl = torch.cat([w[:, sd + fd + 6:sd + fd + 9] for w, _ in s2])
        iou_wl = i_w[:, sd + fd + 6:sd + fd + 9]

        cdt = compute_dtype

        def logit_tail(heads) -> _LogitTail:
            w2 = [lin(h, 2) for h in heads]
            w3 = [lin(h, 4) for h in heads]
            return _LogitTail(torch.stack([w.t() for w, _ in w2]).to(cdt).contiguous(),
                              torch.stack([b for _, b in w2]).contiguous(),
                              torch.stack([w[0] for w, _ in w3]).contiguous(),
                              torch.cat([b for _, b in w3]).contiguous())

        def max_tail(seq) -> _MaxTail:
            (w2, b2), (w3, b3) = lin(seq, 2), lin(seq, 4)
            return _MaxTail(w2.t()[None].to(cdt).contiguous(), b2[None].contiguous(),
                            w3.t().to(cdt).contiguous(), b3.contiguous())

        return cls(fd, sd, cdt, point_w.contiguous(), point_b.contiguous(),
                   prompt_wq.contiguous(), prompt_wg.contiguous(), glob_wl.contiguous(),
                   stage2_wl.contiguous(), iou_wl.contiguous(),
                   logit_tail(model.seg_heads), max_tail(model.seg_s2_mlp_g),
                   logit_tail(model.seg_s2_heads), max_tail(model.iou_mlp),
                   [lin(model.iou_mlp_out, i) for i in (0, 2, 4)])


@dataclass
class PointTerms:
    """Everything per point: features, coordinates and the first-layer point terms."""

    feats: torch.Tensor  # [N, F] as given (a reference, not a copy)
    points: torch.Tensor  # [N, 3] float32, the frame the heads see
    u: torch.Tensor  # [N, T]: [f, p] @ point_wᵀ + point_b (fp32, or bf16 in CUDA fast mode)

    @property
    def n(self) -> int:
        return self.points.shape[0]

    def group(self, heads: SplitHeads, name: str) -> torch.Tensor:
        a, b = heads.groups[name]
        return self.u[:, a:b]


def point_terms(heads: SplitHeads, feats: torch.Tensor, points: torch.Tensor, *,
                dtype: torch.dtype = torch.float32, tf32: bool = False) -> PointTerms:
    """One GEMM for the per-point part of all nine first layers (spec §7.2)."""
    dev = heads.point_w.device
    p = points.to(dev, torch.float32)
    n, t = p.shape[0], heads.point_w.shape[0]
    u = torch.empty(n, t, dtype=dtype, device=dev)
    # Row chunks bound the fp32 temporaries (the result may be bf16); a transient needs no
    # more than TERMS_CHUNK_BYTES to run the GEMM at full speed.
    rows = memory.items_that_fit(4 * (t + 2 * heads.point_w.shape[1]), dev, maximum=n,
                                 cap_bytes=TERMS_CHUNK_BYTES)
    with _matmul_precision("high" if tf32 else "highest"):
        for a in range(0, n, rows):
            b = min(n, a + rows)
            x = torch.cat([feats[a:b].to(dev, torch.float32), p[a:b]], dim=1)
            if dtype == torch.float32:
                torch.addmm(heads.point_b, x, heads.point_w.t(), out=u[a:b])
            else:
                u[a:b] = torch.addmm(heads.point_b, x, heads.point_w.t())
    return PointTerms(feats, p, u)


# =========================================================================== helpers

@contextlib.contextmanager
def _matmul_precision(level: str):
    """fp32 matmul precision inside the block ("highest": no TF32, the official fp32)."""
    try:
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(level)
    except Exception:  # e.g. the host mixed this with the newer fp32_precision API
        old = None
    try:
        yield
    finally:
        if old is not None:
            torch.set_float32_matmul_precision(old)


def prompt_terms(heads: SplitHeads, prompts: torch.Tensor) -> torch.Tensor:
    """[K, T] per-prompt first-layer terms from q (G terms are added after stage 1)."""
    return prompts @ heads.prompt_wq.t()


def _iou_head(heads: SplitHeads, iou_feat: torch.Tensor) -> torch.Tensor:
    x = iou_feat
    for i, (w, b) in enumerate(heads.iou_out):
        x = torch.addmm(b, x, w.t())
        if i < 2:
            x = F.gelu(x)
    return x


# =========================================================================== torch kernel

def _first_layer(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor | None,
                 wl: torch.Tensor | None) -> torch.Tensor:
    """GELU(U[n] + V[k] (+ R[k, :, n] · Wlᵀ)) -> [K, c, W] fp32 (point + prompt + rank-3 terms).

    ``r``: the previous logits [K, 3, c].
    """
    if r is None:
        x = u.float()[None] + v[:, None]
    else:
        x = torch.matmul(r.transpose(1, 2), wl.t())
        x += u[None]
        x += v[:, None]
    return F.gelu(x)


def _torch_logits(x: torch.Tensor, tail: _LogitTail) -> torch.Tensor:
    """x [K, c, H·D] (post-GELU) -> logits [K, c, H] fp32."""
    k, c, _ = x.shape
    h, d, _ = tail.w2t.shape
    x2 = x.reshape(k * c, h * d).to(tail.w2t.dtype)
    out = torch.empty(k * c, h, dtype=torch.float32, device=x.device)
    for i in range(h):
        y = torch.addmm(tail.b2[i].to(x2.dtype), x2[:, i * d:(i + 1) * d], tail.w2t[i])
        y = F.gelu(y.float())
        out[:, i] = torch.addmv(tail.b3[i:i + 1].expand(k * c), y, tail.w3[i])
    return out.view(k, c, h)


def _torch_max(x: torch.Tensor, tail: _MaxTail) -> torch.Tensor:
    """x [K, c, D] (post-GELU) -> max over c of the last layer (without its bias) [K, D]."""
    k, c, d = x.shape
    x2 = x.reshape(k * c, d).to(tail.w2t.dtype)
    y = F.gelu(torch.addmm(tail.b2[0].to(x2.dtype), x2, tail.w2t[0]).float())
    z = torch.mm(y.to(tail.w3t.dtype), tail.w3t)
    return z.view(k, c, d).amax(dim=1).float()


class _TorchPairs:
    """Plain-PyTorch evaluation of the per-pair layers, in point chunks."""

    name = "torch"

    def __init__(self, chunk: int):
        self.chunk = max(1, int(chunk))

    def _chunks(self, n: int):
        for a in range(0, n, self.chunk):
            yield a, min(n, a + self.chunk)

    def logits(self, u, v, r, wl, tail: _LogitTail, out: torch.Tensor) -> None:
        for a, b in self._chunks(u.shape[0]):
            x = _first_layer(u[a:b], v, None if r is None else r[:, :, a:b], wl)
            out[:, :, a:b] = _torch_logits(x, tail).transpose(1, 2)

    def max(self, u, v, r, wl, tail: _MaxTail, out: torch.Tensor) -> None:
        for a, b in self._chunks(u.shape[0]):
            x = _first_layer(u[a:b], v, None if r is None else r[:, :, a:b], wl)
            torch.maximum(out, _torch_max(x, tail), out=out)


# =========================================================================== triton kernel

if triton is not None:

    @triton.jit
    def _tanh_approx(x):
        # One MUFU op (sm_75+), max relative error about 2^-11.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _gelu2_tl(x, APPROX: tl.constexpr):
        """2·GELU(x) = x + x·erf(x/√2).  The factor 1/2 is folded into the weights that read
        it (exact: halving a bf16/fp32 weight only lowers its exponent), one FMUL less."""
        if APPROX:
            # tanh form of GELU (|error| <= 5e-4 absolute, below a bf16 ulp of the values
            # where it peaks): fast-mode option, never used by the exact numerics.
            t = _tanh_approx(x * tl.fma(x * x, 0.035677408136300125, 0.7978845608028654))
        else:
            t = tl.erf(x * 0.7071067811865476)  # exact (erf) GELU, as nn.GELU()
        return tl.fma(x, t, x)

    @triton.jit
    def _first_layer_tl(u_ptr, stride_un, v_ptr, wl_ptr, stride_wl, rows, rmask, col0, offs_k,
                        r0, r1, r2, HAS_R: tl.constexpr, APPROX: tl.constexpr,
                        CDT: tl.constexpr):
        """2·GELU(U[rows, c] + V[c] (+ Σ_j R_j · Wl[j, c])), c = col0 + offs_k, as a dot operand."""
        cols = col0 + offs_k
        u = tl.load(u_ptr + rows[:, None] * stride_un + cols[None, :], mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        x = u + tl.load(v_ptr + cols)[None, :]
        if HAS_R:
            x += r0[:, None] * tl.load(wl_ptr + cols)[None, :]
            x += r1[:, None] * tl.load(wl_ptr + stride_wl + cols)[None, :]
            x += r2[:, None] * tl.load(wl_ptr + 2 * stride_wl + cols)[None, :]
        return _gelu2_tl(x, APPROX).to(CDT)

    @triton.jit
    def _pair_mlp_kernel(
            u_ptr, stride_un,  # [N, H*D] per-point first-layer terms (row stride)
            v_ptr, stride_vk,  # [K, H*D] per-prompt first-layer terms, fp32
            r_ptr, stride_rk, stride_rh,  # [K, 3, N] previous logits, fp32 (HAS_R)
            wl_ptr, stride_wl,  # [3, H*D] fp32 rank-3 weights (HAS_R)
            w2_ptr,  # [H, D, D] hidden layer / 2, (in, out), compute dtype
            b2_ptr,  # [H, D] fp32
            w3_ptr,  # logits: [H, D] / 2, fp32; max: [D, D] / 2 (in, out) compute dtype
            b3_ptr,  # logits: [H] fp32; max: unused
            out_ptr, stride_ok, stride_oh,  # logits: [K, H, N]; max: [K, D] running max
            N, K,
            H: tl.constexpr, D: tl.constexpr, HAS_R: tl.constexpr, MAX_MODE: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BN3: tl.constexpr,
            IEEE: tl.constexpr, APPROX: tl.constexpr):
        # Prompt index varies fastest: programs running together share the point tile
        # (its per-point terms stay in L2) and all read the same hidden-layer weights.
        pid = tl.program_id(0)
        k = (pid % K).to(tl.int64)
        tile = pid // K
        rows32 = tile * BM + tl.arange(0, BM)
        rmask = rows32 < N
        rows = rows32.to(tl.int64)
        CDT = w2_ptr.dtype.element_ty
        v_row = v_ptr + k * stride_vk
        if HAS_R:
            rb = r_ptr + k * stride_rk + rows
            r0 = tl.load(rb, mask=rmask, other=0.0)
            r1 = tl.load(rb + stride_rh, mask=rmask, other=0.0)
            r2 = tl.load(rb + 2 * stride_rh, mask=rmask, other=0.0)
        else:
            r0 = tl.zeros([BM], tl.float32)
            r1 = r0
            r2 = r0
        offs_kk = tl.arange(0, BK)
        if MAX_MODE:
            # Hidden layer over the full width (its output is the next GEMM's input).
            offs_d = tl.arange(0, D)
            acc = tl.zeros([BM, D], tl.float32)
            for kt in range(0, D, BK):
                offs_k = kt + offs_kk
                a = _first_layer_tl(u_ptr, stride_un, v_row, wl_ptr, stride_wl, rows, rmask, 0,
                                    offs_k, r0, r1, r2, HAS_R, APPROX, CDT)
                w = tl.load(w2_ptr + offs_k[:, None] * D + offs_d[None, :])
                if IEEE:
                    acc = tl.dot(a, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
            h2 = _gelu2_tl(acc + tl.load(b2_ptr + offs_d)[None, :], APPROX).to(CDT)
            for nt in tl.static_range(D // BN3):
                offs_o = nt * BN3 + tl.arange(0, BN3)
                w3 = tl.load(w3_ptr + offs_d[:, None] * D + offs_o[None, :])
                if IEEE:
                    z = tl.dot(h2, w3, input_precision="ieee")
                else:
                    z = tl.dot(h2, w3)
                z = tl.where(rmask[:, None], z, float("-inf"))
                # Max is exact and order-free: atomics keep the result deterministic.
                tl.atomic_max(out_ptr + k * stride_ok + offs_o, tl.max(z, axis=0))
        else:
            for h in tl.static_range(H):
                logit = tl.zeros([BM], tl.float32)
                for nt in tl.static_range(D // BN):
                    offs_n = nt * BN + tl.arange(0, BN)
                    acc = tl.zeros([BM, BN], tl.float32)
                    for kt in range(0, D, BK):
                        offs_k = kt + offs_kk
                        a = _first_layer_tl(u_ptr, stride_un, v_row, wl_ptr, stride_wl, rows,
                                            rmask, h * D, offs_k, r0, r1, r2, HAS_R, APPROX,
                                            CDT)
                        w = tl.load(w2_ptr + h * D * D + offs_k[:, None] * D + offs_n[None, :])
                        if IEEE:
                            acc = tl.dot(a, w, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(a, w, acc)
                    y = _gelu2_tl(acc + tl.load(b2_ptr + h * D + offs_n)[None, :], APPROX)
                    logit += tl.sum(y * tl.load(w3_ptr + h * D + offs_n)[None, :], axis=1)
                logit += tl.load(b3_ptr + h)
                tl.store(out_ptr + k * stride_ok + h * stride_oh + rows, logit, mask=rmask)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the fused kernel (``BN`` is ignored in max mode: the width is D)."""

    bm: int
    bn: int
    bk: int
    bn3: int
    warps: int
    stages: int

    def fit(self, d: int) -> "KernelConfig":
        return KernelConfig(self.bm, min(self.bn, d), min(self.bk, d), min(self.bn3, d),
                            self.warps, self.stages)


#: Candidates timed once per shape when tuning (``TURBOPART_P3SAM_TUNE=1``) and tried in
#: order when the chosen tiles fail to compile; without tuning :data:`FIXED_CONFIGS` is used,
#: else the first.  All compile for sm_90 with Triton 3.6 without register spills (tanh
#: GELU), 1 CTA per SM.
LOGIT_CONFIGS = (KernelConfig(128, 256, 64, 64, 8, 3), KernelConfig(64, 512, 32, 64, 8, 3),
                 KernelConfig(128, 128, 64, 64, 8, 4), KernelConfig(64, 256, 32, 64, 8, 3))
MAX_CONFIGS = (KernelConfig(128, 0, 64, 128, 8, 3), KernelConfig(128, 0, 32, 64, 8, 3),
               KernelConfig(64, 0, 64, 128, 8, 3))
#: Small tiles for the Triton interpreter (tests on the CPU).
INTERPRET_CONFIG = KernelConfig(16, 16, 16, 16, 1, 1)
#: The tiles used without run-time tuning (the default), by GPU architecture (compute
#: capability) and kernel shape (max mode, heads, width, has R), for 16-bit weights: the
#: winners of the tuning on an H100 (sm_90, Triton 3.6; benchmarks/results/p3sam_h100.json):
#: stage 1 (3 x 512), stage 2 (3 x 256 with the stage-1 logits), the global/IoU max heads
#: (1 x 256).  Other architectures and shapes take the first candidate.
FIXED_CONFIGS: dict[tuple[int, int], dict[tuple[bool, int, int, bool], KernelConfig]] = {
    (9, 0): {(False, 3, 512, False): KernelConfig(64, 512, 32, 64, 8, 3),
             (False, 3, 256, True): KernelConfig(128, 256, 64, 64, 8, 3),
             (True, 1, 256, True): KernelConfig(128, 0, 64, 128, 8, 3)},
}


def tune_default() -> bool:
    """Run-time tile tuning only with ``TURBOPART_P3SAM_TUNE=1`` (it compiles and times
    every candidate in the first call of a process: ~35 s on an H100)."""
    return os.environ.get("TURBOPART_P3SAM_TUNE", "0").strip() == "1"


def fixed_config(max_mode: bool, heads: int, width: int, has_r: bool, device,
                 dtype: torch.dtype) -> KernelConfig | None:
    """The :data:`FIXED_CONFIGS` entry for this kernel on ``device`` (None: none)."""
    dev = torch.device(device)
    if dev.type != "cuda" or torch.empty((), dtype=dtype).element_size() != 2:
        return None
    try:
        cap = tuple(torch.cuda.get_device_capability(dev))
    except Exception:  # pragma: no cover - no driver
        return None
    cfg = FIXED_CONFIGS.get(cap, {}).get((bool(max_mode), int(heads), int(width), bool(has_r)))
    return None if cfg is None else cfg.fit(width)


def triton_available(device: torch.device | str) -> bool:
    """Whether the fused kernel can run for tensors on ``device``."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.device(device).type == "cuda"


def _tiles_fit(c, d: int, max_mode: bool) -> bool:
    """Whether tiles ``c`` (a :class:`KernelConfig` or :class:`HalfConfig`) divide width d."""
    return d % c.bk == 0 and (d % c.bn3 == 0 if max_mode else d % c.bn == 0)


def _time_tiles(cands, launch: Callable, device) -> dict:
    """``{config: seconds}`` of ``launch(config)`` (3 timed runs after one warm-up) for every
    candidate that compiles; resource/compile failures drop out, an OOM propagates."""
    times = {}
    for c in cands:
        try:
            launch(c)
            torch.cuda.synchronize(device)
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(3):
                launch(c)
            t1.record()
            t1.synchronize()
            times[c] = t0.elapsed_time(t1) / 3e3
        except Exception as exc:  # compile/resource failure: skip this candidate
            if memory.is_oom(exc):
                raise
            continue
    return times


def _first_launching(cands, launch: Callable, what: str):
    """The first of ``cands`` whose ``launch(config)`` succeeds (it has then run); a warning
    names the ones that failed before it; RuntimeError when none launches."""
    errors = []
    for c in cands:
        try:
            launch(c)
        except Exception as exc:
            if memory.is_oom(exc) or isinstance(exc, ValueError):
                raise
            errors.append(f"{c}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if errors:
            warnings.warn(f"{what}: tiles failed to compile/launch (" + "; ".join(errors)
                          + f"); using {c}", RuntimeWarning)
        return c
    raise RuntimeError(f"no tiles of the {what} launched: " + "; ".join(errors))


class _TritonPairs:
    """Fused Triton evaluation of the per-pair layers (all points of a prompt batch at once)."""

    name = "triton"
    #: (max mode, H, D, has_r, weight dtype, term dtype, device, approx GELU) -> config.
    _tuned: dict[tuple, KernelConfig] = {}
    #: Timings of the candidates, for benchmark reports: key -> {config: seconds}.
    tune_report: dict[tuple, dict[str, float]] = {}

    #: Keys whose configuration has launched once (compiled) in this process.
    _launched: set = set()

    def __init__(self, tune: bool | None = None, approx_gelu: bool = True):
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if tune is None:  # default: fixed tiles; TURBOPART_P3SAM_TUNE=1 tunes
            tune = tune_default()
        self.tune = bool(tune) and not self.interpret
        # Inline PTX does not run in the interpreter.
        self.approx_gelu = bool(approx_gelu) and not self.interpret

    def _launch(self, cfg: KernelConfig, max_mode: bool, u, v, r, wl, w2t, b2, w3, b3, out):
        n, k = u.shape[0], v.shape[0]
        h, d, _ = w2t.shape
        if u.stride(1) != 1 or v.stride(1) != 1:
            raise ValueError("per-point/per-prompt terms must be contiguous along columns")
        has_r = r is not None
        if (has_r and r.stride(2) != 1) or (out.dim() == 3 and out.stride(2) != 1):
            raise ValueError("logits must be contiguous along the point axis")
        wlt = wl.t().contiguous() if has_r else v  # [3, H*D]
        grid = (triton.cdiv(n, cfg.bm) * k,)
        _pair_mlp_kernel[grid](
            u, u.stride(0), v, v.stride(0),
            r if has_r else v, r.stride(0) if has_r else 0, r.stride(1) if has_r else 0,
            wlt, wlt.stride(0), w2t, b2, w3, b3 if b3 is not None else v,
            out, out.stride(0), out.stride(1) if out.dim() == 3 else 0,
            n, k, H=h, D=d, HAS_R=has_r, MAX_MODE=max_mode, BM=cfg.bm,
            BN=d if max_mode else cfg.bn, BK=cfg.bk, BN3=cfg.bn3,
            IEEE=w2t.dtype == torch.float32, APPROX=self.approx_gelu,
            num_warps=cfg.warps, num_stages=cfg.stages)

    def _config(self, max_mode: bool, u, v, r, wl, w2t, b2, w3, b3, out) -> KernelConfig:
        d = w2t.shape[1]
        if self.interpret:
            return INTERPRET_CONFIG.fit(d)
        cands = [c.fit(d) for c in (MAX_CONFIGS if max_mode else LOGIT_CONFIGS)]
        cands = list(dict.fromkeys(c for c in cands if _tiles_fit(c, d, max_mode)))
        key = (max_mode, w2t.shape[0], d, r is not None, str(w2t.dtype), str(u.dtype),
               str(u.device), self.approx_gelu)
        if key in self._tuned:
            return self._tuned[key]
        if not self.tune or len(cands) == 1:
            fixed = fixed_config(max_mode, w2t.shape[0], d, r is not None, u.device,
                                 w2t.dtype)
            self._tuned[key] = fixed if fixed is not None else cands[0]
            return self._tuned[key]
        # Time every candidate on this very problem (outputs go to scratch buffers) and keep
        # the fastest; configurations that do not compile (shared memory, registers) drop out.
        ks = min(v.shape[0], 64)
        scratch = torch.full_like(out[:ks], float("-inf")) if max_mode else torch.empty_like(out[:ks])
        rr = None if r is None else r[:ks]
        times = _time_tiles(cands, lambda c: self._launch(c, max_mode, u, v[:ks], rr, wl, w2t,
                                                          b2, w3, b3, scratch), u.device)
        if not times:
            raise RuntimeError("no Triton configuration of the P3-SAM pair kernel compiled")
        best = min(times, key=times.get)
        self._tuned[key] = best
        self.tune_report[key] = {str(c): t for c, t in times.items()}
        return best

    def _run(self, max_mode, u, v, r, wl, w2t, b2, w3, b3, out):
        cfg = self._config(max_mode, u, v, r, wl, w2t, b2, w3, b3, out)
        key = (max_mode, w2t.shape[0], w2t.shape[1], r is not None, str(w2t.dtype),
               str(u.dtype), str(u.device), self.approx_gelu)
        if key in self._launched or self.interpret:
            self._launch(cfg, max_mode, u, v, r, wl, w2t, b2, w3, b3, out)
            return
        # First launch of this kernel shape: if the chosen tiles do not compile here
        # (shared memory, registers, another Triton), fall back to the other candidates.
        d = w2t.shape[1]
        cands = [cfg] + [c.fit(d) for c in (MAX_CONFIGS if max_mode else LOGIT_CONFIGS)]
        cands = [c for c in dict.fromkeys(cands) if _tiles_fit(c, d, max_mode)]
        self._tuned[key] = _first_launching(
            cands, lambda c: self._launch(c, max_mode, u, v, r, wl, w2t, b2, w3, b3, out),
            "P3-SAM pair kernel")
        self._launched.add(key)

    def logits(self, u, v, r, wl, tail: _LogitTail, out: torch.Tensor) -> None:
        w2h, w3h = tail.halved()  # the kernel's GELUs return 2·GELU
        self._run(False, u, v.contiguous(), r, wl, w2h, tail.b2, w3h, tail.b3, out)

    def max(self, u, v, r, wl, tail: _MaxTail, out: torch.Tensor) -> None:
        w2h, w3h = tail.halved()
        self._run(True, u, v.contiguous(), r, wl, w2h, tail.b2, w3h, None, out)


# =========================================================================== half-precision kernel
#
# Fast-mode variant of the fused kernel (switch: ``TURBOPART_P3SAM_HEADS`` or the predictor's
# ``heads`` argument).  Same function, same tiling idea, but every element-wise step per pair
# (first-layer sum, both GELUs, bias) runs in 16-bit arithmetic, which the compiler packs two
# values per instruction (HADD2/HMUL2/HFMA2 on sm_90); only the tanh stays one MUFU op per
# value.  The per-pair CUDA-core work roughly halves, and the tiles use BK = 32 (with BK = 64
# ptxas serialises the register-operand wgmma chain: "wgmma.mma_async instructions are
# serialized").  Optionally the 1-wide logit layer runs on the tensor cores (a [BN, 16] tile
# with w3_h in column h).
#
# * ``"f16"``: fp16 values (10-bit mantissa: each rounding is 8x finer than bf16), weights
#   converted from the bf16 ones exactly; per-point terms stored in fp16.  fp16 overflows at
#   65504: every launch checks a bound of |first-layer sum| and |hidden layer| on the host
#   (max |u|, |v|, |logits|, column sums of |W2|) and uses the bf16 kernel when it exceeds
#   16000 (never for sane weights).  Sub-normal tiny weights lose relative precision only.
# * ``"bf16x2"``: the same in bf16 (no range issue, 8x coarser roundings than fp16).
# * ``"bf16"``: the original kernel (fp32 element-wise math).

HEADS_VARIANTS = ("bf16", "f16", "bf16x2")
#: Variant used when neither the argument nor ``TURBOPART_P3SAM_HEADS`` names one.
DEFAULT_HEADS_VARIANT = "f16"  # H100: 310 ms vs 345 (bf16), mask agreement 0.9983 vs 0.9976
#: Largest bound of |first-layer sum| / |hidden pre-activation| accepted for fp16 math
#: (2·GELU(x) <= 2|x| must stay below 65504 with a margin).
HALF_RANGE = 16000.0


def heads_variant_default() -> str:
    """``TURBOPART_P3SAM_HEADS`` (``bf16``, ``f16``, ``bf16x2``), else the default."""
    v = os.environ.get("TURBOPART_P3SAM_HEADS", "").strip().lower() or DEFAULT_HEADS_VARIANT
    if v not in HEADS_VARIANTS:
        warnings.warn(f"TURBOPART_P3SAM_HEADS={v!r} is not one of {HEADS_VARIANTS}; using "
                      f"{DEFAULT_HEADS_VARIANT!r}", RuntimeWarning, stacklevel=2)
        v = DEFAULT_HEADS_VARIANT
    return v


if triton is not None:

    @triton.jit
    def _tanh_half(z, F16: tl.constexpr, ASM: tl.constexpr):
        """tanh on the MUFU unit in 16-bit (f16: sm_75+, bf16: sm_90); the interpreter (no
        inline PTX) evaluates it in fp32."""
        if ASM:
            if F16:
                t = tl.inline_asm_elementwise("tanh.approx.f16 $0, $1;", "=h,h", [z],
                                              dtype=tl.float16, is_pure=True, pack=1)
            else:
                t = tl.inline_asm_elementwise("tanh.approx.bf16 $0, $1;", "=h,h", [z],
                                              dtype=tl.bfloat16, is_pure=True, pack=1)
        else:
            e = tl.exp(-2.0 * tl.abs(z))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(z < 0, -t, t)
        return t

    @triton.jit
    def _gelu2_half(x, F16: tl.constexpr, ASM: tl.constexpr):
        """2·GELU(x), tanh form, in the 16-bit type of ``x`` (packed two per instruction).
        x² may overflow fp16 for |x| > 255: tanh(±inf) = ±1 gives the exact limits 2x / 0."""
        if ASM:
            t = _tanh_half(x * (x * x * 0.035677408136300125 + 0.7978845608028654), F16, ASM)
            y = x * t + x
        else:  # interpreter: fp32 (it has no 16-bit scalar constants)
            xf = x.to(tl.float32)
            t = _tanh_half(xf * (xf * xf * 0.035677408136300125 + 0.7978845608028654), F16, ASM)
            y = (xf * t + xf).to(x.dtype)
        return y

    @triton.jit
    def _half_a_tile(u_ptr, stride_un, v_row, wl_ptr, stride_wl, rows, rmask, cols, r0, r1,
                     r2, HAS_R: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """2·GELU(U[rows, cols] + V[cols] (+ Σ_j R_j · Wl[j, cols])), 16-bit, a dot operand."""
        x = tl.load(u_ptr + rows[:, None] * stride_un + cols[None, :], mask=rmask[:, None],
                    other=0.0)
        x = x + tl.load(v_row + cols)[None, :]
        if HAS_R:
            x = x + (r0 * tl.load(wl_ptr + cols)[None, :]
                     + r1 * tl.load(wl_ptr + stride_wl + cols)[None, :]
                     + r2 * tl.load(wl_ptr + 2 * stride_wl + cols)[None, :])
        return _gelu2_half(x, F16, ASM)

    @triton.jit
    def _pair_mlp_half_kernel(
            u_ptr, stride_un,  # [N, H*D] per-point first-layer terms, 16-bit type
            v_ptr, stride_vk,  # [K, H*D] per-prompt first-layer terms, 16-bit type
            r_ptr, stride_rk, stride_rh,  # [K, 3, N] previous logits, fp32 (HAS_R)
            wl_ptr, stride_wl,  # [3, H*D] rank-3 weights, 16-bit type (HAS_R)
            w2_ptr,  # [H, D, D] hidden layer / 2, (in, out), 16-bit type
            b2_ptr,  # [H, D] 16-bit type
            w3_ptr,  # logits, TC_OUT: [H*D, 16] 16-bit, column h = w3_h / 2, zero elsewhere;
                     # logits: [H, D] fp32 w3 / 2; max mode: [D, D] / 2 (in, out) 16-bit
            b3_ptr,  # logits: [H] fp32; max mode: unused
            out_ptr, stride_ok, stride_oh,  # logits: [K, H, N] fp32; max: [K, D] running max
            N, K,
            H: tl.constexpr, D: tl.constexpr, HAS_R: tl.constexpr, MAX_MODE: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BN3: tl.constexpr,
            F16: tl.constexpr, TC_OUT: tl.constexpr, ASM: tl.constexpr):
        # Prompt index fastest, as in _pair_mlp_kernel (shared point tile and weights in L2).
        pid = tl.program_id(0)
        k = (pid % K).to(tl.int64)
        tile = pid // K
        rows32 = tile * BM + tl.arange(0, BM)
        rmask = rows32 < N
        rows = rows32.to(tl.int64)
        CDT = w2_ptr.dtype.element_ty
        v_row = v_ptr + k * stride_vk
        if HAS_R:
            rb = r_ptr + k * stride_rk + rows
            r0 = tl.load(rb, mask=rmask, other=0.0).to(CDT)[:, None]
            r1 = tl.load(rb + stride_rh, mask=rmask, other=0.0).to(CDT)[:, None]
            r2 = tl.load(rb + 2 * stride_rh, mask=rmask, other=0.0).to(CDT)[:, None]
        else:
            r0 = tl.zeros([BM, 1], CDT)
            r1 = r0
            r2 = r0
        offs_kk = tl.arange(0, BK)
        if MAX_MODE:
            offs_d = tl.arange(0, D)
            acc = tl.zeros([BM, D], tl.float32)
            for kt in range(0, D, BK):
                cols = kt + offs_kk
                a = _half_a_tile(u_ptr, stride_un, v_row, wl_ptr, stride_wl, rows, rmask, cols,
                                 r0, r1, r2, HAS_R, F16, ASM)
                w = tl.load(w2_ptr + cols[:, None] * D + offs_d[None, :])
                acc = tl.dot(a, w, acc)
            h2 = _gelu2_half(acc.to(CDT) + tl.load(b2_ptr + offs_d)[None, :], F16, ASM)
            for nt in tl.static_range(D // BN3):
                offs_o = nt * BN3 + tl.arange(0, BN3)
                w3 = tl.load(w3_ptr + offs_d[:, None] * D + offs_o[None, :])
                z = tl.dot(h2, w3)
                z = tl.where(rmask[:, None], z, float("-inf"))
                # Max is exact and order-free: atomics keep the result deterministic.
                tl.atomic_max(out_ptr + k * stride_ok + offs_o, tl.max(z, axis=0))
        else:
            offs_h = tl.arange(0, 16)
            lacc = tl.zeros([BM, 16], tl.float32)
            for h in tl.static_range(H):
                logit = tl.zeros([BM], tl.float32)
                for nt in tl.static_range(D // BN):
                    offs_n = nt * BN + tl.arange(0, BN)
                    acc = tl.zeros([BM, BN], tl.float32)
                    for kt in range(0, D, BK):
                        a = _half_a_tile(u_ptr, stride_un, v_row, wl_ptr, stride_wl, rows,
                                         rmask, h * D + kt + offs_kk, r0, r1, r2, HAS_R, F16,
                                         ASM)
                        w = tl.load(w2_ptr + h * D * D + (kt + offs_kk)[:, None] * D
                                    + offs_n[None, :])
                        acc = tl.dot(a, w, acc)
                    y = _gelu2_half(acc.to(CDT) + tl.load(b2_ptr + h * D + offs_n)[None, :],
                                    F16, ASM)
                    if TC_OUT:
                        # 1-wide output layer on the tensor cores: column h of [BN, 16]
                        w3 = tl.load(w3_ptr + (h * D + offs_n)[:, None] * 16 + offs_h[None, :])
                        lacc = tl.dot(y, w3, lacc)
                    else:
                        w3v = tl.load(w3_ptr + h * D + offs_n)
                        logit += tl.sum(y.to(tl.float32) * w3v[None, :], axis=1)
                if not TC_OUT:
                    logit += tl.load(b3_ptr + h)
                    tl.store(out_ptr + k * stride_ok + h * stride_oh + rows, logit, mask=rmask)
            if TC_OUT:
                hm = offs_h < H
                res = lacc + tl.load(b3_ptr + offs_h, mask=hm, other=0.0)[None, :]
                tl.store(out_ptr + k * stride_ok + offs_h[None, :] * stride_oh + rows[:, None],
                         res, mask=rmask[:, None] & hm[None, :])


@dataclass(frozen=True)
class HalfConfig:
    """Tiles of the half-precision kernel; ``tc``: the logit layer on the tensor cores."""

    bm: int
    bn: int
    bk: int
    bn3: int
    warps: int
    stages: int
    tc: bool = False

    def fit(self, d: int) -> "HalfConfig":
        return HalfConfig(self.bm, min(self.bn, d), min(self.bk, d), min(self.bn3, d),
                          self.warps, self.stages, self.tc)


#: Candidates of the half-precision kernel, the first is the default (checked by compiling
#: for sm_90a with Triton 3.6 / ptxas: no wgmma serialisation, no spills unless noted).
#: Logit kernels: (128, 256): half the weight traffic from L2 of (64, 512) at two
#: first-layer evaluations; (64, 512): one evaluation; (256, 128) / (128, 128): tensor-core
#: logit layer, 4 evaluations (stage 1) but a quarter / half the weight traffic.  Max
#: kernels: (128, D) 1 CTA/SM, (64, D) with 4 warps: 2 CTAs/SM.
HALF_LOGIT_CONFIGS = (HalfConfig(128, 256, 32, 64, 8, 3), HalfConfig(64, 512, 32, 64, 8, 3),
                      HalfConfig(256, 128, 32, 64, 8, 3, True),
                      HalfConfig(128, 128, 32, 64, 8, 3, True))
HALF_MAX_CONFIGS = (HalfConfig(128, 0, 32, 64, 8, 3), HalfConfig(64, 0, 32, 64, 4, 3),
                    HalfConfig(128, 0, 32, 128, 8, 3))  # the last spills 36 B
#: Tiles used without tuning, by kernel shape (max mode, heads, width, has R), tried before
#: the tables above (set them from ``benchmarks/heads_variants.py``'s tuned winners).
HALF_FIXED_CONFIGS: dict[tuple[bool, int, int, bool], HalfConfig] = {
    (False, 3, 512, False): HalfConfig(128, 256, 32, 64, 8, 3),
    (False, 3, 256, True): HalfConfig(128, 256, 32, 64, 8, 3),
    (True, 1, 256, True): HalfConfig(128, 0, 32, 128, 8, 3),
}
HALF_INTERPRET_CONFIGS = (HalfConfig(16, 16, 16, 16, 1, 1, True),
                          HalfConfig(32, 16, 16, 16, 1, 1, False))


def _half_terms_ok(u: torch.Tensor) -> bool:
    """fp16 per-point terms are finite and within :data:`HALF_RANGE`."""
    if u.numel() == 0:
        return True
    lo, hi = torch.aminmax(u)
    m = torch.maximum(-lo.float(), hi.float())
    return bool(torch.isfinite(m) and m <= HALF_RANGE)


class _HalfPairs(_TritonPairs):
    """The half-precision fused kernel, falling back to :class:`_TritonPairs` (loudly, once
    per process) when it does not compile/launch, and per call when fp16 could overflow."""

    #: key -> HalfConfig chosen; key -> {config: seconds} of the tuning.
    _half_tuned: dict[tuple, HalfConfig] = {}
    half_tune_report: dict[tuple, dict[str, float]] = {}
    #: Set when the kernel failed once in this process: every later call uses the parent.
    _broken: str | None = None
    #: Process-wide counts of kernel calls and of calls served by the bf16 kernel instead.
    calls = 0
    fallback_calls = 0
    #: Candidate tables (the interpreter test swaps them).
    logit_configs = HALF_LOGIT_CONFIGS
    max_configs = HALF_MAX_CONFIGS

    def __init__(self, tune: bool | None = None, dtype: torch.dtype = torch.float16):
        super().__init__(tune, approx_gelu=True)
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"half kernel dtype must be float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.fallbacks = 0  # calls that used the bf16 kernel (range or failure)

    # ---------------------------------------------------------------- weights
    def _weights(self, tail, max_mode: bool) -> dict:
        """16-bit copies of a tail (halved W2/W3, bias), cached on the tail object."""
        cache = tail.__dict__.setdefault("_half_cache", {})
        if self.dtype in cache:
            return cache[self.dtype]
        dt = self.dtype
        w2 = (tail.w2t.float() * 0.5).to(dt).contiguous()
        out = {"w2": w2, "b2": tail.b2.to(dt).contiguous(),
               "w2_colsum": float(w2.float().abs().sum(dim=1).amax()),
               "b2_max": float(tail.b2.abs().amax())}
        if max_mode:
            out["w3"] = (tail.w3t.float() * 0.5).to(dt).contiguous()
        else:
            h, d = tail.w3.shape
            pad = torch.zeros(h, d, 16, dtype=torch.float32, device=tail.w3.device)
            for i in range(h):
                pad[i, :, i] = tail.w3[i] * 0.5
            out["w3_tc"] = pad.reshape(h * d, 16).to(dt).contiguous()
            out["w3_cc"] = (tail.w3 * 0.5).float().contiguous()
        finite = all(torch.isfinite(t).all() for t in out.values() if torch.is_tensor(t))
        out["ok"] = bool(finite)
        cache[dt] = out
        return out

    # ---------------------------------------------------------------- range
    @staticmethod
    def _absmax(t: torch.Tensor) -> float:
        if t.numel() == 0:
            return 0.0
        lo, hi = torch.aminmax(t)
        return float(torch.maximum(-lo.float(), hi.float()))

    def _in_range(self, u, v, r, wl, wts) -> bool:
        """Whether every fp16 intermediate is bounded by HALF_RANGE (bf16: always)."""
        if self.dtype != torch.float16:
            return True
        if not wts["ok"]:
            return False
        b1 = self._absmax(u) + self._absmax(v)
        if r is not None:
            rmax = self._absmax(r)
            if not rmax <= 60000.0:
                return False
            b1 += rmax * float(wl.abs().amax(dim=0).sum())
        b2 = wts["b2_max"] + 2.0 * b1 * wts["w2_colsum"]
        return bool(b1 <= HALF_RANGE and b2 <= HALF_RANGE)

    # ---------------------------------------------------------------- launch
    def _launch_half(self, cfg: HalfConfig, max_mode: bool, u, v16, r, wl16, wts, b3, out):
        n, k = u.shape[0], v16.shape[0]
        w2 = wts["w2"]
        h, d, _ = w2.shape
        if u.stride(1) != 1 or v16.stride(1) != 1:
            raise ValueError("per-point/per-prompt terms must be contiguous along columns")
        has_r = r is not None
        if (has_r and r.stride(2) != 1) or (out.dim() == 3 and out.stride(2) != 1):
            raise ValueError("logits must be contiguous along the point axis")
        if not max_mode and cfg.tc and h > 16:
            raise ValueError("the tensor-core logit layer handles at most 16 heads")
        if max_mode:
            w3 = wts["w3"]
        else:
            w3 = wts["w3_tc"] if cfg.tc else wts["w3_cc"]
        grid = (triton.cdiv(n, cfg.bm) * k,)
        _pair_mlp_half_kernel[grid](
            u, u.stride(0), v16, v16.stride(0),
            r if has_r else out, r.stride(0) if has_r else 0, r.stride(1) if has_r else 0,
            wl16 if has_r else v16, wl16.stride(0) if has_r else 0, w2, wts["b2"], w3,
            b3 if b3 is not None else out,
            out, out.stride(0), out.stride(1) if out.dim() == 3 else 0,
            n, k, H=h, D=d, HAS_R=has_r, MAX_MODE=max_mode, BM=cfg.bm,
            BN=d if max_mode else cfg.bn, BK=cfg.bk, BN3=cfg.bn3,
            F16=self.dtype == torch.float16, TC_OUT=bool(cfg.tc) and not max_mode,
            ASM=not self.interpret, num_warps=cfg.warps, num_stages=cfg.stages)

    def _candidates(self, max_mode: bool, d: int, key=None) -> list[HalfConfig]:
        table = HALF_INTERPRET_CONFIGS if self.interpret else \
            (self.max_configs if max_mode else self.logit_configs)
        fixed = None if self.interpret or key is None else HALF_FIXED_CONFIGS.get(key)
        cands = [c.fit(d) for c in ([fixed] if fixed is not None else []) + list(table)]
        return list(dict.fromkeys(c for c in cands if _tiles_fit(c, d, max_mode)))

    def _run_half(self, max_mode, u, v16, r, wl16, wts, b3, out):
        d = wts["w2"].shape[1]
        key = (max_mode, wts["w2"].shape[0], d, r is not None, str(self.dtype), str(u.device))
        cands = self._candidates(max_mode, d, key[:4])
        if not cands:
            raise RuntimeError(f"no half-kernel tiles fit width {d}")
        cfg = self._half_tuned.get(key)
        if cfg is None and self.tune and len(cands) > 1:
            cfg = self._tune_half(key, cands, max_mode, u, v16, r, wl16, wts, b3, out)
        if cfg is not None:
            self._launch_half(cfg, max_mode, u, v16, r, wl16, wts, b3, out)
            return
        # First launch without tuning: the first candidate that compiles.
        self._half_tuned[key] = _first_launching(
            cands, lambda c: self._launch_half(c, max_mode, u, v16, r, wl16, wts, b3, out),
            "P3-SAM half kernel")

    def _tune_half(self, key, cands, max_mode, u, v16, r, wl16, wts, b3, out):
        ks = min(v16.shape[0], 64)
        scratch = torch.full_like(out[:ks], float("-inf")) if max_mode else \
            torch.empty_like(out[:ks])
        rr = None if r is None else r[:ks]
        times = _time_tiles(cands, lambda c: self._launch_half(c, max_mode, u, v16[:ks], rr,
                                                               wl16, wts, b3, scratch),
                            u.device)
        if not times:
            return None
        best = min(times, key=times.get)
        self._half_tuned[key] = best
        self.half_tune_report[key] = {str(c): t for c, t in times.items()}
        return best

    # ---------------------------------------------------------------- entry points
    def _half(self, max_mode: bool, u, v, r, wl, tail, out) -> bool:
        """Run the half kernel; False when the caller must use the bf16 kernel instead."""
        if _HalfPairs._broken is not None or u.dtype != self.dtype:
            return False
        wts = self._weights(tail, max_mode)
        if not self._in_range(u, v, r, wl, wts):
            if not getattr(_HalfPairs, "_range_warned", False):
                _HalfPairs._range_warned = True
                warnings.warn("P3-SAM half kernel: values could overflow fp16; using the bf16 "
                              "kernel for them", RuntimeWarning, stacklevel=3)
            return False
        v16 = v.to(self.dtype).contiguous()
        wl16 = None if r is None else wl.t().to(self.dtype).contiguous()  # [3, W]
        saved = out.clone() if max_mode else None
        try:
            self._run_half(max_mode, u, v16, r, wl16, wts, None if max_mode else tail.b3, out)
        except Exception as exc:
            if memory.is_oom(exc):
                raise
            _HalfPairs._broken = f"{type(exc).__name__}: {str(exc)[:300]}"
            warnings.warn(f"P3-SAM half kernel unavailable ({_HalfPairs._broken}); using the "
                          "bf16 Triton kernel", RuntimeWarning, stacklevel=3)
            if saved is not None:
                out.copy_(saved)
            return False
        return True

    def _counted(self, max_mode: bool, u, v, r, wl, tail, out, fallback) -> None:
        _HalfPairs.calls += 1
        if not self._half(max_mode, u, v, r, wl, tail, out):
            self.fallbacks += 1
            _HalfPairs.fallback_calls += 1
            fallback(u, v, r, wl, tail, out)

    def logits(self, u, v, r, wl, tail: _LogitTail, out: torch.Tensor) -> None:
        self._counted(False, u, v, r, wl, tail, out, super().logits)

    def max(self, u, v, r, wl, tail: _MaxTail, out: torch.Tensor) -> None:
        self._counted(True, u, v, r, wl, tail, out, super().max)


# =========================================================================== evaluation

@dataclass
class HeadOutputs:
    """Raw outputs of one prompt batch."""

    stage1_logits: torch.Tensor  # [K, 3, N] fp32 (head-major: coalesced kernel access)
    stage2_logits: torch.Tensor  # [K, 3, N] fp32
    global_feat: torch.Tensor  # [K, S]
    iou_feat: torch.Tensor  # [K, S]
    iou_logits: torch.Tensor  # [K, 3]


def evaluate_prompts(heads: SplitHeads, terms: PointTerms, prompts: torch.Tensor,
                     kernel, iters: int = 1) -> HeadOutputs:
    """All heads for one prompt batch ``prompts`` [K, 3] (fp32, heads' frame).

    Reproduces ``P3SAM.forward(iter=iters)`` (spec §4.1-4.3) in the split formulation (§7.2):
    one pass over the points for the stage-1 logits, then per stage-2 iteration a pass for
    the global feature G (running max) and a pass for the new logits; the IoU feature (running
    max) is folded into the last pass.
    """
    if iters < 1:
        # Official quirk: iter=0 crashes (stage-2 outputs undefined); refuse clearly.
        raise ValueError("iters must be >= 1 (the official forward needs one stage-2 pass)")
    n = terms.n
    k = prompts.shape[0]
    s = heads.s2_dim
    dev = terms.u.device
    q = prompts.to(dev, torch.float32)
    v = prompt_terms(heads, q)  # [K, T]
    gr = heads.groups

    def vslice(name):
        a, b = gr[name]
        return v[:, a:b]

    # Stage 1: logits of the three seg_mlp heads (kept, fp32, [K, 3, N]).
    l1 = torch.empty(k, NUM_MASKS, n, dtype=torch.float32, device=dev)
    kernel.logits(terms.group(heads, "stage1"), vslice("stage1"), None, None, heads.stage1, l1)
    logits = l1
    for _ in range(iters):
        # Global feature G: running max over all points of seg_s2_mlp_g([f, p, q, L]).
        gmax = torch.full((k, s), float("-inf"), dtype=torch.float32, device=dev)
        kernel.max(terms.group(heads, "glob"), vslice("glob"), logits, heads.glob_wl,
                   heads.glob, gmax)
        g = gmax + heads.glob.b3
        # Per-prompt terms of the stage-2 and IoU heads: G (now known) and q.
        vg = v[:, gr["stage2"][0]:] + g @ heads.prompt_wg.t()  # [K, 4S]
        v2, vi = vg[:, :3 * s], vg[:, 3 * s:]
        new = torch.empty(k, NUM_MASKS, n, dtype=torch.float32, device=dev)
        kernel.logits(terms.group(heads, "stage2"), v2, logits, heads.stage2_wl, heads.stage2,
                      new)
        logits = new
    # IoU feature: running max of iou_mlp([G, f, p, q, L2]).  Official quirk (§4.3): its last
    # channels are the *stage-2* logits, while the stage-2 heads read the previous logits.
    imax = torch.full((k, s), float("-inf"), dtype=torch.float32, device=dev)
    kernel.max(terms.group(heads, "iou"), vi, logits, heads.iou_wl, heads.iou, imax)
    iou_feat = imax + heads.iou.b3
    return HeadOutputs(l1, logits, g, iou_feat, _iou_head(heads, iou_feat))


# =========================================================================== predictor

class P3SAMPredictor:
    """Promptable P3-SAM: Sonata features once per point set, then any number of prompts.

    ``numerics="exact"``: fp32 weights and arithmetic, TF32 off (the official heads are fp32
    without autocast); ``"fast"``: bf16 hidden layers with fp32 accumulation on CUDA (fused
    Triton kernel when available), fp32 on the CPU.  ``kernel``: ``"auto"``, ``"torch"`` or
    ``"triton"``.  ``max_prompt_batch`` / ``max_point_chunk`` cap the memory-derived sizes
    (tests force tiny ones).  Fast-mode options of the Triton kernel: ``approx_gelu`` (tanh
    GELU on the MUFU unit instead of erf; |Δ| <= 5e-4, below the bf16 rounding that follows),
    ``tune`` (time the tile candidates once per shape; default None: only with
    ``TURBOPART_P3SAM_TUNE=1``, else the fixed tiles of :data:`FIXED_CONFIGS`),
    ``fp32_point_terms`` (keep the
    per-point first-layer terms in fp32 instead of bf16: 2x their memory), ``heads``: the
    fused kernel's element-wise precision, ``"bf16"`` (fp32 math, the original kernel),
    ``"f16"`` / ``"bf16x2"`` (packed 16-bit math, :class:`_HalfPairs`; ``"f16"`` also keeps
    the per-point terms in fp16); default ``TURBOPART_P3SAM_HEADS`` or
    :data:`DEFAULT_HEADS_VARIANT`.
    """

    def __init__(self, model: nn.Module, *, numerics: Numerics | str = "fast",
                 device: torch.device | str | None = None, kernel: str = "auto",
                 max_prompt_batch: int | None = None, max_point_chunk: int | None = None,
                 fp32_point_terms: bool | None = None, tune: bool | None = None,
                 approx_gelu: bool = True, heads: str | None = None):
        self.model = model
        self.numerics = Numerics.parse(numerics)
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype(self.numerics, self.device)
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {kernel!r}")
        self._auto_kernel = kernel == "auto"
        if kernel == "auto":
            kernel = "triton" if (self.compute_dtype == torch.bfloat16
                                  and triton_available(self.device)) else "torch"
        d_ok = model.feat_dim % 16 == 0 and model.s2_dim % 16 == 0
        if kernel == "triton" and not (triton_available(self.device) and d_ok):
            raise ValueError("the Triton kernel needs Triton, a CUDA device (or "
                             "TRITON_INTERPRET=1) and head widths divisible by 16")
        self.kernel_name = kernel
        self.max_prompt_batch = max_prompt_batch
        self.max_point_chunk = max_point_chunk
        self.tune = tune
        self.approx_gelu = approx_gelu
        heads = heads_variant_default() if heads is None else str(heads).lower()
        if heads not in HEADS_VARIANTS:
            raise ValueError(f"heads must be one of {HEADS_VARIANTS}, got {heads!r}")
        self.heads_variant = heads
        # the half kernel computes the tanh GELU only; exact/CPU never use it
        self._half = kernel == "triton" and heads != "bf16" and approx_gelu \
            and self.numerics is Numerics.FAST
        explicit_fp32 = bool(fp32_point_terms)
        if fp32_point_terms is None:
            fp32_point_terms = self.compute_dtype == torch.float32
        self.point_dtype = torch.float32 if fp32_point_terms else self.compute_dtype
        if self._half and heads == "f16" and not explicit_fp32:
            self.point_dtype = torch.float16
        self.heads = SplitHeads.from_model(model, compute_dtype=self.compute_dtype,
                                           device=self.device)
        self.terms: PointTerms | None = None
        self.features = None  # SonataFeatures of the last set_points
        self.last_batch: dict[str, int] = {}
        self._iters = 1

    # ------------------------------------------------------------------ point sets
    @torch.no_grad()
    def set_points(self, points, normals, *, voxel_choice: torch.Tensor | None = None,
                   perms: Sequence[torch.Tensor] | None = None,
                   generator: torch.Generator | None = None, debug: bool = False
                   ) -> torch.Tensor:
        """Sonata features (``get_feat``, spec §2.5-3.6) + the per-point first-layer terms.

        Returns the shifted points: the official ``get_feat`` shifts the caller's array in
        place (CenterShift), and the heads and the prompts use that shifted frame.
        """
        from ..sonata.features import point_features
        pts = torch.as_tensor(points)
        nrm = torch.as_tensor(normals)
        feats = point_features(self.model.sonata, pts.to(self.device), nrm.to(self.device),
                               head=self.model.mlp, numerics=self.numerics.value,
                               voxel_choice=voxel_choice, perms=perms, generator=generator,
                               debug=debug)
        self.features = feats
        shifted = feats.shifted_points
        # Official: torch.from_numpy(points).float() -> the heads see fp32 shifted points.
        self.set_features(feats.point_feat, shifted)
        return shifted

    @torch.no_grad()
    def set_features(self, feats: torch.Tensor, points: torch.Tensor) -> None:
        """Use given point features [N, F] and points [N, 3] (heads' frame) directly."""
        if feats.shape[0] != points.shape[0] or feats.shape[1] != self.heads.feat_dim:
            raise ValueError(f"features {tuple(feats.shape)} do not match points "
                             f"{tuple(points.shape)} / feat_dim {self.heads.feat_dim}")
        with self._exact_context():
            self.terms = point_terms(self.heads, feats, points, dtype=self.point_dtype,
                                     tf32=self.numerics is Numerics.FAST)
        if self.point_dtype == torch.float16 and not _half_terms_ok(self.terms.u):
            # fp16 would overflow for these features: bf16 terms (the half kernel then
            # defers to the bf16 kernel, which reads any term dtype)
            warnings.warn("P3-SAM: per-point terms exceed the fp16 range; using bf16 terms and "
                          "the bf16 kernel for this point set", RuntimeWarning, stacklevel=2)
            self.terms = point_terms(self.heads, feats, points, dtype=self.compute_dtype,
                                     tf32=self.numerics is Numerics.FAST)

    # ------------------------------------------------------------------ prompts
    def _exact_context(self):
        return _matmul_precision("highest") if self.numerics is Numerics.EXACT \
            else contextlib.nullcontext()

    def _sizes(self, p: int, n: int) -> tuple[int, int]:
        """(prompt batch, point chunk) from the free memory of the device."""
        per_prompt = n * (2 * NUM_MASKS * 4 + 2 * NUM_MASKS)  # two fp32 logit sets + masks
        width = max(self.heads.feat_dim, self.heads.s2_dim)
        if self.kernel_name == "triton":
            kb = memory.items_that_fit(per_prompt, self.device, maximum=p)
            chunk = n
        else:
            per_pair = 32 * width + 64  # first-layer activations + hidden layer, fp32
            pairs = memory.items_that_fit(per_pair, self.device, cap_bytes=TORCH_KERNEL_CAP_BYTES)
            kb = max(1, min(p, pairs // max(n, 1),
                            memory.items_that_fit(per_prompt, self.device, fraction=0.3)))
            chunk = max(1, min(n, pairs // kb))
        if self.max_prompt_batch:
            kb = min(kb, self.max_prompt_batch)
        if self.max_point_chunk:
            chunk = min(chunk, self.max_point_chunk)
        return max(1, kb), max(1, chunk)

    def _kernel(self, chunk: int):
        if self.kernel_name == "triton":
            if self._half:
                return _HalfPairs(self.tune, torch.float16 if self.heads_variant == "f16"
                                  else torch.bfloat16)
            return _TritonPairs(self.tune, self.approx_gelu)
        return _TorchPairs(chunk)

    @torch.no_grad()
    def predict(self, prompts: torch.Tensor, *, return_all: bool = False,
                logits: bool = False, iters: int = 1) -> PromptPredictions:
        """Masks and IoUs of all ``prompts`` [P, 3] (shifted frame), internally batched.

        ``iters``: stage-2 refinements (the official ``iter``, always 1 in the official code).
        """
        if self.terms is None:
            raise RuntimeError("call set_points (or set_features) first")
        q = torch.as_tensor(prompts).to(self.device, torch.float32).reshape(-1, 3)
        if iters < 1:
            raise ValueError("iters must be >= 1 (the official forward needs one stage-2 pass)")
        self._iters = int(iters)
        try:
            return self._predict(q, return_all, logits)
        except Exception as exc:
            if self.kernel_name != "triton" or memory.is_oom(exc) or not self._auto_kernel:
                raise
            # The fused kernel failed to compile or launch on this GPU / Triton version:
            # fall back to the plain PyTorch kernel for good.
            warnings.warn(f"P3-SAM Triton kernel unavailable ({type(exc).__name__}: {exc}); "
                          "using the PyTorch kernel", RuntimeWarning, stacklevel=2)
            self.kernel_name = "torch"
            return self._predict(q, return_all, logits)

    def _predict(self, q: torch.Tensor, return_all: bool, logits: bool) -> PromptPredictions:
        p, n = q.shape[0], self.terms.n
        kb, chunk = self._sizes(p, n)

        def run(chunk_now: int) -> PromptPredictions:
            # On OOM: halve the prompt batch first, then the point chunk.
            return memory.retry_smaller(
                lambda kb_now: self._predict_batched(q, kb_now, chunk_now, return_all, logits),
                kb, device=self.device)

        with self._exact_context():
            return memory.retry_smaller(run, chunk, device=self.device)

    def _predict_batched(self, q, kb, chunk, return_all, logits) -> PromptPredictions:
        p, n = q.shape[0], self.terms.n
        kernel = self._kernel(chunk)
        self.last_batch = {"prompt_batch": kb, "point_chunk": chunk if kernel.name == "torch"
                           else n, "kernel": kernel.name}
        if isinstance(kernel, _HalfPairs):
            self.last_batch["heads"] = self.heads_variant
        dev = self.device
        masks = torch.empty(p, n, dtype=torch.bool, device=dev)
        all_masks = torch.empty(p, NUM_MASKS, n, dtype=torch.bool, device=dev) \
            if return_all else None
        pred_iou = torch.empty(p, NUM_MASKS, dtype=torch.float32, device=dev)
        keep: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "stage1_logits", "stage2_logits", "global_feat", "iou_feat", "iou_logits")}
        for a in range(0, p, kb):
            b = min(p, a + kb)
            out = evaluate_prompts(self.heads, self.terms, q[a:b], kernel, self._iters)
            piou = torch.sigmoid(out.iou_logits.float())
            pred_iou[a:b] = piou
            # Official get_mask: sigmoid(logit) > 0.5, sigmoid first (bit-faithful form).
            best = torch.argmax(piou, dim=-1)  # first index on ties, like np.argmax
            l2 = out.stage2_logits
            sel = l2[torch.arange(b - a, device=dev), best]  # [K, N]
            masks[a:b] = torch.sigmoid(sel) > 0.5
            if all_masks is not None:
                all_masks[a:b] = torch.sigmoid(l2) > 0.5
            if logits:
                keep["stage1_logits"].append(out.stage1_logits.transpose(1, 2))
                keep["stage2_logits"].append(l2.transpose(1, 2))
                keep["global_feat"].append(out.global_feat)
                keep["iou_feat"].append(out.iou_feat)
                keep["iou_logits"].append(out.iou_logits)
            del out, l2, sel
        best = torch.argmax(pred_iou, dim=-1)
        res = PromptPredictions(masks, pred_iou.gather(1, best[:, None])[:, 0], best, pred_iou,
                                all_masks)
        if logits:
            for k, v in keep.items():
                setattr(res, k, torch.cat(v) if v else None)
        return res


__all__ = ["P3SAMPredictor", "PromptPredictions", "SplitHeads", "PointTerms", "HeadOutputs",
           "point_terms", "prompt_terms", "evaluate_prompts", "triton_available",
           "KernelConfig", "HalfConfig", "HEADS_VARIANTS", "heads_variant_default"]
