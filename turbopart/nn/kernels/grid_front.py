"""The geometry decoder's part-independent front for queries on a regular grid, separably.

The decoder's first four steps (spec xpart §3.4) — Fourier features, ``query_proj``,
``ln_1``, ``c_q`` — depend on the query point only.  On the volume decoder's grids every
point is ``(v[i], v[j], v[k])`` for one axis vector ``v`` per level, and every Fourier
column depends on one coordinate only, so the projection is a sum of three per-axis tables:

* ``e[i,j,k] = E₀[i] + E₁[j] + E₂[k]``, ``E_a = F(v)[:, cols_a] · W_qpᵀ[cols_a]`` (the bias in
  ``E₂``);
* with ``C_a = E_a − mean(E_a)`` (so ``e − mean(e) = C₀[i] + C₁[j] + C₂[k]``), the LayerNorm
  variance is ``(‖C₀[i]‖² + ‖C₁[j]‖² + ‖C₂[k]‖² + 2(C₀[i]·C₁[j] + C₀[i]·C₂[k] + C₁[j]·C₂[k])) / W``
  (three S×S Gram tables), and
* ``c_q(ln_1(e)) = rstd · (A₀[i] + A₁[j] + A₂[k]) + c`` with ``A_a = (C_a ⊙ γ) · W_qᵀ`` and
  ``c = W_q β + b_q``.

One memory-bound kernel (:func:`grid_front`) then writes ``e`` (for the residual) and the
queries from L2-resident tables instead of four passes, two of them GEMMs (≈ 12 % of a
decoder query).  The algebra is exact; the rounding points are not the official ones: the
official run rounds ``e`` and ``ln_1(e)`` to bf16 before ``c_q``, this path rounds only
``e`` (which it reproduces up to fp32 summation order) and the queries.  It is the fast
numerics' front (``TURBOPART_DECODER_FRONT=points`` restores the op sequence); ``exact``
never takes it.  Tables are built in float64 from the matmul-dtype weights and stored in fp32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import run_or_fallback
from .decoder_triton import available, fourier_rows_ref

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None


class GridTables(NamedTuple):
    """Per-axis tables of one grid axis ``v`` [S] (see the module docstring): ``e`` and
    ``a`` [3, S, W], ``gram`` [3, S, S] (C₀C₁ᵀ, C₀C₂ᵀ, C₁C₂ᵀ), ``norm`` [3, S], ``c`` [W];
    all fp32.  ``eps``: ln_1's epsilon."""
    e: torch.Tensor
    a: torch.Tensor
    gram: torch.Tensor
    norm: torch.Tensor
    c: torch.Tensor
    eps: float

    @property
    def size(self) -> int:
        return self.e.shape[1]

    @property
    def width(self) -> int:
        return self.e.shape[2]


def column_axes(num_freqs: int, include_input: bool) -> list[int]:
    """The coordinate axis each Fourier column reads: ``[x (3) | sin (3·F, axis-major) |
    cos (3·F)]``."""
    head = [0, 1, 2] if include_input else []
    block = [a for a in range(3) for _ in range(num_freqs)]
    return head + block + block


@torch.no_grad()
def grid_tables(axis: torch.Tensor, frequencies: torch.Tensor, include_input: bool,
                feat_dtype: torch.dtype, query_w: torch.Tensor, query_b: torch.Tensor | None,
                ln_w: torch.Tensor | None, ln_b: torch.Tensor | None, cq_w: torch.Tensor,
                cq_b: torch.Tensor | None, eps: float) -> GridTables:
    """The tables of grid axis ``axis`` [S] (the points' dtype sets the Fourier precision,
    as for points) for the decoder weights given in their matmul dtype (``query_w`` may be
    zero-padded past the Fourier width)."""
    cdt = query_w.dtype
    s = axis.shape[0]
    width = query_w.shape[0]
    pts = axis.reshape(s, 1).expand(s, 3)
    nf = frequencies.numel()
    cols = column_axes(nf, include_input)
    f = fourier_rows_ref(pts, frequencies, include_input, feat_dtype, cdt, query_w.shape[1])
    f, w = f.double(), query_w.double()
    e = torch.zeros(3, s, width, dtype=torch.float64, device=axis.device)
    for a in range(3):
        idx = torch.tensor([c for c, ax in enumerate(cols) if ax == a], device=axis.device)
        e[a] = f.index_select(1, idx) @ w.index_select(1, idx).T
    if query_b is not None:
        e[2] += query_b.double()
    c = e - e.mean(-1, keepdim=True)
    norm = (c * c).sum(-1)
    gram = torch.stack((c[0] @ c[1].T, c[0] @ c[2].T, c[1] @ c[2].T))
    wq = cq_w.double()
    g = c * ln_w.double() if ln_w is not None else c
    a_tab = g @ wq.T
    shift = torch.zeros(width, dtype=torch.float64, device=axis.device)
    if ln_b is not None:
        shift = wq @ ln_b.double()
    if cq_b is not None:
        shift = shift + cq_b.double()
    f32 = torch.float32
    return GridTables(e.to(f32).contiguous(), a_tab.to(f32).contiguous(),
                      gram.to(f32).contiguous(), norm.to(f32).contiguous(),
                      shift.to(f32).contiguous(), float(eps))


def _ijk(lin: torch.Tensor, size: int):
    return lin // (size * size), (lin // size) % size, lin % size


def grid_front_ref(lin: torch.Tensor, t: GridTables, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e, q)`` [N, W] in ``out_dtype`` of the grid vertices with flat indices ``lin``
    [N] (row-major over S³), with PyTorch ops (the kernel's arithmetic, fp32)."""
    i, j, k = _ijk(lin, t.size)
    e = t.e[0][i] + t.e[1][j] + t.e[2][k]
    var = (t.norm[0][i] + t.norm[1][j] + t.norm[2][k]
           + 2.0 * (t.gram[0][i, j] + t.gram[1][i, k] + t.gram[2][j, k]))
    rstd = torch.rsqrt(var.clamp_min(0.0) / t.width + t.eps)
    q = (t.a[0][i] + t.a[1][j] + t.a[2][k]) * rstd[:, None] + t.c
    return e.to(out_dtype), q.to(out_dtype)


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows", "S"])
    def _grid_front_kernel(lin_ptr, e_ptr, a_ptr, g_ptr, n_ptr, c_ptr, eo_ptr, qo_ptr,
                           n_rows, S, inv_w, eps, W: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr):
        """Rows of e = E₀[i] + E₁[j] + E₂[k] and q = rstd·(A₀[i] + A₁[j] + A₂[k]) + c."""
        r = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = r < n_rows
        lin = tl.load(lin_ptr + r, mask=rmask, other=0).to(tl.int64)
        ss = S.to(tl.int64) * S
        i = lin // ss
        j = (lin // S) % S
        k = lin % S
        var = (tl.load(n_ptr + i) + tl.load(n_ptr + S + j) + tl.load(n_ptr + 2 * S + k)
               + 2.0 * (tl.load(g_ptr + i * S + j) + tl.load(g_ptr + ss + i * S + k)
                        + tl.load(g_ptr + 2 * ss + j * S + k)))
        rstd = tl.math.rsqrt(tl.maximum(var, 0.0) * inv_w + eps)
        sw = S.to(tl.int64) * W
        oi = (i * W)[:, None]
        oj = (sw + j * W)[:, None]
        ok = (2 * sw + k * W)[:, None]
        out = (r.to(tl.int64) * W)[:, None]
        m = rmask[:, None]
        for c0 in tl.static_range(0, W, BN):
            c = (c0 + tl.arange(0, BN))[None, :]
            e = tl.load(e_ptr + oi + c) + tl.load(e_ptr + oj + c) + tl.load(e_ptr + ok + c)
            tl.store(eo_ptr + out + c, e.to(eo_ptr.dtype.element_ty), mask=m)
            a = tl.load(a_ptr + oi + c) + tl.load(a_ptr + oj + c) + tl.load(a_ptr + ok + c)
            q = a * rstd[:, None] + tl.load(c_ptr + c)
            tl.store(qo_ptr + out + c, q.to(qo_ptr.dtype.element_ty), mask=m)


def grid_front(lin: torch.Tensor, t: GridTables, out_dtype: torch.dtype,
               use_triton: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grid_front_ref` in one Triton kernel (CUDA, or the interpreter)."""
    n = lin.shape[0]
    w = t.width
    ok = (use_triton and triton is not None and available(lin) and n > 0 and w % 128 == 0
          and out_dtype in (torch.bfloat16, torch.float16))
    if not ok:
        return grid_front_ref(lin, t, out_dtype)

    def launch():
        e = torch.empty(n, w, dtype=out_dtype, device=lin.device)
        q = torch.empty(n, w, dtype=out_dtype, device=lin.device)
        bm, bn = 16, 256 if w % 256 == 0 else 128
        _grid_front_kernel[(triton.cdiv(n, bm),)](
            lin.contiguous(), t.e, t.a, t.gram, t.norm, t.c, e, q, n, t.size, 1.0 / w,
            t.eps, W=w, BM=bm, BN=bn, num_warps=4)
        return e, q
    return run_or_fallback("grid_front", launch, lambda: grid_front_ref(lin, t, out_dtype))
