"""Linear + exact GELU in one Triton GEMM (experimental ``gelu`` kernel group of the DiT).

``linear_gelu(x, w, b)`` = ``gelu(bf16(x · wᵀ + b))`` rounded to ``x.dtype``: the GEMM
accumulates in fp32, adds the bias, rounds to the compute dtype (what cuBLAS writes), then the
epilogue applies PyTorch's exact GELU ``0.5 · y · (1 + erf(y / √2))`` in fp32 and rounds once
more, which is what ``F.gelu(F.linear(x, w, b))`` computes.  It saves the GELU pass over the
[T, 4D] hidden activations (one write and one read of it); whether that beats cuBLAS +
GELU depends on how close this GEMM gets to cuBLAS, so the group is off by default and
``benchmarks/dit_variants.py`` measures it.
"""
from __future__ import annotations

import os

import torch

from . import HAVE_TRITON, interpreting

if HAVE_TRITON:  # pragma: no branch
    import triton
    import triton.language as tl

    from .rownorm import _cvt

    @triton.jit(do_not_specialize=["M"])
    def _linear_gelu_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N, stride_am, stride_wn,
                            stride_cm, K: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            EVEN_K: tl.constexpr, EMU: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % in_group) % size_m)
        pid_n = (pid % in_group) // size_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        rm = (offs_m % M).to(tl.int64)
        rn = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] tile of wᵀ
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                left = K - k0
                a = tl.load(a_ptrs, mask=offs_k[None, :] < left, other=0.0)
                w = tl.load(w_ptrs, mask=offs_k[:, None] < left, other=0.0)
            if EMU:  # the interpreter's bf16 dot is wrong; products are exact in fp32
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:  # fp32 operands: full fp32 products, as F.linear (TF32 off), not TF32
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            a_ptrs += BK
            w_ptrs += BK
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        y = _cvt(acc, c_ptr, EMU).to(tl.float32)  # the GEMM output as the per-op path rounds it
        g = y * 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, _cvt(g, c_ptr, EMU), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


#: (BM, BN, BK, GROUP_M, num_warps, num_stages) candidates for Hopper (wgmma, software
#: pipelining); ``TURBOPART_DIT_GELU_CONFIG`` picks one (index, default 0);
#: ``benchmarks/dit_variants.py`` times them all.  Small tiles in the interpreter.
CONFIGS = ((128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4))
INTERPRET_CONFIG = (16, 16, 16, 2, 1, 1)


def default_config() -> tuple:
    return CONFIGS[int(os.environ.get("TURBOPART_DIT_GELU_CONFIG", "0")) % len(CONFIGS)]


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *,
                config: tuple | None = None) -> torch.Tensor:
    """``gelu(linear(x, w, b))`` for 2-D ``x`` [M, K] (rows contiguous), ``w`` [N, K]."""
    if x.dim() != 2 or x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("linear_gelu needs 2-D rows contiguous along K and a contiguous weight")
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != x.dtype:
        raise ValueError("weight shape/dtype does not match the input")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bm, bn, bk, gm, warps, stages = INTERPRET_CONFIG if interpreting() else \
        (config or default_config())
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_gelu_kernel[grid](
        x, w, b if b is not None else w, out, m, n, x.stride(0), w.stride(0), out.stride(0),
        K=k, HAS_BIAS=b is not None, BM=bm, BN=bn, BK=bk, GROUP_M=gm, EVEN_K=k % bk == 0,
        EMU=interpreting(), IEEE=x.dtype == torch.float32, num_warps=warps,
        num_stages=stages)
    return out
