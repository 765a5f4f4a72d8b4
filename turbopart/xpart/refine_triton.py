"""Triton kernels of the hierarchical decoder's refinement step (spec xpart §3.5).

Between two levels the official decoder marks the coarse vertices near the surface
(:func:`turbopart.xpart.decoding.near_surface_mark`), optionally dilates the mark, spreads
it to the fine grid (:func:`turbopart.xpart.decoding.fine_index`) and counts the fine
queries per plane.  As PyTorch ops this is some forty passes over grids of up to 513³ (the
strided byte writes of the upsampling are the slow part): 4–5 ms per part at octree 512,
≈ 3 % of an 8-part decode.  Here it is two kernels, each one pass:

* :func:`mark` — the near-surface mark of one fp16 grid ``[D, D, D]``, one program per
  (i, j) row reading the row and its four neighbour rows (same boolean logic as
  ``near_surface_mark``: signs of ``fp16(G + level)`` compared between valid 6-neighbours,
  or ``|G| < band``);
* :func:`spread` — the fine index ``[F, F, F]`` (fine vertex f takes the OR of the coarse
  marks at ``f // 2`` and ``(f + 1) // 2`` along every axis, which is ``fine_index``'s
  upsampling) and the number of set vertices per first-axis plane (atomic adds).

:func:`refine_index` chains them (with ``dilate3`` in between where the ladder dilates) and
falls back to the PyTorch ops where Triton cannot run; the result is the same boolean
tensor either way.  ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (tests).
"""
from __future__ import annotations

import torch

from . import decoding as dec
from ..nn.kernels import decoder_triton as kern
from ..nn.kernels import run_or_fallback

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _valid_sign(raw, level, invalid_test):
        """Validity and sign (−1, 0, 1) of ``fp16(fp32(G) + level)``, as the official ops."""
        val = (raw.to(tl.float32) + level).to(tl.float16).to(tl.float32)
        return val > invalid_test, (val > 0).to(tl.int32) - (val < 0).to(tl.int32)

    @triton.jit
    def _edge(g_ptr, base, k, kmask, there, vp, sp, level, invalid_test):
        """Vertices whose neighbour row at ``base`` (column ``k``; ``there``: it exists)
        is valid with a different sign (a valid centre ``vp`` / ``sp`` assumed)."""
        raw = tl.load(g_ptr + base + k, mask=kmask & there, other=0.0)
        vq, sq = _valid_sign(raw, level, invalid_test)
        return vp & vq & there & (sp != sq)

    #: a part's grid is a slice of the all-parts coarse grid, at any byte offset
    @triton.jit(do_not_specialize=["d"], **kern.no_align("g_ptr"))
    def _mark_kernel(g_ptr, m_ptr, d, level, band, invalid_test, BLOCK: tl.constexpr):
        row = tl.program_id(0)                    # i · D + j
        i = row // d
        j = row % d
        k = tl.arange(0, BLOCK)
        km = k < d
        base = row.to(tl.int64) * d
        raw = tl.load(g_ptr + base + k, mask=km, other=0.0)
        vp, sp = _valid_sign(raw, level, invalid_test)
        mark = tl.abs(raw.to(tl.float32)) < band
        dd = d.to(tl.int64) * d
        mark |= _edge(g_ptr, base - dd, k, km, i > 0, vp, sp, level, invalid_test)
        mark |= _edge(g_ptr, base + dd, k, km, i < d - 1, vp, sp, level, invalid_test)
        mark |= _edge(g_ptr, base - d, k, km, j > 0, vp, sp, level, invalid_test)
        mark |= _edge(g_ptr, base + d, k, km, j < d - 1, vp, sp, level, invalid_test)
        mark |= _edge(g_ptr, base, k - 1, km, k > 0, vp, sp, level, invalid_test)
        mark |= _edge(g_ptr, base, k + 1, km, k < d - 1, vp, sp, level, invalid_test)
        tl.store(m_ptr + base + k, mark.to(tl.uint8), mask=km)

    @triton.jit
    def _coarse_pair(f, c):
        """The two coarse indices a fine index takes its mark from."""
        return f // 2, tl.minimum((f + 1) // 2, c - 1)

    @triton.jit
    def _rows_or(m_ptr, r0, r1, r2, r3, col, m):
        """OR (as a uint8 max) of four coarse mark rows at columns ``col``."""
        x = tl.maximum(tl.load(m_ptr + r0 + col, mask=m, other=0),
                       tl.load(m_ptr + r1 + col, mask=m, other=0))
        x = tl.maximum(x, tl.load(m_ptr + r2 + col, mask=m, other=0))
        return tl.maximum(x, tl.load(m_ptr + r3 + col, mask=m, other=0))

    @triton.jit(do_not_specialize=["c", "f"])
    def _spread_kernel(m_ptr, o_ptr, cnt_ptr, c, f, ROWS: tl.constexpr, CB: tl.constexpr):
        """ROWS fine rows (a, b…) of the fine index: the OR of the four coarse rows of
        (a, b) gives the even fine columns (2i ← i); the odd ones (2i + 1) also take coarse
        column i + 1; both interleaved, stored contiguously and counted for plane a."""
        pid = tl.program_id(0)
        per = tl.cdiv(f, ROWS)
        a = pid // per
        b = (pid % per) * ROWS + tl.arange(0, ROWS)
        bm = b < f
        a0, a1 = _coarse_pair(a, c)
        b0, b1 = _coarse_pair(b, c)
        cc = c.to(tl.int64) * c
        r0 = (a0 * cc + b0.to(tl.int64) * c)[:, None]
        r1 = (a0 * cc + b1.to(tl.int64) * c)[:, None]
        r2 = (a1 * cc + b0.to(tl.int64) * c)[:, None]
        r3 = (a1 * cc + b1.to(tl.int64) * c)[:, None]
        i = tl.arange(0, CB)
        m = bm[:, None] & (i < c)[None, :]
        even = _rows_or(m_ptr, r0, r1, r2, r3, i[None, :], m)
        odd = tl.maximum(even, _rows_or(m_ptr, r0, r1, r2, r3,
                                        tl.minimum(i + 1, c - 1)[None, :], m))
        hit = tl.interleave(even, odd)                        # [ROWS, 2·CB]
        z = tl.arange(0, 2 * CB)
        keep = bm[:, None] & (z < f)[None, :]
        row = (a.to(tl.int64) * f + b.to(tl.int64)) * f
        tl.store(o_ptr + row[:, None] + z[None, :], hit, mask=keep)
        tl.atomic_add(cnt_ptr + a, tl.sum(tl.sum(tl.where(keep, hit, 0).to(tl.int32), 1), 0))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _spread_tiles(c: int) -> tuple[int, int]:
    """(ROWS, CB) of :func:`spread` for a coarse size ``c``."""
    cb = _block(c)
    return max(1, min(8, 4096 // (2 * cb))), cb


def warm_up(device: torch.device | str, coarse_sizes=(129, 257)) -> None:
    """Compile the kernels for grids of ``coarse_sizes`` (the default ladder at octree 512:
    129³ → 257³ → 513³) and run them once on zero grids, so that neither a compile nor a
    first launch lands inside a decode: Triton builds a kernel's host launcher on its
    first launch (a C compile when its cache is empty, ≈0.5 s inside the first decode of
    a fresh machine when the kernels were only compiled)."""
    if triton is None:
        return
    for c in coarse_sizes:
        grid = torch.zeros((c, c, c), dtype=torch.float16, device=device)
        spread(mark(grid, 2 * (c - 1), 0.0), 2 * c - 1)


def mark(grid: torch.Tensor, resolution: int, level: float) -> torch.Tensor:
    """``near_surface_mark(grid[None], resolution, level)[0]`` for one contiguous fp16 grid
    ``[D, D, D]`` (Triton)."""
    d = grid.shape[0]
    out = torch.empty(grid.shape, dtype=torch.bool, device=grid.device)
    band = min(dec.BAND, dec.BAND * 128 * 4 / resolution)
    _mark_kernel[(d * d,)](grid, out.view(torch.uint8), d, float(level), float(band),
                           float(dec.INVALID_TEST), BLOCK=_block(d), num_warps=4)
    return out


def spread(coarse_mark: torch.Tensor, fine_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``fine_index(mark[None], fine_size)[0]`` and its set count per first-axis plane
    (int32 ``[F]``, on the device) for one contiguous boolean mark ``[C, C, C]`` (Triton)."""
    c = coarse_mark.shape[0]
    f = int(fine_size)
    out = torch.empty((f, f, f), dtype=torch.bool, device=coarse_mark.device)
    counts = torch.zeros(f, dtype=torch.int32, device=coarse_mark.device)
    if f > 2 * c:
        raise ValueError(f"fine size {f} > 2 × coarse size {c}")
    rows, cb = _spread_tiles(c)
    _spread_kernel[(f * triton.cdiv(f, rows),)](
        coarse_mark.view(torch.uint8), out.view(torch.uint8), counts, c, f, ROWS=rows, CB=cb,
        num_warps=4)
    return out, counts


def refine_index(grid: torch.Tensor, resolution: int, level: float, dilate: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The next level's query index of one part: boolean ``[R+1]³`` (R = ``resolution``) and
    its set count per first-axis plane (int64 on the device), from the current level's fp16
    grid ``[D, D, D]``: near-surface mark, ``dilate3`` when ``dilate``, spread to the fine
    grid.  Triton kernels where they run (CUDA, or the interpreter), else the PyTorch ops
    (also after a kernel failure: :func:`turbopart.nn.kernels.disabled` lists it as
    "refine")."""
    size = int(resolution) + 1
    d = grid.shape[0]

    def torch_path():
        m = dec.near_surface_mark(grid.unsqueeze(0), resolution, level)
        if dilate:
            m = dec.dilate3(m)
        fine = dec.fine_index(m, size)[0]
        return fine, fine.sum(dim=(1, 2))

    def kernels():
        m = mark(grid, resolution, level)
        if dilate:
            m = dec.dilate3(m.unsqueeze(0))[0]
        fine, counts = spread(m, size)
        return fine, counts.long()
    if not (kern.available(grid) and grid.dtype == torch.float16 and grid.is_contiguous()
            and grid.dim() == 3 and d >= 2 and size <= 2 * d):
        return torch_path()
    return run_or_fallback("refine", kernels, torch_path)
