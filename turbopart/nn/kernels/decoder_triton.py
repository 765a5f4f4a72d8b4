"""Triton kernels of the ShapeVAE geometry decoder's fused query path (spec xpart §3.4).

Every kernel computes the official arithmetic of the op sequence it replaces (the rounding
points of the official bf16 autocast run), only the order of fp32 reductions differs:

* :func:`fourier_rows` — the query points' Fourier features, cast and zero-padded, as the
  query_proj operand, in one pass;
* :func:`layer_norm` — ``bf16(LN_fp32(x))`` (ln_1; the head-wise q_norm of the SDPA path);
* :func:`add_layer_norm` — ``x = bf16(a + b)`` and ``bf16(LN_fp32(x))`` (residual + ln_3),
  ``a`` optionally shared by several parts (row ``r`` reads ``a[r % a_rows]``);
* :func:`add_ln_dot` — ``x = bf16(a + b)``, ``bf16(LN_fp32(x))`` · output_proj + bias,
  rounded to bf16 (residual + ln_post + the 1-wide output projection);
* :func:`attention` — softmax(q kᵀ / √d) v over the part's keys (flash-style online softmax,
  fp32 scores, P rounded to bf16 before P·V, as SDPA's flash kernel), with the per-head
  q_norm LayerNorm fused into the Q load and one query set optionally shared by every part;
  tiles whose Cauchy–Schwarz score bound is small take the exponentials against that bound
  instead of a running maximum (same function; P's bf16 rounding falls differently);
* :func:`linear` — ``bf16(x Wᵀ + b)`` with an optional exact-erf GELU
  (``bf16(gelu(bf16(x Wᵀ + b)))``) or residual (``bf16(r + bf16(x Wᵀ + b))``) epilogue;
  pointer loads or TMA descriptors.

Each wrapper falls back to the PyTorch composition (the reference arithmetic, op for op)
when Triton is missing, the tensors are not on CUDA, the shapes do not fit the kernel, or
the kernel fails to compile or launch; a failure is reported once with ``warnings.warn`` and
that kernel stays off for the process.  ``TRITON_INTERPRET=1`` runs the kernels on CPU
tensors (tests).  Row counts are not specialised (``do_not_specialize``): one compilation per
kernel variant, whatever the chunk sizes (4 kernels on the default path, a few seconds once
per machine; Triton's disk cache serves later processes).
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None

from ...runtime.switches import switch
from . import _DISABLED, disabled, reset, run_or_fallback  # noqa: F401 (shared; re-exported)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HALF = (torch.bfloat16, torch.float16)


def available(t: torch.Tensor) -> bool:
    """Triton can run on ``t`` (CUDA, or CPU under the interpreter)."""
    return triton is not None and (t.is_cuda or INTERPRET)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------- kernels

if triton is not None:

    def no_align(*names: str) -> dict:
        """``triton.jit`` options that keep pointer arguments ``names`` from being
        specialised on 16-byte alignment, so tensors sliced at any offset take the same
        compiled kernel (Triton otherwise compiles a second one for misaligned pointers,
        mid-decode).  Older Triton builds lack the option: no options then."""
        ok = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
        return {"do_not_specialize_on_alignment": list(names)} if ok else {}

    #: The Fourier kernel reads the points with scalar loads (see :func:`no_align`).
    _NO_ALIGN_P = no_align("p_ptr")

    @triton.jit
    def _ln_affine(xf, w_ptr, b_ptr, c, eps, N: tl.constexpr):
        """LayerNorm over the N columns of fp32 rows ``xf``: two-pass mean and centred
        variance, then ``w`` and ``b`` (read at columns ``c``), in fp32."""
        mean = tl.sum(xf, 1) / N
        xc = xf - mean[:, None]
        rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / N + eps)
        return xc * rstd[:, None] * tl.load(w_ptr + c)[None, :] + tl.load(b_ptr + c)[None, :]

    @triton.jit
    def _added_rows(a_ptr, b_ptr, n_rows, a_rows, N: tl.constexpr, ROWS: tl.constexpr,
                    HAS_B: tl.constexpr):
        """This program's ROWS rows of ``x = a (+ b)`` in the storage dtype (row r reads
        a[r % a_rows]): (int64 row index, row mask, column index, x)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = r < n_rows
        c = tl.arange(0, N)
        r64 = r.to(tl.int64)
        ra = (r % a_rows).to(tl.int64)
        x = tl.load(a_ptr + ra[:, None] * N + c[None, :], mask=rmask[:, None], other=0.0)
        if HAS_B:
            b = tl.load(b_ptr + r64[:, None] * N + c[None, :], mask=rmask[:, None], other=0.0)
            x = (x.to(tl.float32) + b.to(tl.float32)).to(a_ptr.dtype.element_ty)
        return r64, rmask, c, x

    @triton.jit(do_not_specialize=["n_rows", "a_rows"])
    def _ln_rows_kernel(a_ptr, b_ptr, w_ptr, bias_ptr, x_ptr, y_ptr, n_rows, a_rows, eps,
                        N: tl.constexpr, ROWS: tl.constexpr, HAS_B: tl.constexpr,
                        STORE_X: tl.constexpr):
        """y = bf16(LN(x)), x = a (+ b, rounded to the storage dtype); row r reads a[r % a_rows]."""
        r64, rmask, c, x = _added_rows(a_ptr, b_ptr, n_rows, a_rows, N, ROWS, HAS_B)
        if STORE_X:
            tl.store(x_ptr + r64[:, None] * N + c[None, :], x, mask=rmask[:, None])
        xf = x.to(tl.float32)
        y = _ln_affine(xf, w_ptr, bias_ptr, c, eps, N)
        tl.store(y_ptr + r64[:, None] * N + c[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None])

    @triton.jit(do_not_specialize=["n_rows", "a_rows"])
    def _ln_dot_kernel(a_ptr, b_ptr, w_ptr, bias_ptr, ow_ptr, ob_ptr, out_ptr, n_rows, a_rows,
                       eps, N: tl.constexpr, ROWS: tl.constexpr, HAS_B: tl.constexpr,
                       HAS_LN: tl.constexpr):
        """logit = bf16(bf16(LN(x)) · ow + ob), x = bf16(a + b) (a row r reads a[r % a_rows])."""
        r64, rmask, c, x = _added_rows(a_ptr, b_ptr, n_rows, a_rows, N, ROWS, HAS_B)
        xf = x.to(tl.float32)
        if HAS_LN:
            xf = _ln_affine(xf, w_ptr, bias_ptr, c, eps, N).to(a_ptr.dtype.element_ty)
            xf = xf.to(tl.float32)
        ow = tl.load(ow_ptr + c).to(tl.float32)
        logit = tl.sum(xf * ow[None, :], 1) + tl.load(ob_ptr).to(tl.float32)
        tl.store(out_ptr + r64, logit.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _fourier_tile(x0, x1, x2, fr_ptr, j, NF: tl.constexpr, COS: tl.constexpr,
                      F64: tl.constexpr, dt: tl.constexpr):
        """sin (or cos) columns j < 3·NF (axis-major: axis j // NF, frequency j % NF) of the
        rows' points, in the points' promoted dtype, rounded through fp32 to ``dt``."""
        live = j < 3 * NF
        axis = j // NF
        fr = tl.load(fr_ptr + j % NF, mask=live, other=0.0)
        xa = tl.where(axis[None, :] == 0, x0[:, None],
                      tl.where(axis[None, :] == 1, x1[:, None], x2[:, None]))
        if F64:
            prod = xa.to(tl.float64) * fr.to(tl.float64)[None, :]
        else:
            prod = xa.to(tl.float32) * fr[None, :]
        if COS:
            v = tl.cos(prod)
        else:
            v = tl.sin(prod)
        return tl.where(live[None, :], v.to(tl.float32), 0.0).to(dt)

    @triton.jit(do_not_specialize=["n_rows"], **_NO_ALIGN_P)
    def _fourier_kernel(p_ptr, fr_ptr, f_ptr, n_rows, NF: tl.constexpr, X0: tl.constexpr,
                        JS: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr,
                        F64: tl.constexpr):
        """Rows ``[x (X0) | sin (3·NF) | cos (3·NF) | 0 …]`` (KW columns) of points [R, 3]:
        axis-major Fourier features in fp64 (F64) or fp32, rounded through fp32 to the
        output dtype (PyTorch's cast), the zero padding of the GEMM operand included."""
        pid = tl.program_id(0)
        r = pid * BM + tl.arange(0, BM)
        rmask = r < n_rows
        r64 = r.to(tl.int64)
        x0 = tl.load(p_ptr + r64 * 3, mask=rmask, other=0.0)
        x1 = tl.load(p_ptr + r64 * 3 + 1, mask=rmask, other=0.0)
        x2 = tl.load(p_ptr + r64 * 3 + 2, mask=rmask, other=0.0)
        dt: tl.constexpr = f_ptr.dtype.element_ty
        js = tl.arange(0, JS)
        row = f_ptr + r64[:, None] * KW
        m = rmask[:, None]
        tl.store(row + (X0 + js)[None, :],
                 _fourier_tile(x0, x1, x2, fr_ptr, js, NF, False, F64, dt),
                 mask=m & (js < 3 * NF)[None, :])
        tl.store(row + (X0 + 3 * NF + js)[None, :],
                 _fourier_tile(x0, x1, x2, fr_ptr, js, NF, True, F64, dt),
                 mask=m & (js < 3 * NF)[None, :])
        xs = tl.where(js[None, :] == 0, x0[:, None],
                      tl.where(js[None, :] == 1, x1[:, None], x2[:, None]))
        if F64:
            xs = xs.to(tl.float64).to(tl.float32)
        xs = xs.to(tl.float32)
        pad = X0 + 6 * NF
        tl.store(row + js[None, :], xs.to(dt), mask=m & (js < X0)[None, :])
        tl.store(row + (pad + js)[None, :], tl.zeros([BM, JS], dt),
                 mask=m & ((pad + js) < KW)[None, :])

    @triton.jit
    def _q_tile(q_ptr, qw_ptr, qb_ptr, rows64, rmask, d, stride_qm, eps, D: tl.constexpr,
                QNORM: tl.constexpr, out_dtype: tl.constexpr):
        """Rows ``rows64`` of one head's queries (``q_ptr`` at the part's head), through the
        head-wise q_norm LayerNorm (fp32, rounded to ``out_dtype``) when QNORM."""
        q = tl.load(q_ptr + rows64[:, None] * stride_qm + d[None, :], mask=rmask[:, None],
                    other=0.0)
        if QNORM:
            q = _ln_affine(q.to(tl.float32), qw_ptr, qb_ptr, d, eps, D).to(out_dtype)
        return q

    @triton.jit(do_not_specialize=["n_q"])
    def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qw_ptr, qb_ptr, kn_ptr, n_q,
                     stride_qb, stride_qm, stride_kb, stride_kh, stride_vb, stride_vh,
                     stride_ob, stride_om, qk_scale, eps, bound_limit,
                     H: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, QNORM: tl.constexpr):
        """One (query tile, part, head): O = softmax(Q Kᵀ / √D) V, Q through q_norm.

        ``kn_ptr`` holds max‖k‖ per (part, head); a row's scores (log2 units) are at most
        ``c = ‖q‖·max‖k‖·scale`` and at least −c, so when every row of the tile has
        ``c ≤ bound_limit`` the exponentials are taken against c instead of the running
        maximum (softmax is shift-invariant; e^(s−c) ≥ 2^(−2c) stays a normal number):
        no running max, no rescaling of the accumulator.  Other tiles (every tile when
        ``bound_limit`` < 0) run the online softmax."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < n_q
        rows64 = rows.to(tl.int64)
        d = tl.arange(0, D)
        q = _q_tile(q_ptr + b * stride_qb + h * D, qw_ptr, qb_ptr, rows64, rmask, d, stride_qm,
                    eps, D, QNORM, k_ptr.dtype.element_ty)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        kbase = k_ptr + b * stride_kb + h * stride_kh
        vbase = v_ptr + b * stride_vb + h * stride_vh
        n = tl.arange(0, BN)
        qf = q.to(tl.float32)
        c = tl.sqrt(tl.sum(qf * qf, 1)) * tl.load(kn_ptr + pid_bh) * qk_scale
        if tl.max(c, 0) <= bound_limit:
            for start in range(0, T, BN):
                kt = tl.load(kbase + (start + n)[:, None] * D + d[None, :])
                s = tl.dot(q, tl.trans(kt))
                p = tl.math.exp2(s * qk_scale - c[:, None])
                l_i += tl.sum(p, 1)
                vt = tl.load(vbase + (start + n)[:, None] * D + d[None, :])
                acc = tl.dot(p.to(vt.dtype), vt, acc)
        else:
            m_i = tl.full([BM], float("-inf"), tl.float32)
            for start in range(0, T, BN):
                kt = tl.load(kbase + (start + n)[:, None] * D + d[None, :])
                s = tl.dot(q, tl.trans(kt))
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                vt = tl.load(vbase + (start + n)[:, None] * D + d[None, :])
                acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
                m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + rows64[:, None] * stride_om + h * D + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _tile_of(tile, num_pid_m, num_pid_n: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of tile number ``tile``, grouped GROUP_M row blocks at
        a time (the weight's column blocks stay in L2 while a group walks them)."""
        num_in_group = GROUP_M * num_pid_n
        first_m = (tile // num_in_group) * GROUP_M
        gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((tile % num_in_group) % gsize)
        pid_n = (tile % num_in_group) // gsize
        return pid_m, pid_n

    @triton.jit
    def _tile_ids(M, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  GROUP_M: tl.constexpr):
        return _tile_of(tl.program_id(0), tl.cdiv(M, BM), N // BN, GROUP_M)

    @triton.jit
    def _gelu_erf(x):
        """PyTorch's exact GELU ``0.5·x·(1 + erf(x/√2))`` in fp32, erf by Abramowitz–Stegun
        7.1.26 (|error| < 1.5e-7, below the bf16 result's resolution; cheaper than
        libdevice's erff, and as close to ``F.gelu`` on the bf16 outputs: see
        ``benchmarks/decoder_kernel_lab.py``)."""
        z = x * 0.7071067811865476
        az = tl.abs(z)
        t = tl.fdiv(1.0, 1.0 + 0.3275911 * az, ieee_rounding=False)
        poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
                + 0.254829592) * t
        erf = 1.0 - poly * tl.math.exp2(-(az * az) * 1.4426950408889634)
        return x * 0.5 * (1.0 + tl.where(z < 0, -erf, erf))

    @triton.jit
    def _epilogue(acc, rm, rn, M, bias_ptr, res_ptr, res_rows, out_dtype: tl.constexpr,
                  N: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr):
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        out = acc.to(out_dtype)
        if EPI == 1:  # exact-erf GELU of the rounded linear output
            out = _gelu_erf(out.to(tl.float32)).to(out_dtype)
        if EPI == 2:  # residual: bf16(res + bf16(linear))
            rr = (rm % res_rows).to(tl.int64)
            res = tl.load(res_ptr + rr[:, None] * N + rn[None, :], mask=(rm < M)[:, None],
                          other=0.0)
            out = (res.to(tl.float32) + out.to(tl.float32)).to(out_dtype)
        return out

    @triton.jit(do_not_specialize=["M", "res_rows"])
    def _gemm_kernel(a_ptr, w_ptr, c_ptr, bias_ptr, res_ptr, M, res_rows,
                     N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EPI: tl.constexpr):
        """C = epilogue(A Wᵀ): A [M, K], W [N, K] (nn.Linear layout), both row-major."""
        pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        ra = (rm % M).to(tl.int64)
        a_ptrs = a_ptr + ra[:, None] * K + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * K + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K // BK):
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
            acc = tl.dot(a, w, acc)
            a_ptrs += BK
            w_ptrs += BK
        out = _epilogue(acc, rm, rn, M, bias_ptr, res_ptr, res_rows, c_ptr.dtype.element_ty,
                        N, HAS_BIAS, EPI)
        tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], out,
                 mask=(rm < M)[:, None])

    @triton.jit(do_not_specialize=["M", "res_rows"])
    def _gemm_tma_kernel(a_desc, w_desc, c_desc, bias_ptr, res_ptr, M, res_rows,
                         N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                         EPI: tl.constexpr, STAGES: tl.constexpr):
        """As :func:`_gemm_kernel`, with TMA descriptor loads and store."""
        pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, K // BK, num_stages=STAGES):
            a = a_desc.load([pid_m * BM, k * BK])
            w = w_desc.load([pid_n * BN, k * BK])
            acc = tl.dot(a, w.T, acc)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        out = _epilogue(acc, rm, rn, M, bias_ptr, res_ptr, res_rows, c_desc.dtype, N,
                        HAS_BIAS, EPI)
        c_desc.store([pid_m * BM, pid_n * BN], out)


    @triton.jit(do_not_specialize=["M", "res_rows"])
    def _gemm_pers_kernel(a_desc, w_desc, c_desc, bias_ptr, res_ptr, M, res_rows,
                          N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                          HAS_BIAS: tl.constexpr, EPI: tl.constexpr, NUM_SMS: tl.constexpr):
        """As :func:`_gemm_tma_kernel`, persistent (one program per SM walks the tiles; the
        loads of the next tile overlap this tile's epilogue), the epilogue in two column
        halves (fewer live registers)."""
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n: tl.constexpr = N // BN
        num_tiles = num_pid_m * num_pid_n
        tile_c = start - NUM_SMS
        HB: tl.constexpr = BN // 2
        for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_of(tile_id, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K // BK):
                a = a_desc.load([pid_m * BM, k * BK])
                w = w_desc.load([pid_n * BN, k * BK])
                acc = tl.dot(a, w.T, acc)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile_of(tile_c, num_pid_m, num_pid_n, GROUP_M)
            rm = pid_m * BM + tl.arange(0, BM)
            rn = pid_n * BN + tl.arange(0, HB)
            a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, HB)), (0, 2, 1)))
            c_desc.store([pid_m * BM, pid_n * BN],
                         _epilogue(a0, rm, rn, M, bias_ptr, res_ptr, res_rows, c_desc.dtype,
                                   N, HAS_BIAS, EPI))
            c_desc.store([pid_m * BM, pid_n * BN + HB],
                         _epilogue(a1, rm, rn + HB, M, bias_ptr, res_ptr, res_rows,
                                   c_desc.dtype, N, HAS_BIAS, EPI))


# --------------------------------------------------------------------------- references

def _ln_ref(x: torch.Tensor, w, b, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def _rows_of(a: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``a`` [A, N] repeated to ``n_rows`` rows (row r = a[r % A]) as a broadcast view."""
    if a.shape[0] == n_rows:
        return a
    return a.unsqueeze(0).expand(n_rows // a.shape[0], -1, -1).reshape(n_rows, -1)


def _add_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` (+ ``b``) in the storage dtype, ``a`` broadcast over the row blocks of ``b``."""
    if b is None:
        return a
    if a.shape[0] == b.shape[0]:
        return a + b
    return (a.unsqueeze(0) + b.view(-1, *a.shape)).view(b.shape)


# --------------------------------------------------------------------------- wrappers

def _ln_ok(*ts: torch.Tensor) -> bool:
    x = ts[0]
    return (available(x) and x.dtype in _HALF and _pow2(x.shape[-1]) and x.shape[-1] >= 16
            and all(t is None or t.is_contiguous() for t in ts))


def _ln_rows_launch(a, b, w, bias, eps, n_rows, store_x):
    n = a.shape[-1]
    y = torch.empty(n_rows, n, dtype=a.dtype, device=a.device)
    x = torch.empty(n_rows, n, dtype=a.dtype, device=a.device) if store_x else y
    rows = max(1, min(128, 8192 // n))
    grid = (triton.cdiv(n_rows, rows),)
    _ln_rows_kernel[grid](a, a if b is None else b, w, bias, x, y, n_rows, a.shape[0],
                          float(eps), N=n, ROWS=rows, HAS_B=b is not None, STORE_X=store_x,
                          num_warps=8 if rows * n >= 8192 else 4)
    return x, y


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
               use_triton: bool = True) -> torch.Tensor:
    """``bf16(LN_fp32(x))`` over the last axis of ``x`` [R, N] (fp32 weight and bias)."""
    if not (use_triton and _ln_ok(x)):
        return _ln_ref(x, w, b, eps)
    return run_or_fallback(
        "layer_norm", lambda: _ln_rows_launch(x, None, w, b, eps, x.shape[0], False)[1],
        lambda: _ln_ref(x, w, b, eps))


def add_layer_norm(a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor,
                   bias: torch.Tensor, eps: float, use_triton: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, bf16(LN_fp32(x)))`` with ``x = a + b`` in the storage dtype (``a`` [A, N] is
    shared by the row blocks of ``b`` [P·A, N]); ``b`` None: ``x = a``."""
    n_rows = a.shape[0] if b is None else b.shape[0]

    def ref():
        x = _add_ref(a, b)
        return x, _ln_ref(x, w, bias, eps)
    if not (use_triton and _ln_ok(a, b)):
        return ref()
    if b is None:
        return a, run_or_fallback(
            "layer_norm", lambda: _ln_rows_launch(a, None, w, bias, eps, n_rows, False)[1],
            lambda: _ln_ref(a, w, bias, eps))
    return run_or_fallback(
        "add_layer_norm", lambda: _ln_rows_launch(a, b, w, bias, eps, n_rows, True), ref)


def add_ln_dot(a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, out_w: torch.Tensor,
               out_b: torch.Tensor, use_triton: bool = True) -> torch.Tensor:
    """Logits [R] = ``bf16(bf16(LN(x)) · out_w + out_b)``, ``x = a + b`` (``a`` shared by the
    row blocks of ``b``); ``w`` None: no LayerNorm (``x · out_w + out_b``)."""
    n_rows = a.shape[0] if b is None else b.shape[0]
    has_ln = w is not None

    def ref():
        x = _add_ref(a, b)
        if has_ln:
            x = _ln_ref(x, w, bias, eps)
        return F.linear(x, out_w.to(x.dtype), out_b.to(x.dtype))[:, 0]
    if not (use_triton and _ln_ok(a, b) and out_w.shape[0] == 1):
        return ref()

    def launch():
        n = a.shape[-1]
        out = torch.empty(n_rows, dtype=a.dtype, device=a.device)
        rows = max(1, min(128, 8192 // n))
        ow = out_w.reshape(-1).contiguous()
        _ln_dot_kernel[(triton.cdiv(n_rows, rows),)](
            a, a if b is None else b, w if has_ln else ow, bias if has_ln else ow, ow,
            out_b.reshape(-1).contiguous(), out, n_rows, a.shape[0], float(eps), N=n, ROWS=rows,
            HAS_B=b is not None, HAS_LN=has_ln, num_warps=8 if rows * n >= 8192 else 4)
        return out
    return run_or_fallback("ln_dot", launch, ref)


# ---- Fourier features of the query points

def fourier_rows_ref(pts: torch.Tensor, frequencies: torch.Tensor, include_input: bool,
                     feat_dtype: torch.dtype, out_dtype: torch.dtype, width: int
                     ) -> torch.Tensor:
    """The official ops: ``fourier(pts)`` cast to ``feat_dtype`` then ``out_dtype``, zero
    columns appended up to ``width`` (the padded query_proj operand); points [R, 3]."""
    from ..fourier import fourier_features
    f = fourier_features(pts, frequencies, include_input=include_input,
                         out_dtype=feat_dtype).to(out_dtype)
    if f.shape[-1] < width:
        f = F.pad(f, (0, width - f.shape[-1]))
    return f


def fourier_rows(pts: torch.Tensor, frequencies: torch.Tensor, include_input: bool,
                 feat_dtype: torch.dtype, out_dtype: torch.dtype, width: int,
                 use_triton: bool = True) -> torch.Tensor:
    """:func:`fourier_rows_ref` in one kernel (one write of the [R, width] operand instead
    of the product, sin, cos, concatenation, two casts and the padding)."""
    n_rows = pts.shape[0]
    nf = frequencies.numel()
    x0 = 3 if include_input else 0
    fdt = torch.promote_types(pts.dtype, frequencies.dtype)
    ok = (use_triton and available(pts) and out_dtype in _HALF and pts.shape[-1] == 3
          and 0 < nf <= 10 and fdt in (torch.float32, torch.float64)
          and feat_dtype in (torch.float32, out_dtype)
          and frequencies.dtype == torch.float32 and x0 + 6 * nf <= width)

    def ref():
        return fourier_rows_ref(pts, frequencies, include_input, feat_dtype, out_dtype, width)
    if not ok or n_rows == 0:
        return ref()

    def launch():
        f = torch.empty(n_rows, width, dtype=out_dtype, device=pts.device)
        bm = 64
        js = max(16, triton.next_power_of_2(max(3 * nf, width - x0 - 6 * nf)))
        _fourier_kernel[(triton.cdiv(n_rows, bm),)](
            pts.contiguous(), frequencies.contiguous(), f, n_rows, NF=nf, X0=x0, JS=js,
            KW=width, BM=bm, F64=fdt == torch.float64, num_warps=4)
        return f
    return run_or_fallback("fourier", launch, ref)


# ---- attention

class AttnConfig(NamedTuple):
    bm: int = 128
    bn: int = 64
    warps: int = 4
    stages: int = 3


_ATTN_DEFAULT = [AttnConfig()]


def _attn_config() -> AttnConfig:
    """``TURBOPART_DECODER_ATTN_CFG`` ("bm,bn,warps,stages") or the default."""
    env = os.environ.get("TURBOPART_DECODER_ATTN_CFG")
    if env:
        return AttnConfig(*[int(v) for v in env.split(",")])
    return _ATTN_DEFAULT[0]


def set_attn_config(cfg: AttnConfig | None) -> None:
    """Set (None: reset) the attention kernel's default tiles."""
    _ATTN_DEFAULT[0] = AttnConfig(*cfg) if cfg is not None else AttnConfig()


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qn_w, qn_b, eps: float,
                  n_q: int, backend=None) -> torch.Tensor:
    """PyTorch path: q [P·n_q, H·d] (P = 1 shared by all B parts, or B) → head q_norm →
    SDPA against k/v [B, H, T, d] → [B·n_q, H·d]."""
    bsz, h, _t, d = k.shape
    p = q.shape[0] // n_q
    qh = q.view(p, n_q, h, d)
    if qn_w is not None:
        qh = _ln_ref(qh, qn_w, qn_b, eps)
    qh = qh.transpose(1, 2)
    if p != bsz:
        qh = qh.expand(bsz, -1, -1, -1)
    from ..attention import attention as sdpa
    o = None
    if backend is not None and f"sdpa_{backend}" not in _DISABLED:
        from torch.nn.attention import sdpa_kernel
        try:
            with sdpa_kernel(backend):
                try:
                    o = sdpa(qh, k, v)
                except RuntimeError:
                    o = sdpa(qh.contiguous(), k, v)
        except RuntimeError as exc:
            _DISABLED[f"sdpa_{backend}"] = str(exc)[:300]
            warnings.warn(f"turbopart geometry decoder: SDPA backend {backend} unavailable "
                          f"({str(exc)[:200]}); using PyTorch's default choice",
                          RuntimeWarning, stacklevel=2)
    if o is None:
        if p != bsz:
            qh = qh.contiguous()  # SDPA backends want real strides
        o = sdpa(qh, k, v)
    return o.transpose(1, 2).reshape(bsz * n_q, h * d)


#: Largest score bound (log2 units) for which a tile skips the running maximum: its
#: exponentials then lie in [2^(−2·limit), 1], normal fp32 / bf16 numbers.
SCORE_BOUND_LIMIT = 60.0


def score_bound_enabled() -> bool:
    """``TURBOPART_DECODER_SCORE_BOUND=0``: always the online softmax (A/B)."""
    return switch("TURBOPART_DECODER_SCORE_BOUND")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qn_w, qn_b, eps: float,
              n_q: int, use_triton: bool = True, config: AttnConfig | None = None
              ) -> torch.Tensor:
    """Cross-attention of queries ``q`` [P·n_q, H·d] (rows part-major; P = 1: one query set
    shared by all B parts) against ``k``/``v`` [B, H, T, d]: ``[B·n_q, H·d]`` in the storage
    dtype, q_norm (LayerNorm over d; None: identity) applied to q first."""
    bsz, h, t, d = k.shape
    cfg = config or _attn_config()
    ok = (use_triton and available(q) and q.dtype in _HALF and k.dtype == q.dtype
          and v.dtype == q.dtype and d in (16, 32, 64, 128) and t % cfg.bn == 0
          and q.is_contiguous() and q.shape[1] == h * d)

    def ref():
        return attention_ref(q, k, v, qn_w, qn_b, eps, n_q)
    if not ok:
        return ref()

    def launch():
        kk, vv = k.contiguous(), v.contiguous()
        out = torch.empty(bsz * n_q, h * d, dtype=q.dtype, device=q.device)
        shared = q.shape[0] == n_q and bsz > 1
        qk_scale = (1.0 / math.sqrt(d)) * 1.4426950408889634
        grid = (triton.cdiv(n_q, cfg.bm), bsz * h)
        has_norm = qn_w is not None
        kn = torch.linalg.vector_norm(kk, dim=-1, dtype=torch.float32).amax(-1).reshape(-1)
        limit = SCORE_BOUND_LIMIT if score_bound_enabled() else -1.0
        _attn_kernel[grid](
            q, kk, vv, out, qn_w if has_norm else q, qn_b if has_norm else q, kn, n_q,
            0 if shared else n_q * h * d, h * d, kk.stride(0), kk.stride(1), vv.stride(0),
            vv.stride(1), n_q * h * d, h * d, qk_scale, float(eps), limit,
            H=h, T=t, D=d, BM=cfg.bm, BN=cfg.bn, QNORM=has_norm,
            num_warps=cfg.warps, num_stages=cfg.stages)
        return out
    return run_or_fallback("attention", launch, ref)


# ---- linear layers

class GemmConfig(NamedTuple):
    bm: int = 128
    bn: int = 256
    bk: int = 64
    group_m: int = 8
    warps: int = 8
    stages: int = 3


#: Tiles per (N, K, mode) (H100; benchmarks/decoder_variants.py times alternatives).
_GEMM_DEFAULTS: dict[tuple[int, int, str], GemmConfig] = {}


def gemm_config(n: int, k: int, mode: str = "ptr") -> GemmConfig:
    """Tile configuration for an [M, k] × [k, n] product: ``TURBOPART_DECODER_GEMM_CFG``
    ("bm,bn,bk,group_m,warps,stages") overrides; otherwise the table or a default."""
    env = os.environ.get("TURBOPART_DECODER_GEMM_CFG")
    if env:
        return GemmConfig(*[int(v) for v in env.split(",")])
    cfg = _GEMM_DEFAULTS.get((n, k, mode), GemmConfig())
    return cfg._replace(bn=min(cfg.bn, n), bk=min(cfg.bk, k))


def set_gemm_config(n: int, k: int, cfg: GemmConfig | None, mode: str = "ptr") -> None:
    """Set (or with None clear) the tile configuration used for shape (n, k) and ``mode``."""
    if cfg is None:
        _GEMM_DEFAULTS.pop((n, k, mode), None)
    else:
        _GEMM_DEFAULTS[(n, k, mode)] = GemmConfig(*cfg)


EPI_NONE, EPI_GELU, EPI_RESIDUAL = 0, 1, 2


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, epilogue: int = 0,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """The official ops: ``F.linear`` (bias rounded with the output), then ``F.gelu`` or
    ``residual + out`` in the storage dtype (``residual`` shared by the row blocks)."""
    y = F.linear(x, w, b)
    if epilogue == EPI_GELU:
        return F.gelu(y)
    if epilogue == EPI_RESIDUAL:
        return _add_ref(residual, y)
    return y


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, epilogue: int = 0,
           residual: torch.Tensor | None = None, *, mode: str = "ptr",
           config: GemmConfig | None = None) -> torch.Tensor:
    """``epilogue(x Wᵀ + b)`` (see :func:`linear_ref`) with a Triton GEMM: ``mode`` "ptr"
    (pointer loads), "tma" (TMA descriptors) or "pers" (TMA, persistent, split epilogue),
    or "gluon" for the GELU epilogue (:mod:`.gelu_gemm_gluon`: Hopper, warp-specialised;
    other epilogues and other GPUs take :func:`linear_ref`); "torch" (or anything
    unsupported) uses :func:`linear_ref`."""
    m, k = x.shape
    n = w.shape[0]

    def ref():
        return linear_ref(x, w, b, epilogue, residual)
    if mode == "gluon":
        from . import gelu_gemm_gluon as gg
        if (epilogue != EPI_GELU or residual is not None or not gg.available(x)
                or not gg.fits(x, w, b)):
            return ref()
        return run_or_fallback("linear_gluon", lambda: gg.linear_gelu(x, w, b), ref)
    cfg = config or gemm_config(n, k, mode)
    ok = (mode in ("ptr", "tma", "pers") and available(x) and x.dtype in _HALF
          and w.dtype == x.dtype and x.is_contiguous() and w.is_contiguous()
          and n % cfg.bn == 0 and k % cfg.bk == 0
          and (b is None or b.dtype == x.dtype)
          and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype
                                    and m % residual.shape[0] == 0)))
    if not ok or m == 0:
        return ref()

    def launch():
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, cfg.bm) * (n // cfg.bn),)
        bias = b if b is not None else w
        res = residual if residual is not None else x
        res_rows = residual.shape[0] if residual is not None else 1
        common = dict(N=n, K=k, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
                      HAS_BIAS=b is not None, EPI=epilogue, num_warps=cfg.warps)
        if mode in ("tma", "pers"):
            from triton.tools.tensor_descriptor import TensorDescriptor
            a_d = TensorDescriptor.from_tensor(x, [cfg.bm, cfg.bk])
            w_d = TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk])
            c_d = TensorDescriptor.from_tensor(out, [cfg.bm, cfg.bn // (2 if mode == "pers"
                                                                       else 1)])
            if mode == "pers":
                sms = _sm_count(x.device)
                _gemm_pers_kernel[(min(sms, grid[0]),)](
                    a_d, w_d, c_d, bias, res, m, res_rows, NUM_SMS=sms,
                    num_stages=cfg.stages, **common)
            else:
                _gemm_tma_kernel[grid](a_d, w_d, c_d, bias, res, m, res_rows,
                                       STAGES=cfg.stages, **common)
        else:
            _gemm_kernel[grid](x, w, out, bias, res, m, res_rows, num_stages=cfg.stages,
                               **common)
        return out
    return run_or_fallback(f"linear_{mode}", launch, ref)
