"""The geometry decoder's separable front for grid queries (turbopart.nn.kernels.grid_front)."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_gpu, needs_triton, run_in_triton_interpreter
from turbopart.nn.fourier import fourier_frequencies
from turbopart.nn.kernels.decoder_triton import fourier_rows_ref
from turbopart.nn.kernels.grid_front import (column_axes, grid_front, grid_front_ref,
                                             grid_tables)
from turbopart.xpart import decoding
from turbopart.xpart import vae as vae_mod


def _weights(width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = F.pad(torch.randn(width, 51, generator=g) * 0.3, (0, 5)).to(dtype)
    qb = (torch.randn(width, generator=g) * 0.1).to(dtype)
    lw = torch.rand(width, generator=g) + 0.5
    lb = torch.randn(width, generator=g) * 0.1
    cw = (torch.randn(width, width, generator=g) / width ** 0.5).to(dtype)
    cb = (torch.randn(width, generator=g) * 0.1).to(dtype)
    return qw, qb, lw, lb, cw, cb


def _op_sequence(pts, fr, w, eps, dtype, feat_dtype=None):
    """Fourier → query_proj → ln_1 → c_q as the official decoder computes them (in
    ``dtype``; features rounded to ``feat_dtype``, default ``dtype``)."""
    qw, qb, lw, lb, cw, cb = w
    qw, qb, cw, cb = (x.to(dtype) for x in (qw, qb, cw, cb))  # the LayerNorm's stay fp32
    f = fourier_rows_ref(pts, fr, True, feat_dtype or dtype, dtype, qw.shape[1])
    e = F.linear(f, qw, qb)
    h = F.layer_norm(e.float(), (qw.shape[0],), lw, lb, eps).to(dtype)
    return e, F.linear(h, cw, cb)


def _ulps(x, y):
    """|x − y| in units of y's bf16 spacing."""
    y = y.float()
    spacing = torch.ldexp(torch.ones_like(y), torch.frexp(y)[1] - 8)
    return ((x.float() - y).abs() / spacing)


def test_column_axes_follow_the_fourier_layout():
    assert column_axes(2, True) == [0, 1, 2, 0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert column_axes(1, False) == [0, 1, 2, 0, 1, 2]
    # the layout really is the features': a column moves only with its axis
    fr = fourier_frequencies(3, False)
    base = fourier_rows_ref(torch.zeros(1, 3), fr, True, torch.float32, torch.float32, 21)
    for a in range(3):
        p = torch.zeros(1, 3)
        p[0, a] = 0.3
        moved = fourier_rows_ref(p, fr, True, torch.float32, torch.float32, 21) != base
        assert {c for c, m in enumerate(moved[0].tolist()) if m} <= \
            {c for c, ax in enumerate(column_axes(3, True)) if ax == a}


@pytest.mark.parametrize("axis_dtype", [torch.float16, torch.float32, torch.float64])
def test_tables_compute_the_front(axis_dtype):
    """fp32 weights: the op sequence to fp32 rounding.  bf16 weights: e (the residual) is the
    op sequence's bf16 value (rare ties apart); the queries skip the official bf16
    roundings of e and ln_1(e): half of them move by an ulp, and they are closer to the
    same weights' fp32 arithmetic than the official rounding points are."""
    s, width, eps = 17, 128, 1e-6
    fr = fourier_frequencies(8, False)
    axis = decoding.fine_axis(s - 1, dtype=axis_dtype)
    if axis_dtype == torch.float16:  # the coarse level: fp16-rounded float32 coordinates
        axis = decoding.dense_axis(s - 1, fp16=True)
    lin = torch.randperm(s ** 3, generator=torch.Generator().manual_seed(1))[:600]
    pts = decoding.GridQuery(lin, s, axis).points()
    for dtype in (torch.float32, torch.bfloat16):
        w = _weights(width, dtype)
        t = grid_tables(axis, fr, True, dtype, *w, eps)
        assert t.size == s and t.width == width and t.e.dtype == torch.float32
        e, q = grid_front_ref(lin, t, dtype)
        e_ref, q_ref = _op_sequence(pts, fr, w, eps, dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(e, e_ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(q, q_ref, rtol=0, atol=2e-5)
        else:  # (measured against the row's scale: CPU bf16 GEMMs differ near zero)
            e_rms = e_ref.float().pow(2).mean(-1, keepdim=True).sqrt()
            e_err = (e.float() - e_ref.float()).abs() / e_rms
            assert e_err.max() < 0.02 and (e != e_ref).float().mean() < 0.02
            rms = q_ref.float().pow(2).mean(-1, keepdim=True).sqrt()
            err = (q.float() - q_ref.float()).abs() / rms
            assert err.max() < 0.05 and err.mean() < 0.005
            _, q32 = _op_sequence(pts, fr, w, eps, torch.float32, feat_dtype=dtype)
            mine = ((q.float() - q32).abs() / rms).mean()
            official = ((q_ref.float() - q32).abs() / rms).mean()
            assert mine < official


def test_grid_query_points_are_the_level_coordinates():
    axis = decoding.dense_axis(8, fp16=True)
    q = decoding.GridQuery(torch.arange(9 ** 3), 9, axis)
    assert torch.equal(q.points(), decoding.dense_grid_points(8, fp16=True))
    fine = decoding.GridQuery(torch.tensor([0, 5, 17 * 17 * 3 + 17 * 2 + 16]), 17,
                              decoding.fine_axis(16))
    idx = torch.tensor([[0, 0, 0], [0, 0, 5], [3, 2, 16]], dtype=torch.float64)
    assert torch.equal(fine.points(), idx * float(2.02 / 16) + (-1.01))
    assert len(fine.sliced(1, 3)) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_grid_queries(dtype):
    """``GeometryDecoder.query`` on a GridQuery: eager = its points; fused (PyTorch refs of
    the kernels here) with the separable front = the points path within rounding."""
    from test_vae import _fused_model
    model = _fused_model(dtype)
    g = torch.Generator().manual_seed(0)
    geo = model.geo_decoder
    dec = model.decode(torch.randn(3, 64, 8, generator=g).to(dtype))
    kv = geo.precompute_kv(dec)
    size = 21
    grid = decoding.GridQuery(torch.randperm(size ** 3, generator=g)[:700], size,
                              decoding.fine_axis(size - 1, dtype=torch.float32))
    geo.kernel = "eager"
    ref = geo.query(grid.points().unsqueeze(0), kv, max_rows=999)
    assert torch.equal(geo.query(grid, kv, max_rows=999), ref)
    geo.kernel = "fused"
    geo.fused_options = vae_mod.FusedOptions("sdpa", "cublas", front="points")
    torch.testing.assert_close(geo.query(grid, kv, max_rows=999).float(), ref.float(),
                               rtol=0, atol=1e-5)
    geo.fused_options = vae_mod.FusedOptions("sdpa", "cublas", front="grid")
    out = geo.query(grid, kv, max_rows=999)
    assert len(geo._grid_tables) == 1
    tol = 1e-4 if dtype == torch.float32 else 0.05 * max(1.0, ref.float().abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)
    one = geo.query(grid, kv.select(1, 2), max_rows=999)  # one part, same tables
    torch.testing.assert_close(one.float(), out[1:2].float(), rtol=0, atol=1e-5)
    assert len(geo._grid_tables) == 1 and not geo.failed_modes


def test_pipeline_query_takes_grids_and_plain_functions_get_points():
    seen = []

    def points_fn(pts, parts):
        seen.append(type(pts))
        return torch.zeros(len(parts), pts.shape[1])
    vols = list(decoding.iter_volumes(points_fn, [0], 128))
    assert vols and seen and all(t is torch.Tensor for t in seen)

    def grid_fn(q, parts):
        seen.append(type(q))
        return torch.zeros(len(parts), len(q))
    grid_fn.accepts_grid = True
    seen.clear()
    list(decoding.iter_volumes(grid_fn, [0, 1], 256))
    assert seen and all(t is decoding.GridQuery for t in seen)


_KERNEL_SCRIPT = textwrap.dedent(r"""
    import torch
    from turbopart.nn.fourier import fourier_frequencies
    from turbopart.nn.kernels import disabled
    from turbopart.nn.kernels.grid_front import grid_front, grid_front_ref, grid_tables
    from turbopart.xpart import decoding
    from test_grid_front import _weights
    s = 13
    for dtype in (torch.float32, torch.bfloat16):
        t = grid_tables(decoding.fine_axis(s - 1, dtype=torch.float32),
                        fourier_frequencies(8, False), True, dtype, *_weights(256, dtype), 1e-6)
        lin = torch.randperm(s ** 3)[:45]  # not a multiple of the row block
        for a, b in zip(grid_front(lin, t, torch.bfloat16), grid_front_ref(lin, t, torch.bfloat16)):
            assert a.shape == b.shape == (45, 256) and a.dtype == torch.bfloat16
            d = (a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)
            assert d.max() < 1e-2, d.max()  # fused multiply-add: a rounding tie can flip
    assert "grid_front" not in disabled(), disabled()
    print("ok")
""")


@needs_triton
def test_grid_front_kernel_in_interpreter():
    run_in_triton_interpreter(_KERNEL_SCRIPT)


@needs_gpu
def test_grid_front_kernel_on_cuda():
    s = 129
    fr = fourier_frequencies(8, False, device="cuda")
    w = [x.cuda() for x in _weights(1024, torch.bfloat16)]
    t = grid_tables(decoding.dense_axis(s - 1, fp16=True, device="cuda"), fr, True,
                    torch.bfloat16, *w, 1e-6)
    lin = torch.randint(0, s ** 3, (100_003,), device="cuda")
    for a, b in zip(grid_front(lin, t, torch.bfloat16), grid_front_ref(lin, t, torch.bfloat16)):
        # fused multiply-adds and summation order: ties of the bf16 rounding can flip
        rms = b.float().pow(2).mean(-1, keepdim=True).sqrt()
        assert ((a.float() - b.float()).abs() / rms).max() < 0.02
        assert (a != b).float().mean() < 0.02
