"""Kernel lab for the geometry decoder's two non-GEMM-bound costs (GPU only, ~3 min).

1. c_fc + exact GELU: cuBLAS + the separate GELU pass against persistent TMA Triton GEMMs
   with the GELU in the epilogue (epilogue sub-tiling, flattened tile loop, warp
   specialisation where the Triton build takes it), and against the product's kernel.
2. Cross-attention (q_norm fused, T = 1024 keys, d = 64): the product's kernel against
   variants: TMA loads of K/V, warp-specialised loop, two half-blocks with the second
   half's exp2 on the FMA units (polynomial) instead of the special-function unit.

Every variant is checked against the product's reference (bf16 ulps) before it is timed.
Prints a table; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbopart.nn.kernels import decoder_triton as kern  # noqa: E402

# --------------------------------------------------------------------------- GEMM


@triton.jit
def _pid_of(tile_id, num_pid_m, num_pid_n: tl.constexpr, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    first_m = (tile_id // in_group) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % in_group) % gsize
    pid_n = (tile_id % in_group) // gsize
    return pid_m, pid_n


@triton.jit
def _gelu_epi(acc, bias_ptr, on, BNS: tl.constexpr, out_dtype: tl.constexpr,
              GELU: tl.constexpr):
    acc = acc + tl.load(bias_ptr + on + tl.arange(0, BNS)).to(tl.float32)[None, :]
    out = acc.to(out_dtype)
    if GELU == 1:
        xg = out.to(tl.float32)
        out = (xg * 0.5 * (1.0 + tl.erf(xg * 0.7071067811865476))).to(out_dtype)
    if GELU == 2:  # cost floor: a trivial polynomial in place of erf
        xg = out.to(tl.float32)
        out = (xg * 0.5 * (1.0 + xg * 0.125)).to(out_dtype)
    if GELU == 3:  # Abramowitz-Stegun 7.1.26 erf (|err| < 1.5e-7), approximate rcp and exp2
        xg = out.to(tl.float32)
        z = xg * 0.7071067811865476
        az = tl.abs(z)
        t = tl.fdiv(1.0, 1.0 + 0.3275911 * az, ieee_rounding=False)
        poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
                + 0.254829592) * t
        e = 1.0 - poly * tl.math.exp2(-(az * az) * 1.4426950408889634)
        erf = tl.where(z < 0, -e, e)
        out = (xg * 0.5 * (1.0 + erf)).to(out_dtype)
    return out


@triton.jit(do_not_specialize=["M"])
def gemm_persistent(a_desc, w_desc, c_desc, bias_ptr, M, N: tl.constexpr, K: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, GELU: tl.constexpr,
                    SUB: tl.constexpr, WS: tl.constexpr, FLAT: tl.constexpr):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n: tl.constexpr = N // BN
    num_tiles = num_pid_m * num_pid_n
    k_tiles: tl.constexpr = K // BK
    tile_c = start - NUM_SMS
    out_dtype: tl.constexpr = c_desc.dtype
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLAT, warp_specialize=WS):
        pid_m, pid_n = _pid_of(tile_id, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([om, ki * BK])
            w = w_desc.load([on, ki * BK])
            acc = tl.dot(a, w.T, acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _pid_of(tile_c, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        if SUB:
            acc = tl.reshape(acc, (BM, 2, BN // 2))
            acc = tl.permute(acc, (0, 2, 1))
            a0, a1 = tl.split(acc)
            c_desc.store([om, on], _gelu_epi(a0, bias_ptr, on, BN // 2, out_dtype, GELU))
            c_desc.store([om, on + BN // 2],
                         _gelu_epi(a1, bias_ptr, on + BN // 2, BN // 2, out_dtype, GELU))
        else:
            c_desc.store([om, on], _gelu_epi(acc, bias_ptr, on, BN, out_dtype, GELU))


def gemm_launch(x, w, b, cfg, gelu=1):
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, bk, gm, warps, stages, sub, ws, flat = cfg
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    a_d = TensorDescriptor.from_tensor(x, [bm, bk])
    w_d = TensorDescriptor.from_tensor(w, [bn, bk])
    c_d = TensorDescriptor.from_tensor(out, [bm, bn // 2 if sub else bn])
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = triton.cdiv(m, bm) * (n // bn)
    grid = (min(sms, tiles),)
    gemm_persistent[grid](a_d, w_d, c_d, b, m, N=n, K=k, BM=bm, BN=bn, BK=bk, GROUP_M=gm,
                          NUM_SMS=sms, GELU=gelu, SUB=sub, WS=ws, FLAT=flat,
                          num_warps=warps, num_stages=stages)
    return out


# --------------------------------------------------------------------------- attention

def _exp2_poly_coeffs(deg: int = 5) -> list[float]:
    """Least-squares (Chebyshev nodes) fit of 2^f on [-0.5, 0.5] in float64."""
    xs = np.cos(np.pi * (np.arange(2000) + 0.5) / 2000) * 0.5
    c = np.polynomial.polynomial.polyfit(xs, np.exp2(xs), deg, w=1 / np.exp2(xs))
    return [float(v) for v in c]


_C = _exp2_poly_coeffs(5)


@triton.jit
def _exp2_fma(x, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
              C4: tl.constexpr, C5: tl.constexpr):
    """2^x on the FMA units: round-to-nearest by the 1.5·2^23 trick, degree-5 polynomial
    on [-0.5, 0.5], exponent added in the integer domain (x ≥ -126 assumed; clamped)."""
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0
    j = t.to(tl.int32, bitcast=True)
    f = x - (t - 12582912.0)
    p = C5 * f + C4
    p = p * f + C3
    p = p * f + C2
    p = p * f + C1
    p = p * f + C0
    return (p.to(tl.int32, bitcast=True) + (j << 23)).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["n_q"])
def attn_lab(q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, qw_ptr, qb_ptr, n_q,
             stride_qb, stride_qm, stride_kb, stride_kh, stride_vb, stride_vh,
             stride_ob, stride_om, qk_scale, eps,
             H: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, POLY: tl.constexpr,
             C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
             C4: tl.constexpr, C5: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < n_q
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, D)
    q = kern._q_tile(q_ptr + b * stride_qb + h * D, qw_ptr, qb_ptr, rows64, rmask, d, stride_qm,
                     eps, D, True, k_ptr.dtype.element_ty)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    kbase = k_ptr + b * stride_kb + h * stride_kh
    vbase = v_ptr + b * stride_vb + h * stride_vh
    row0 = pid_bh * T
    if POLY:
        HB: tl.constexpr = BN // 2
        n = tl.arange(0, HB)
        for start in tl.range(0, T, BN, warp_specialize=WS):
            k1 = tl.load(kbase + (start + n)[:, None] * D + d[None, :])
            k2 = tl.load(kbase + (start + HB + n)[:, None] * D + d[None, :])
            s1 = tl.dot(q, tl.trans(k1))
            s2 = tl.dot(q, tl.trans(k2))
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s1, 1), tl.max(s2, 1)) * qk_scale)
            p1 = tl.math.exp2(s1 * qk_scale - m_new[:, None])
            p2 = _exp2_fma(s2 * qk_scale - m_new[:, None], C0, C1, C2, C3, C4, C5)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + (tl.sum(p1, 1) + tl.sum(p2, 1))
            v1 = tl.load(vbase + (start + n)[:, None] * D + d[None, :])
            v2 = tl.load(vbase + (start + HB + n)[:, None] * D + d[None, :])
            acc = tl.dot(p1.to(v1.dtype), v1, acc * alpha[:, None])
            acc = tl.dot(p2.to(v2.dtype), v2, acc)
            m_i = m_new
    else:
        n = tl.arange(0, BN)
        for start in tl.range(0, T, BN, warp_specialize=WS):
            if TMA:
                kt = k_desc.load([row0 + start, 0])
            else:
                kt = tl.load(kbase + (start + n)[:, None] * D + d[None, :])
            s = tl.dot(q, tl.trans(kt))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA:
                vt = v_desc.load([row0 + start, 0])
            else:
                vt = tl.load(vbase + (start + n)[:, None] * D + d[None, :])
            acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + rows64[:, None] * stride_om + h * D + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def attn_launch(q, k, v, qn_w, qn_b, eps, n_q, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, warps, stages, tma, ws, poly = cfg
    bsz, h, t, d = k.shape
    out = torch.empty(bsz * n_q, h * d, dtype=q.dtype, device=q.device)
    shared = q.shape[0] == n_q and bsz > 1
    k_d = TensorDescriptor.from_tensor(k.view(-1, d), [bn, d])
    v_d = TensorDescriptor.from_tensor(v.view(-1, d), [bn, d])
    qk_scale = (1.0 / math.sqrt(d)) * 1.4426950408889634
    grid = (triton.cdiv(n_q, bm), bsz * h)
    attn_lab[grid](q, k, v, k_d, v_d, out, qn_w, qn_b, n_q,
                   0 if shared else n_q * h * d, h * d, k.stride(0), k.stride(1), v.stride(0),
                   v.stride(1), n_q * h * d, h * d, qk_scale, float(eps),
                   H=h, T=t, D=d, BM=bm, BN=bn, TMA=tma, WS=ws, POLY=poly,
                   C0=_C[0], C1=_C[1], C2=_C[2], C3=_C[3], C4=_C[4], C5=_C[5],
                   num_warps=warps, num_stages=stages)
    return out


# --------------------------------------------------------------------------- harness

def ulps(out: torch.Tensor, ref: torch.Tensor) -> dict:
    def ordered(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)
    du = (ordered(out) - ordered(ref)).abs()
    return {"max_ulps": int(du.max()), "frac_differ": float((du > 0).float().mean()),
            "frac_over_2ulp": float((du > 2).float().mean())}


def bench(fn, rep=200) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=109224)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="gemm,attn")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    W, Hd, T, D = 1024, 16, 1024, 64
    rows = args.rows
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "triton": triton.__version__, "rows": rows, "commit": os.environ.get(
                  "TURBOPART_COMMIT", ""), "gemm": {}, "attn": {}, "errors": {}}
    table = []
    try:
        run_all(args, dev, report, table, W, Hd, T, D, rows)
    except Exception:  # noqa: BLE001
        report["errors"]["harness"] = traceback.format_exc()[-2000:]
        print(report["errors"]["harness"])
    finish(args, report, table)
    return 0


def run_all(args, dev, report, table, W, Hd, T, D, rows):
    if "gemm" in args.only:
        x = (torch.randn(rows, W, device=dev) * 1.0).bfloat16()
        w = (torch.randn(4 * W, W, device=dev) * 0.03).bfloat16()
        b = (torch.randn(4 * W, device=dev) * 0.1).bfloat16()
        ref = F.gelu(F.linear(x, w, b))
        flop = 2 * rows * W * 4 * W
        t_lin = bench(lambda: F.linear(x, w, b))
        t_both = bench(lambda: F.gelu(F.linear(x, w, b)))
        report["gemm"]["cublas linear"] = t_lin
        report["gemm"]["cublas linear + gelu"] = t_both
        table.append(("c_fc cublas", t_lin, flop / t_lin / 1e9, ""))
        table.append(("c_fc cublas + gelu", t_both, flop / t_both / 1e9, ""))
        t_prod = bench(lambda: kern.linear(x, w, b, kern.EPI_GELU, mode="ptr"))
        table.append(("c_fc+gelu product ptr", t_prod, flop / t_prod / 1e9, ""))
        for st in (3, 4):
            cfg = kern.GemmConfig(128, 256, 64, 8, 8, st)
            o = kern.linear(x, w, b, kern.EPI_GELU, mode="pers", config=cfg)
            u = ulps(o, ref)
            t_p = bench(lambda: kern.linear(x, w, b, kern.EPI_GELU, mode="pers", config=cfg))
            table.append((f"c_fc+gelu product pers st{st}", t_p, flop / t_p / 1e9,
                          f"ulps {u['max_ulps']} {u['frac_differ']:.1e} >2 "
                          f"{u['frac_over_2ulp']:.1e} {list(kern.disabled())}"))
            report["gemm"][f"product pers st{st}"] = {"ms": t_p, **u}
        cfgs = []
        for bm, bn, bk, warps, stages in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4)]:
            for sub in (False, True):
                for ws, flat in ((False, True), (True, False)):
                    cfgs.append((bm, bn, bk, 8, warps, stages, sub, ws, flat))
        for cfg in cfgs if "gemmlab" in args.only else []:
            name = "pers " + ",".join(str(int(c) if isinstance(c, bool) else c) for c in cfg)
            try:
                out = gemm_launch(x, w, b, cfg)
                torch.cuda.synchronize()
                u = ulps(out, ref)
                t = bench(lambda: gemm_launch(x, w, b, cfg))
                tn = bench(lambda: gemm_launch(x, w, b, cfg, gelu=0))
                tt = bench(lambda: gemm_launch(x, w, b, cfg, gelu=2))
                o3 = gemm_launch(x, w, b, cfg, gelu=3)
                u3 = ulps(o3, ref)
                t3 = bench(lambda: gemm_launch(x, w, b, cfg, gelu=3))
                report["gemm"][name] = {"ms": t, "ms_no_gelu": tn, "ms_trivial": tt,
                                        "ms_as": t3, "as_ulps": u3, **u}
                table.append((name, t, flop / t / 1e9,
                              f"none {tn:.3f} triv {tt:.3f} A&S {t3:.3f} ulps {u['max_ulps']} "
                              f"{u['frac_differ']:.1e} A&S {u3['max_ulps']} {u3['frac_differ']:.1e}"
                              f" >2 {u3['frac_over_2ulp']:.1e}"))
            except Exception as exc:  # noqa: BLE001
                report["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                table.append((name, float("nan"), 0, "ERR " + str(exc)[:60].replace("\n", " ")))
        del x, w, b, ref
    if "front" in args.only:
        front_lab(args, dev, report, table, W, rows)
    if "decoder" in args.only:
        decoder_lab(args, dev, report, table)
    if "overlap" in args.only:
        overlap(args, dev, report, table, W, Hd, T, D, rows)
    if "attn" in args.only:
        p = args.parts
        q, k, v, qn_w, qn_b, nq = attention_inputs(args, dev, W, Hd, T, D, rows)
        eps = 1e-6
        ref = kern.attention(q, k, v, qn_w, qn_b, eps, nq)
        flop = 4 * p * nq * Hd * T * D
        t0 = bench(lambda: kern.attention(q, k, v, qn_w, qn_b, eps, nq))
        report["attn"]["product"] = t0
        table.append(("attn product", t0, flop / t0 / 1e9, ""))
        sd = kern.attention_ref(q, k, v, qn_w, qn_b, eps, nq)
        report["attn"]["ulps product vs sdpa"] = ulps(ref, sd)
        cfgs = []
        for bm, bn, warps, stages in [(128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3),
                                      (64, 64, 4, 4)]:
            for tma, ws, poly in ((False, False, False), (True, False, False),
                                  (False, True, False), (True, True, False),
                                  (False, False, True)):
                cfgs.append((bm, bn, warps, stages, tma, ws, poly))
        for cfg in cfgs:
            name = "attn " + ",".join(str(int(c) if isinstance(c, bool) else c) for c in cfg)
            try:
                out = attn_launch(q, k, v, qn_w, qn_b, eps, nq, cfg)
                torch.cuda.synchronize()
                u = ulps(out, ref)
                us = ulps(out, sd)
                t = bench(lambda: attn_launch(q, k, v, qn_w, qn_b, eps, nq, cfg))
                report["attn"][name] = {"ms": t, "vs_product": u, "vs_sdpa": us}
                table.append((name, t, flop / t / 1e9,
                              f"ulps {u['max_ulps']} >2:{u['frac_over_2ulp']:.1e} "
                              f"sdpa>2:{us['frac_over_2ulp']:.1e}"))
            except Exception as exc:  # noqa: BLE001
                report["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                table.append((name, float("nan"), 0, "ERR " + str(exc)[:60].replace("\n", " ")))


def decoder_lab(args, dev, report, table):
    """The product's query path (full-size realistic decoder, 8 parts) with each GEMM mode:
    M queries/s for the coarse (shared fp16 grid) and fine (per-part fp64) layouts, logits
    against the cuBLAS mode and the eager (official op sequence) path in bf16 ulps."""
    import time
    sys.path.insert(0, str(REPO / "benchmarks"))
    from decoder_variants import build_vae, set_variant
    from turbopart.xpart.vae import FusedOptions
    vae = build_vae(dev, False)
    geo = vae.geo_decoder
    k = args.parts
    g = torch.Generator(device=dev).manual_seed(0)
    lat = torch.randn(k, vae.num_latents, vae.embed_dim, generator=g, device=dev)
    kv = geo.precompute_kv(vae.decode(1.0 / vae.scale_factor * lat))
    per_part = (1 << 22) // k
    layouts = {
        "coarse": (torch.rand(1, per_part, 3, generator=g, device=dev) * 2.02 - 1.01).half(),
        "fine": torch.rand(k, per_part, 3, generator=g, device=dev, dtype=torch.float64)
        * 2.02 - 1.01}
    variants = [("eager", "eager", None), ("cublas", "fused", FusedOptions("triton", "cublas")),
                ("cublas old-front", "fused", FusedOptions("triton", "cublas")),
                ("gelu_pers", "fused", FusedOptions("triton", "gelu_pers"))]
    refs: dict = {}
    report["decoder"] = {}
    real_front = kern.fourier_rows

    def previous_front(pts, fr, include_input, fdt, odt, width, use_triton=True):
        return kern.fourier_rows_ref(pts, fr, include_input, fdt, odt, width)
    for name, kernel, opts in variants:
        set_variant(geo, kernel, opts)
        kern.fourier_rows = previous_front if "old-front" in name else real_front
        for lname, pts in layouts.items():
            out = geo.query(pts, kv)
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                out = geo.query(pts, kv)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            med = sorted(times)[2]
            mq = k * per_part / med / 1e6
            refs.setdefault((lname, name), out)
            note = ""
            for rname in ("eager", "cublas old-front"):
                if rname != name and (lname, rname) in refs:
                    u = ulps(out, refs[(lname, rname)])
                    note += f" vs {rname}: {u['max_ulps']}u >2 {u['frac_over_2ulp']:.1e}"
            report["decoder"][f"{name} {lname}"] = {"mq_s": mq, "s": med, "note": note,
                                                    "disabled": kern.disabled()}
            table.append((f"decoder {name} {lname}", med * 1e3, mq * 25.3e-3,
                          f"{mq:.2f} M q/s{note} {list(kern.disabled())}"))


def front_lab(args, dev, report, table, W, rows):
    """The query points' Fourier features (cast, padded): the kernel against the op sequence
    (must be bitwise equal), then with query_proj and ln_1 as in the fused path."""
    from turbopart.nn.fourier import fourier_frequencies
    fr = fourier_frequencies(8, False, device=dev)
    qw = torch.zeros(W, 56, device=dev, dtype=torch.bfloat16)
    qw[:, :51] = (torch.randn(W, 51, device=dev) * 0.3).bfloat16()
    qb = (torch.randn(W, device=dev) * 0.1).bfloat16()
    lw = 1 + 0.1 * torch.randn(W, device=dev)
    lb = 0.1 * torch.randn(W, device=dev)
    g = torch.Generator(device=dev).manual_seed(3)
    sets = {"fine fp64": torch.rand(rows, 3, generator=g, device=dev,
                                    dtype=torch.float64) * 2.02 - 1.01,
            "coarse fp16": (torch.rand(rows, 3, generator=g, device=dev)
                            * 2.02 - 1.01).half()}
    report["front"] = {}
    for name, pts in sets.items():
        for fdt in (torch.float32, torch.bfloat16):
            f0 = kern.fourier_rows_ref(pts, fr, True, fdt, torch.bfloat16, 56)
            f1 = kern.fourier_rows(pts, fr, True, fdt, torch.bfloat16, 56)
            u = ulps(f1, f0)
            t0 = bench(lambda: kern.fourier_rows_ref(pts, fr, True, fdt, torch.bfloat16, 56))
            t1 = bench(lambda: kern.fourier_rows(pts, fr, True, fdt, torch.bfloat16, 56))

            def whole(fn):
                e = F.linear(fn(pts, fr, True, fdt, torch.bfloat16, 56), qw, qb)
                return kern.layer_norm(e, lw, lb, 1e-6)
            w0 = bench(lambda: whole(kern.fourier_rows_ref))
            w1 = bench(lambda: whole(kern.fourier_rows))
            key = f"fourier {name} feat={str(fdt)[6:]}"
            report["front"][key] = {"ref_ms": t0, "kernel_ms": t1, "front_ref_ms": w0,
                                    "front_kernel_ms": w1, "ulps": u,
                                    "equal": bool(torch.equal(f0, f1)),
                                    "disabled": kern.disabled()}
            table.append((key, t1, 0, f"ref {t0:.3f}  front {w1:.3f} vs {w0:.3f}  equal "
                          f"{torch.equal(f0, f1)} {u['max_ulps']}u {u['frac_differ']:.1e} "
                          f"{list(kern.disabled())}"))


def attention_inputs(args, dev, W, Hd, T, D, rows):
    """Random queries [parts·nq, W], keys/values [parts, Hd, T, D] and q_norm weights."""
    p = args.parts
    nq = rows // p
    q = torch.randn(p * nq, W, device=dev).bfloat16()
    k = torch.randn(p, Hd, T, D, device=dev).bfloat16()
    v = torch.randn(p, Hd, T, D, device=dev).bfloat16()
    return q, k, v, 1 + 0.1 * torch.randn(D, device=dev), 0.1 * torch.randn(D, device=dev), nq


def overlap(args, dev, report, table, W, Hd, T, D, rows):
    """Pairs of decoder kernels on two streams at once against one after the other."""
    q, k, v, qn_w, qn_b, nq = attention_inputs(args, dev, W, Hd, T, D, rows)
    hid = torch.randn(rows, 4 * W, device=dev).bfloat16()
    x = torch.randn(rows, W, device=dev).bfloat16()
    y = torch.randn(rows, W, device=dev).bfloat16()
    lw = 1 + 0.1 * torch.randn(W, device=dev)
    lb = 0.1 * torch.randn(W, device=dev)
    wf = (torch.randn(4 * W, W, device=dev) * 0.03).bfloat16()
    wf2 = (torch.randn(W, 4 * W, device=dev) * 0.03).bfloat16()
    bf = torch.zeros(4 * W, device=dev).bfloat16()
    bw = torch.zeros(W, device=dev).bfloat16()
    ops = {
        "attn": lambda: kern.attention(q, k, v, qn_w, qn_b, 1e-6, nq),
        "gelu": lambda: F.gelu(hid),
        "add_ln3": lambda: kern.add_layer_norm(x, y, lw, lb, 1e-6),
        "ln_post_out": lambda: kern.add_ln_dot(x, y, lw, lb, 1e-5, bw.view(1, -1), bw[:1]),
        "c_fc": lambda: F.linear(x, wf, bf),
        "c_fc2": lambda: F.linear(hid, wf2, bw),
    }
    s1 = torch.cuda.Stream()
    s2 = torch.cuda.Stream()
    alone = {n: bench(f) for n, f in ops.items()}
    for n, t in alone.items():
        table.append((f"alone {n}", t, 0, ""))
    report["overlap"] = {"alone": alone}
    for a, b in [("attn", "gelu"), ("attn", "add_ln3"), ("attn", "ln_post_out"),
                 ("attn", "c_fc"), ("c_fc2", "gelu"), ("c_fc", "add_ln3")]:
        def pair():
            cur = torch.cuda.current_stream()
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            with torch.cuda.stream(s1):
                ops[a]()
            with torch.cuda.stream(s2):
                ops[b]()
            cur.wait_stream(s1)
            cur.wait_stream(s2)
        t = bench(pair)
        report["overlap"][f"{a}|{b}"] = t
        table.append((f"concurrent {a} | {b}", t, 0,
                      f"sum alone {alone[a] + alone[b]:.3f}, saved {alone[a] + alone[b] - t:.3f}"))


def finish(args, report, table):
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{'variant':44s} {'ms':>8s} {'TFLOP/s':>8s}  note")
    for name, t, tf, note in table:
        print(f"{name:44s} {t:8.3f} {tf / 1e3:8.1f}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
