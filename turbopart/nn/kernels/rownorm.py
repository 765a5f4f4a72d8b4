"""Row-wise fused kernels of the fast DiT step: residual update + LayerNorm(s), head RMSNorm.

The fp32 residual stream of the X-Part DiT (spec xpart §2.9) is updated and normalised by
many small memory-bound PyTorch ops per block: ``h + a`` (fp32), ``layer_norm`` (fp32 in,
fp32 out), ``.to(bf16)``, for each of norm1 / norm2 / norm2_2 / norm3, plus the MoE combine,
the skip concatenation and the time-token concatenation.  :func:`residual_ln` does one such
step in one pass over the rows:

    h = pre_norm(base)                 (optional; LayerNorm of a bf16 GEMM output, fp32 result)
    h = (h + a) + b                    (optional fp32 adds of bf16/fp32 rows, in this order)
    h = h + ((Σ_j w_j · ys[inv[t, j]]) + shared)   (optional MoE combine, fp32)
    out_i = LN_i(h).to(out_i.dtype)    (0–2 LayerNorms of the new h, sharing its statistics)

and writes the new ``h`` (fp32, may overwrite ``base``), optionally a low-precision copy of
it (the skip concatenation's halves) and one extra row copy (a stored skip half).  The
arithmetic is the PyTorch one (fp32 two-pass mean/variance, ``rsqrt(var + eps)``, one
rounding to the output dtype); only fp32 reduction order and FMA contraction differ.

:func:`embed_ln` builds the initial stream ``[time token ; x_embed + part_embed[idx]]`` and its
first LayerNorm without materialising the concatenation.  :func:`rms_heads` is the per-head
q/k RMSNorm (``bf16(x · rsqrt(mean(x²) + eps) · w)``) reading strided head slices (the fused
q/k/v or k/v GEMM output) and writing any strided destination, in place allowed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import HAVE_TRITON, interpreting

if HAVE_TRITON:  # pragma: no branch
    import triton
    import triton.language as tl

    @triton.jit
    def _cvt(y, ptr, EMU: tl.constexpr):
        """``y`` cast to ``ptr``'s element type, rounding to nearest even.  (The Triton
        interpreter truncates fp32 → bf16; ``EMU`` rounds explicitly there.)"""
        if EMU:
            if ptr.dtype.element_ty == tl.bfloat16:
                b = y.to(tl.uint32, bitcast=True)
                b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
                y = b.to(tl.float32, bitcast=True)
        return y.to(ptr.dtype.element_ty)

    @triton.jit
    def _ln_stats(x, mask, D):
        """(x − mean, biased variance) of one row (masked lanes are 0)."""
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        return xc, tl.sum(xc * xc, axis=0) / D

    @triton.jit
    def _ln_apply(xc, var, mask, offs, w_ptr, b_ptr, eps, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr):
        y = xc * tl.rsqrt(var + eps)
        if HAS_W:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return y

    @triton.jit
    def _ln_row(x, mask, offs, D, w_ptr, b_ptr, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        xc, var = _ln_stats(x, mask, D)
        return _ln_apply(xc, var, mask, offs, w_ptr, b_ptr, eps, HAS_W, HAS_B)

    # The on/off switches are runtime arguments (not specialised), so one compiled variant
    # serves most call sites: few compilations on a cold cache.  Row strides stay
    # specialised (multiples of 16 elements give 16-byte vector accesses): callers keep
    # every row stride a multiple of 16.
    _RES_RUNTIME = ["n_add", "write_h", "write_hb", "skip", "n_out", "pad1"]

    @triton.jit(do_not_specialize=_RES_RUNTIME)
    def _residual_ln_kernel(
            base_ptr, base_rs, h_ptr, h_rs,
            a_ptr, a_rs, b_ptr, b_rs,
            ys_ptr, ys_rs, inv_ptr, wt_ptr, s_ptr, s_rs,
            pw_ptr, pb_ptr, peps,
            o1_ptr, o1_rs, w1_ptr, b1_ptr, eps1,
            o2_ptr, o2_rs, w2_ptr, b2_ptr, eps2,
            hb_ptr, hb_rs, sks_ptr, sks_rs, skd_ptr, skd_rs,
            D, n_add, write_h, write_hb, skip, n_out, pad1,
            PRE: tl.constexpr, PRE_W: tl.constexpr, PRE_B: tl.constexpr,
            MOE: tl.constexpr, TOPK: tl.constexpr,
            HAS_W1: tl.constexpr, HAS_B1: tl.constexpr, HAS_W2: tl.constexpr,
            HAS_B2: tl.constexpr, PADB: tl.constexpr, BLOCK: tl.constexpr,
            EMU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        h = tl.load(base_ptr + row * base_rs + offs, mask=mask, other=0.0).to(tl.float32)
        if PRE:
            h = _ln_row(h, mask, offs, D, pw_ptr, pb_ptr, peps, PRE_W, PRE_B)
        if n_add >= 1:
            h = h + tl.load(a_ptr + row * a_rs + offs, mask=mask, other=0.0).to(tl.float32)
        if n_add >= 2:
            h = h + tl.load(b_ptr + row * b_rs + offs, mask=mask, other=0.0).to(tl.float32)
        if MOE:
            y = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(TOPK):
                r = tl.load(inv_ptr + row * TOPK + j).to(tl.int64)
                wj = tl.load(wt_ptr + row * TOPK + j).to(tl.float32)
                yj = tl.load(ys_ptr + r * ys_rs + offs, mask=mask, other=0.0).to(tl.float32)
                y = y + yj * wj
            y = y + tl.load(s_ptr + row * s_rs + offs, mask=mask, other=0.0).to(tl.float32)
            h = h + y
        if write_h != 0:
            tl.store(h_ptr + row * h_rs + offs, h, mask=mask)
        if write_hb != 0:
            tl.store(hb_ptr + row * hb_rs + offs, _cvt(h, hb_ptr, EMU), mask=mask)
        if skip != 0:
            sv = tl.load(sks_ptr + row * sks_rs + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(skd_ptr + row * skd_rs + offs, _cvt(sv, skd_ptr, EMU), mask=mask)
        if n_out >= 1:
            xc, var = _ln_stats(h, mask, D)
            y1 = _ln_apply(xc, var, mask, offs, w1_ptr, b1_ptr, eps1, HAS_W1, HAS_B1)
            tl.store(o1_ptr + row * o1_rs + offs, _cvt(y1, o1_ptr, EMU), mask=mask)
            if pad1 > 0:
                po = tl.arange(0, PADB)
                pv = tl.where(po == 0, 1.0, 0.0)
                tl.store(o1_ptr + row * o1_rs + D + po, _cvt(pv, o1_ptr, EMU),
                         mask=po < pad1)
            if n_out >= 2:
                y2 = _ln_apply(xc, var, mask, offs, w2_ptr, b2_ptr, eps2, HAS_W2, HAS_B2)
                tl.store(o2_ptr + row * o2_rs + offs, _cvt(y2, o2_ptr, EMU), mask=mask)

    @triton.jit
    def _embed_ln_kernel(xe_ptr, xe_ks, xe_rs, c_ptr, c_ks, pe_ptr, pe_rs, idx_ptr,
                         h_ptr, o_ptr, o_rs, w_ptr, b_ptr, eps, L, D,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
                         EMU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        k = row // L
        pos = row % L
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        is_t = pos == 0
        lat = tl.maximum(pos - 1, 0)
        pidx = tl.load(idx_ptr + k).to(tl.int64)
        xv = tl.load(xe_ptr + k * xe_ks + lat * xe_rs + offs, mask=mask & (pos > 0),
                     other=0.0).to(tl.float32)
        pv = tl.load(pe_ptr + pidx * pe_rs + offs, mask=mask & (pos > 0),
                     other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + k * c_ks + offs, mask=mask & is_t, other=0.0).to(tl.float32)
        h = tl.where(is_t, cv, xv + pv)
        tl.store(h_ptr + row * D + offs, h, mask=mask)
        y = _ln_row(h, mask, offs, D, w_ptr, b_ptr, eps, HAS_W, HAS_B)
        tl.store(o_ptr + row * o_rs + offs, _cvt(y, o_ptr, EMU), mask=mask)

    @triton.jit(do_not_specialize=["R"])
    def _rms_heads_kernel(x_ptr, x_rs, x_hs, y_ptr, y_rs, y_hs, w_ptr, eps,
                          x2_ptr, x2_rs, x2_hs, y2_ptr, y2_rs, y2_hs, w2_ptr, eps2,
                          R, HD: tl.constexpr, TWO: tl.constexpr, DOUBLE: tl.constexpr,
                          BR: tl.constexpr, EMU: tl.constexpr):
        pid = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        rows = (pid * BR + tl.arange(0, BR)).to(tl.int64)
        rm = rows < R
        cols = tl.arange(0, HD)
        m2 = rm[:, None]
        x = tl.load(x_ptr + rows[:, None] * x_rs + head * x_hs + cols[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        n = x * tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
        if DOUBLE:
            n = _cvt(n, y_ptr, EMU).to(tl.float32)
        y = n * tl.load(w_ptr + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * y_rs + head * y_hs + cols[None, :],
                 _cvt(y, y_ptr, EMU), mask=m2)
        if TWO:
            x2 = tl.load(x2_ptr + rows[:, None] * x2_rs + head * x2_hs + cols[None, :],
                         mask=m2, other=0.0).to(tl.float32)
            n2 = x2 * tl.rsqrt(tl.sum(x2 * x2, axis=1) / HD + eps2)[:, None]
            if DOUBLE:
                n2 = _cvt(n2, y2_ptr, EMU).to(tl.float32)
            y2 = n2 * tl.load(w2_ptr + cols).to(tl.float32)[None, :]
            tl.store(y2_ptr + rows[:, None] * y2_rs + head * y2_hs + cols[None, :],
                     _cvt(y2, y2_ptr, EMU), mask=m2)

    @triton.jit(do_not_specialize=["R"])
    def _ln_heads_kernel(x_ptr, x_rs, x_hs, y_ptr, y_rs, y_hs, w_ptr, b_ptr, eps, R,
                         HD: tl.constexpr, BR: tl.constexpr, EMU: tl.constexpr):
        """Per-head LayerNorm: BR rows of one head, fp32 two-pass statistics, one rounding."""
        pid = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        rows = (pid * BR + tl.arange(0, BR)).to(tl.int64)
        m2 = (rows < R)[:, None]
        cols = tl.arange(0, HD)
        x = tl.load(x_ptr + rows[:, None] * x_rs + head * x_hs + cols[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        xc = x - (tl.sum(x, axis=1) / HD)[:, None]
        var = tl.sum(xc * xc, axis=1) / HD
        y = xc * tl.rsqrt(var + eps)[:, None]
        y = y * tl.load(w_ptr + cols).to(tl.float32)[None, :]
        y = y + tl.load(b_ptr + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * y_rs + head * y_hs + cols[None, :],
                 _cvt(y, y_ptr, EMU), mask=m2)


LNSpec = tuple  # (weight | None, bias | None, eps)


def _rows(t: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """A [..., d]-row tensor as (2-D view [R, >=d] over its rows, row stride)."""
    if t.stride(-1) != 1:
        raise ValueError("rows must be contiguous along the last dimension")
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    if t2.dim() != 2 or t2.stride(1) != 1:
        raise ValueError("rows must be addressable with one row stride")
    if t.dim() > 2 and t2.data_ptr() != t.data_ptr():
        raise ValueError("rows must be addressable with one row stride (no copy)")
    return t2, t2.stride(0)


#: Most pad columns :func:`residual_ln` writes (the MoE bias column block).
_PADB = 16


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def residual_ln(base: torch.Tensor, *, pre: LNSpec | None = None,
                adds: Sequence[torch.Tensor] = (),
                moe: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                norms: Sequence[tuple[LNSpec, torch.Tensor, int]] = (),
                h_out: torch.Tensor | None = None, hb_out: torch.Tensor | None = None,
                skip_copy: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One fused residual step over the T rows of ``base`` ([..., D]); see the module doc.

    ``pre``: LayerNorm (weight, bias, eps) applied to ``base`` first; ``adds``: up to two
    row tensors; ``moe``: (ys [R, D] expert outputs in sorted order, inv [T·k] position of
    route (t, j) in ys, w [T, k] fp32 route weights, shared [T, D]); ``norms``: up to two
    ((weight, bias, eps), out rows [T, >=D+pad], pad) — ``pad`` > 0 writes the MoE bias
    columns (1 at column D, 0 after); ``h_out``: fp32 rows for the new h (may be ``base``);
    ``hb_out``: rows for a cast copy of the new h; ``skip_copy``: (src rows, dst rows).
    """
    d = base.shape[-1]
    b2, brs = _rows(base, d)
    t = b2.shape[0]
    if len(adds) > 2 or len(norms) > 2:
        raise ValueError("at most two adds and two norms")
    adds2 = [_rows(a, d) for a in adds]
    outs = []
    for (w, b, eps), out, pad in norms:
        o2, ors = _rows(out, out.shape[-1])
        if o2.shape[-1] < d + pad:
            raise ValueError("norm output rows are narrower than D + pad")
        outs.append((o2, ors, w, b, eps, pad))
    hb2 = _rows(hb_out, d) if hb_out is not None else None
    sk = (_rows(skip_copy[0], d), _rows(skip_copy[1], d)) if skip_copy is not None else None
    # Unused pointer slots get a tensor of the dtype the slot has elsewhere, so that one
    # compiled variant serves all call sites (the kernel never touches them).
    cands = [o for o, *_ in outs] + ([hb2[0]] if hb2 else []) + [a for a, _ in adds2] + \
        ([sk[1][0]] if sk else []) + ([moe[0]] if moe is not None else [])
    lp = cands[0] if cands else b2
    adds2 += [(adds2[0][0] if adds2 else lp, 0)] * (2 - len(adds2))
    if moe is not None:
        ys, inv, wt, sh = moe
        ys2, ysrs = _rows(ys, d)
        sh2, shrs = _rows(sh, d)
        topk = wt.shape[-1]
        if not (inv.is_contiguous() and wt.is_contiguous()):
            raise ValueError("MoE route tensors must be contiguous")
    else:
        ys2, ysrs, inv, wt, sh2, shrs, topk = lp, 0, b2, b2, lp, 0, 1
    wdummy = next((x for x in ([pre[0]] if pre else []) + [o[2] for o in outs]
                   if x is not None), b2)
    pw, pb, peps = pre if pre is not None else (None, None, 0.0)
    outs += [((outs[0][0] if outs else lp), 0, None, None, 0.0, 0)] * (2 - len(outs))
    if h_out is not None:
        h2, hrs = _rows(h_out, d)
        if h2.dtype != torch.float32:
            raise ValueError("h_out must be fp32")
    else:
        h2, hrs = (b2 if b2.dtype == torch.float32 else wdummy), 0
    hb2, hbrs = hb2 if hb2 is not None else (lp, 0)
    (sks, sksrs), (skd, skdrs) = sk if sk is not None else ((lp, 0), (lp, 0))
    block = triton.next_power_of_2(d)
    pad1 = outs[0][5]
    if pad1 > _PADB or outs[1][5]:
        raise ValueError(f"at most {_PADB} pad columns, on the first norm output only")

    def w_or(x):
        return wdummy if x is None else x
    _residual_ln_kernel[(t,)](
        b2, brs, h2, hrs,
        adds2[0][0], adds2[0][1], adds2[1][0], adds2[1][1],
        ys2, ysrs, inv, wt, sh2, shrs,
        w_or(pw), w_or(pb), float(peps),
        outs[0][0], outs[0][1], w_or(outs[0][2]), w_or(outs[0][3]), float(outs[0][4]),
        outs[1][0], outs[1][1], w_or(outs[1][2]), w_or(outs[1][3]), float(outs[1][4]),
        hb2, hbrs, sks, sksrs, skd, skdrs,
        d, len(adds), int(h_out is not None), int(hb_out is not None),
        int(skip_copy is not None), len(norms), pad1,
        PRE=pre is not None, PRE_W=pw is not None, PRE_B=pb is not None,
        MOE=moe is not None, TOPK=topk,
        HAS_W1=outs[0][2] is not None or not norms, HAS_B1=outs[0][3] is not None or not norms,
        HAS_W2=outs[1][2] is not None or len(norms) < 2,
        HAS_B2=outs[1][3] is not None or len(norms) < 2,
        PADB=_PADB, BLOCK=block, EMU=interpreting(), num_warps=_warps(block))


def embed_ln(xe: torch.Tensor, c: torch.Tensor, part_embed: torch.Tensor, idx: torch.Tensor,
             norm: LNSpec, h: torch.Tensor, out: torch.Tensor) -> None:
    """``h`` [K, 1+n, D] fp32 = [c ; xe + part_embed[idx]] and ``out`` = LN(h) (cast).

    ``xe`` [K, n, D] (rows contiguous), ``c`` [K or 1, 1, D] time tokens, ``idx`` [K].
    """
    k, n, d = xe.shape
    if xe.stride(-1) != 1 or c.stride(-1) != 1 or part_embed.stride(-1) != 1:
        raise ValueError("embed inputs must be contiguous along D")
    if not (h.is_contiguous() and h.shape == (k, n + 1, d) and h.dtype == torch.float32):
        raise ValueError("h must be a contiguous fp32 [K, 1+n, D] tensor")
    o2, ors = _rows(out, d)
    w, b, eps = norm
    idx = idx.reshape(-1).to(torch.int64).contiguous()
    block = triton.next_power_of_2(d)
    c_ks = 0 if c.shape[0] == 1 else c.stride(0)
    _embed_ln_kernel[(k * (n + 1),)](
        xe, xe.stride(0), xe.stride(1), c, c_ks, part_embed, part_embed.stride(0), idx,
        h, o2, ors, w if w is not None else h, b if b is not None else h, float(eps),
        n + 1, d, HAS_W=w is not None, HAS_B=b is not None, BLOCK=block,
        EMU=interpreting(), num_warps=_warps(block))


def _heads(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A [R, H, hd] head view: (view, row stride, head stride)."""
    if t.dim() != 3 or t.stride(-1) != 1:
        raise ValueError("expected a [rows, heads, head_dim] view contiguous along head_dim")
    return t, t.stride(0), t.stride(1)


def _head_launch(x: torch.Tensor) -> tuple[int, int, tuple[int, int]]:
    """(head_dim, rows per program, grid) of a per-head kernel over ``x`` [R, H, hd]."""
    hd = x.shape[-1]
    if hd & (hd - 1):
        raise ValueError("head_dim must be a power of two")
    br = max(1, min(64, 4096 // hd))
    return hd, br, (triton.cdiv(x.shape[0], br), x.shape[1])


def rms_heads(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor, *,
              x2: torch.Tensor | None = None, w2: torch.Tensor | None = None,
              eps2: float | None = None, out2: torch.Tensor | None = None,
              double: bool = False) -> None:
    """Per-head RMSNorm of ``x`` [R, H, hd] into ``out`` (same shape; may alias ``x``).

    ``out = cast(x · rsqrt(mean(x²) + eps) · w)`` in fp32 with one rounding (``double``:
    round the normalised value first, PyTorch 2.4–2.6).  ``x2``/``out2`` (optional): a
    second tensor of the same shape normalised in the same launch (q and k).
    """
    hd, br, grid = _head_launch(x)
    x3, xrs, xhs = _heads(x)
    y3, yrs, yhs = _heads(out)
    two = x2 is not None
    if two:
        x23, x2rs, x2hs = _heads(x2)
        y23, y2rs, y2hs = _heads(out2)
    else:
        x23, x2rs, x2hs, y23, y2rs, y2hs = x3, 0, 0, y3, 0, 0
    _rms_heads_kernel[grid](
        x3, xrs, xhs, y3, yrs, yhs, w, float(eps),
        x23, x2rs, x2hs, y23, y2rs, y2hs, w2 if w2 is not None else w,
        float(eps if eps2 is None else eps2),
        x3.shape[0], HD=hd, TWO=two, DOUBLE=bool(double), BR=br, EMU=interpreting(),
        num_warps=4)


def ln_heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
             out: torch.Tensor) -> None:
    """Per-head LayerNorm (with weight and bias) of ``x`` [R, H, hd] into ``out`` (same
    shape, any dtype; may alias ``x``): ``cast(LN_fp32(x))``, the VAE's q_norm / k_norm
    under autocast (fp32 LayerNorm, fp32 result, then ``.to(bf16)``) in one pass over a
    strided head view (e.g. the k half of a fused k/v GEMM output)."""
    hd, br, grid = _head_launch(x)
    x3, xrs, xhs = _heads(x)
    y3, yrs, yhs = _heads(out)
    _ln_heads_kernel[grid](
        x3, xrs, xhs, y3, yrs, yhs, w, b, float(eps), x3.shape[0], HD=hd, BR=br,
        EMU=interpreting(), num_warps=4)
