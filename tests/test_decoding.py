"""Hierarchical volume decoding vs a slow, straightforward reference of the official
``extract_geometry_fast`` (spec xpart §3.5), on analytic fields (logit = k · signed distance,
positive inside)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_gpu, needs_triton, run_in_triton_interpreter
from turbopart.xpart import decoding as dec


# --------------------------------------------------------------------------- analytic fields

def _sphere(center, radius, slope):
    c = torch.tensor(center, dtype=torch.float64)

    def f(p):
        return slope * (radius - (p - c).norm(dim=-1))
    return f


def _box(center, half, slope):
    c = torch.tensor(center, dtype=torch.float64)
    h = torch.tensor(half, dtype=torch.float64)

    def f(p):
        q = (p - c).abs() - h
        outside = q.clamp(min=0).norm(dim=-1)
        inside = q.max(dim=-1).values.clamp(max=0)
        return -slope * (outside + inside)
    return f


def _fields(slope):
    return [_sphere((0.1, -0.05, 0.0), 0.45, slope),
            _box((-0.1, 0.2, 0.05), (0.3, 0.15, 0.5), slope),
            _sphere((0.0, 0.0, 0.0), 0.8, slope)]


class Calls:
    def __init__(self, fields):
        self.fields = fields
        self.points = []  # (part, points float64) per call

    def __call__(self, pts, parts):
        out = []
        if pts.shape[0] == 1:
            pts = pts.expand(len(parts), -1, -1)
        for row, k in zip(pts, parts):
            p64 = row.to(torch.float64)
            self.points.append((k, p64))
            # bf16 logits like the official autocast decoder, returned as float32
            out.append(self.fields[k](p64).to(torch.bfloat16).float())
        return torch.stack(out)


# --------------------------------------------------------------------------- reference

def _ref_neighbour(t, shift, axis):
    pad = [0, 0, 0, 0, 0, 0]  # F.pad order: last dim first
    d = 2 - axis
    pad[2 * d + (0 if shift < 0 else 1)] = 1
    p = F.pad(t[None, None].float(), pad, mode="replicate")[0, 0]
    sl = [slice(None)] * 3
    sl[axis] = slice(1, None) if shift > 0 else slice(None, -1)
    return p[tuple(sl)].to(t.dtype)


def _ref_mark(grid, level):
    val = grid + level                      # fp16 tensor + python float -> fp16
    valid = val > -9000
    sign = torch.sign(val.float())
    same = torch.ones_like(valid)
    for axis in range(3):
        for shift in (1, -1):
            nb = _ref_neighbour(val, shift, axis)
            nb = torch.where(nb > -9000, nb, val)
            same &= torch.sign(nb.float()) == sign
    return (~same).int() * valid.int()


def _ref_dilate(x):
    w = torch.ones(1, 1, 3, 3, 3)
    return F.conv3d(x[None, None].float(), w, padding=1)[0, 0]


def reference(field, octree_resolution, *, min_resolution=95, dilate_max=510, bounds=1.01,
              level=-1 / 512):
    """The official algorithm written out step by step (one part, slow, float32 dilations)."""
    res = []
    r = octree_resolution
    if r < min_resolution:
        res.append(r)
    while r >= min_resolution:
        res.append(r)
        r //= 2
    res.reverse()
    bmin = np.array([-bounds] * 3)
    bsize = np.array([bounds] * 3) - bmin
    ax = np.linspace(-bounds, bounds, res[0] + 1, dtype=np.float32)
    xs, ys, zs = np.meshgrid(ax, ax, ax, indexing="ij")
    pts = torch.from_numpy(np.stack((xs, ys, zs), -1).reshape(-1, 3)).half()
    queries = [pts.double()]
    g = field(pts.double()).to(torch.bfloat16).half().view(res[0] + 1, res[0] + 1, res[0] + 1)
    index = None
    for rr in res[1:]:
        n = rr + 1
        step = bsize / rr
        index = torch.zeros(n, n, n)
        new = torch.full((n, n, n), float("nan") if rr == res[-1] else -10000.0,
                         dtype=torch.float16)
        cur = _ref_mark(g, level)
        cur = cur + (g.abs() < min(0.95, 0.95 * 128 * 4 / rr)).int()
        if rr <= dilate_max:
            cur = _ref_dilate(cur)
        ci = torch.where(cur > 0)
        index[ci[0] * 2, ci[1] * 2, ci[2] * 2] = 1
        index = _ref_dilate(index)
        nidx = torch.where(index > 0)
        p = torch.stack(nidx, 1) * torch.tensor(step) + torch.tensor(bmin)
        queries.append(p)
        new[nidx] = field(p).to(torch.bfloat16).half()
        g = new
    mask = None if index is None else index > 0
    return g, mask, queries


# --------------------------------------------------------------------------- tests

def test_ladder():
    assert dec.resolution_ladder(512) == [128, 256, 512]
    assert dec.resolution_ladder(256) == [128, 256]
    assert dec.resolution_ladder(384) == [96, 192, 384]
    assert dec.resolution_ladder(64) == [64]
    assert dec.resolution_ladder(128) == [128]
    assert dec.resolution_ladder(1024) == [128, 256, 512, 1024]


def test_dilate_and_fine_index_match_conv():
    g = torch.Generator().manual_seed(3)
    m = torch.rand(2, 9, 9, 9, generator=g) > 0.93
    ref = torch.stack([_ref_dilate(x.int()) > 0 for x in m])
    assert torch.equal(dec.dilate3(m), ref)
    for fine in (17, 18):
        idx = torch.zeros(2, fine, fine, fine)
        for b in range(2):
            ci = torch.where(m[b])
            idx[b][ci[0] * 2, ci[1] * 2, ci[2] * 2] = 1
        ref = torch.stack([_ref_dilate(x) > 0 for x in idx])
        assert torch.equal(dec.fine_index(m, fine), ref)


def test_mark_matches_reference_with_invalid_values():
    g = torch.Generator().manual_seed(4)
    grid = (torch.randn(2, 11, 11, 11, generator=g) * 2).half()
    grid[0, 3:6, 2:8, 4:9] = -10000.0
    grid[1, :, 0] = -10000.0
    grid[1, 5, 5, 5] = 1 / 512  # val == 0 exactly: sign 0
    ours = dec.near_surface_mark(grid, 256)
    for b in range(2):
        ref = _ref_mark(grid[b], -1 / 512) + (grid[b].abs() < 0.95).int()
        assert torch.equal(ours[b], ref > 0)


def _rows(points):
    """Rows sorted lexicographically (compares query *sets*, bit for bit)."""
    a = points.numpy()
    return a[np.lexsort(a.T[::-1])]


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("dilate_max", [40, 100])
@pytest.mark.parametrize("slope", [4.0, 30.0, 400.0])
def test_hierarchy_matches_reference_small(slope, dilate_max, reuse):
    """Same grids, masks and query sets as the official algorithm.  With ``reuse`` the last
    level (twice the resolution of the one before) does not query the all-even vertices it
    shares with that level: they are in the reference's query set, with the very same
    float64 coordinates, at the previous level; the evaluated sets together are the
    reference's.  ``dilate_max`` 100 dilates the mark at the last level too, so some shared
    vertices were not evaluated before and must be queried."""
    fields = _fields(slope)
    calls = Calls(fields)
    out = dec.decode_volumes(calls, [0, 1, 2], 64, chunk=5000, min_resolution=15,
                             dilate_max_resolution=dilate_max, reuse=reuse)
    assert out.ladder == [16, 32, 64]
    for k in range(3):
        g, mask, queries = reference(fields[k], 64, min_resolution=15, dilate_max=dilate_max)
        assert torch.equal(out.mask[k], mask)
        assert torch.equal(torch.isnan(out.grid[k]), torch.isnan(g))
        ok = ~torch.isnan(g)
        assert torch.equal(out.grid[k][ok], g[ok])
        ours = torch.cat([p for kk, p in calls.points if kk == k])
        ref = torch.cat(queries)
        for lvl, q in enumerate(queries):
            assert out.queries[lvl][k] + out.reused[lvl][k] == q.shape[0]
        assert out.reused[0][k] == out.reused[1][k] == 0
        if not reuse:
            assert out.reused[2][k] == 0
            assert ours.shape == ref.shape
            # identical query sets, coordinates bit for bit (fp16 coarse, float64 fine)
            assert np.array_equal(_rows(ours), _rows(ref))
            continue
        # the reused vertices: the last level's all-even ones the level before evaluated
        idx = torch.nonzero(mask)
        even = (idx % 2 == 0).all(dim=1)
        before = queries[1]
        shared = torch.from_numpy(np.isin(_keys(queries[2][even]), _keys(before)))
        assert out.reused[2][k] == int(shared.sum()) > 0
        if dilate_max < 64:  # an undilated mark: every shared vertex was evaluated
            assert bool(shared.all())
        # evaluated: the reference's set without the reused vertices, bit for bit
        want = torch.cat([queries[0], queries[1], queries[2][even][~shared],
                          queries[2][~even]])
        assert ours.shape == want.shape
        assert np.array_equal(_rows(ours), _rows(want))


def _keys(points):
    """float64 rows as hashable byte strings (exact set membership)."""
    a = np.ascontiguousarray(points.numpy())
    return a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()


def test_reuse_queries_shared_vertices_the_level_before_left_out():
    """A dilated mark reaches vertices the previous level did not evaluate (INVALID): their
    fine twins are queried; only the evaluated ones are taken over, and the index is whole
    again afterwards."""
    prev = torch.full((9, 9, 9), dec.INVALID, dtype=torch.float16)
    prev[3:6, 3:6, 3:6] = 0.5                     # evaluated, in the band: marked
    f = _sphere((0.0, 0.0, 0.0), 0.3, 5.0)
    calls = Calls([f])
    plain = dec._Level(prev, 16, True, dec.MC_LEVEL, True)
    lv = dec._Level(prev, 16, True, dec.MC_LEVEL, True, prev)
    counts = lv.counts()
    assert lv.reused == 27
    assert sum(counts) == sum(plain.counts()) - 27
    grid, n = lv.run(calls, 0, chunk=10 ** 6, bounds=dec.BOUNDS, fine_dtype=torch.float64,
                     on_queries=None)
    want, n_plain = plain.run(Calls([f]), 0, chunk=10 ** 6, bounds=dec.BOUNDS,
                              fine_dtype=torch.float64, on_queries=None)
    assert n == n_plain - 27
    assert torch.equal(lv.fine, plain.fine)       # the whole index again: the MC mask
    even = lv.fine[::2, ::2, ::2]
    assert int(even.sum()) == 125                 # the dilated mark [2:7]³ …
    assert torch.equal(grid[6:11:2, 6:11:2, 6:11:2], prev[3:6, 3:6, 3:6])  # … 27 taken over
    queried = ~torch.isnan(grid) & ~torch.isnan(want)
    queried[6:11:2, 6:11:2, 6:11:2] = False
    assert torch.equal(grid[queried], want[queried])  # the rest (98 shell evens) queried
    assert torch.equal(torch.isnan(grid), torch.isnan(want))


def test_reuse_needs_a_doubled_fine_level():
    """Odd ladders ([15, 31, 63]) and the fp16 coarse level share no coordinates: nothing
    is reused, and the result is the reference's."""
    fields = _fields(30.0)
    out = dec.decode_volumes(Calls(fields), [0, 1], 63, chunk=5000, min_resolution=15)
    assert out.ladder == [15, 31, 63]
    assert out.reused == [[0, 0], [0, 0], [0, 0]]
    g, mask, queries = reference(fields[1], 63, min_resolution=15)
    assert torch.equal(out.mask[1], mask)
    assert torch.equal(out.grid[1].nan_to_num(7.0), g.nan_to_num(7.0))
    assert [q[1] for q in out.queries] == [q.shape[0] for q in queries]


def test_hierarchy_256_matches_reference():
    fields = _fields(20.0)[:1]
    calls = Calls(fields)
    out = dec.decode_volumes(calls, [0], 256, chunk=1_500_000)
    g, mask, queries = reference(fields[0], 256)
    assert out.ladder == [128, 256]
    assert torch.equal(out.mask[0], mask)
    ok = ~torch.isnan(g)
    assert torch.equal(torch.isnan(out.grid[0]), ~ok)
    assert torch.equal(out.grid[0][ok], g[ok])
    assert out.queries == [[129 ** 3], [queries[1].shape[0]]]
    # the band is thin: far fewer queries than the dense 257^3 grid
    assert queries[1].shape[0] < 0.2 * 257 ** 3


def test_single_level_is_dense_fp16_grid():
    fields = _fields(10.0)[:2]
    calls = Calls(fields)
    out = dec.decode_volumes(calls, [0, 1], 32, chunk=7000)
    assert out.ladder == [32] and out.mask is None
    g0, _, _ = reference(fields[1], 32)
    assert torch.equal(out.grid[1], g0)
    assert out.queries == [[33 ** 3, 33 ** 3]]


def test_chunking_does_not_change_results():
    fields = _fields(50.0)
    a = dec.decode_volumes(Calls(fields), [0, 1, 2], 64, chunk=997, min_resolution=15)
    b = dec.decode_volumes(Calls(fields), [0, 1, 2], 64, chunk=10 ** 7, min_resolution=15)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.grid.nan_to_num(7.0), b.grid.nan_to_num(7.0))
    assert a.queries == b.queries


def test_dense_decoder_float32_coordinates():
    f = _sphere((0.0, 0.0, 0.0), 0.5, 3.0)
    seen = []

    def q(pts, parts):
        seen.append(pts.dtype)
        assert pts.shape[0] == 1 and parts == [0]
        return torch.stack([f(p.double()).float() for p in pts])
    grid = dec.decode_dense(q, [0], 16)
    ax = np.linspace(-1.01, 1.01, 17, dtype=np.float32)
    p = torch.tensor([ax[3], ax[16], ax[0]], dtype=torch.float64)
    assert grid.shape == (1, 17, 17, 17)
    assert torch.allclose(grid[0, 3, 16, 0].double(), f(p).float().double())
    assert seen == [torch.float32]


@needs_gpu
def test_hierarchy_on_gpu_matches_cpu():
    fields = _fields(20.0)

    class GpuCalls(Calls):
        def __call__(self, pts, parts):
            return super().__call__(pts.cpu(), parts).to(pts.device)
    cpu = dec.decode_volumes(Calls(fields), [0, 1, 2], 256, chunk=3_000_000)
    gpu = dec.decode_volumes(GpuCalls(fields), [0, 1, 2], 256, device="cuda",
                             chunk=3_000_000)
    assert cpu.queries == gpu.queries
    assert torch.equal(cpu.mask, gpu.mask.cpu())
    assert torch.equal(cpu.grid.nan_to_num(7.0), gpu.grid.cpu().nan_to_num(7.0))


def test_iter_volumes_streams_parts_identically():
    """One coarse pass for all parts, then part after part: the same grids, masks, query
    sets and counts as decode_volumes; the coarse level is one shared query set per call."""
    fields = _fields(30.0)
    whole = dec.decode_volumes(Calls(fields), [0, 1, 2], 64, chunk=4000, min_resolution=15,
                               dilate_max_resolution=40)
    calls = Calls(fields)
    stats = {}
    seen = []
    for pv in dec.iter_volumes(calls, [2, 0, 1], 64, chunk=4000, min_resolution=15,
                               dilate_max_resolution=40, stats=stats):
        seen.append(pv.part)
        k = pv.part
        assert pv.resolution == 64 and pv.ladder == [16, 32, 64]
        assert torch.equal(pv.mask, whole.mask[k])
        assert torch.equal(pv.grid.nan_to_num(7.0), whole.grid[k].nan_to_num(7.0))
        assert pv.queries == [lvl[k] for lvl in whole.queries]
    assert seen == [2, 0, 1]
    assert set(stats) == {"coarse", "marks", "queries 64"}
    # the coarse calls (all parts, one shared point set) come first: 17³ points per part
    n_coarse_calls = 3 * -(-17 ** 3 // (4000 // 3))
    assert all(p.shape[0] <= 4000 // 3 for _, p in calls.points[:n_coarse_calls])
    assert sum(p.shape[0] for k, p in calls.points[:n_coarse_calls] if k == 2) == 17 ** 3
    for k in range(3):
        assert sum(p.shape[0] for kk, p in calls.points if kk == k) == \
            sum(lvl[k] for lvl in whole.queries)


def test_shared_groups_match_parts_alone():
    """Groups of parts whose fine vertices nearly coincide query the union once, as one
    shared point set; every part still gets its own grid, mask and counts bit for bit.  A
    group whose union would cost more than its parts' own passes runs them apart."""
    near = [_sphere((0.1, -0.05, 0.0), 0.45, 4.0), _sphere((0.1, -0.05, 0.0), 0.46, 4.0),
            _sphere((0.1, -0.05, 0.0), 0.45, 4.0), _box((-0.1, 0.2, 0.05), (0.3, 0.15, 0.5),
                                                         30.0),
            _sphere((0.3, 0.3, 0.3), 0.1, 400.0)]
    kw = dict(chunk=4000, min_resolution=15, dilate_max_resolution=40)
    alone = {pv.part: pv for pv in dec.iter_volumes(Calls(near), range(5), 64, **kw)}
    calls = Calls(near)
    shared_calls = []

    def spy(pts, parts):
        if pts.shape[0] == 1 and len(parts) > 1 and pts.dtype == torch.float64:
            shared_calls.append(tuple(parts))
        return calls(pts, parts)
    groups = [[0, 1, 2], [3, 4]]
    seen = []
    for pv in dec.iter_volumes(spy, range(5), 64, groups=groups, **kw):
        ref = alone[pv.part]
        seen.append(pv.part)
        assert torch.equal(pv.mask, ref.mask)
        assert torch.equal(pv.grid.nan_to_num(7.0), ref.grid.nan_to_num(7.0))
        assert pv.queries == ref.queries and pv.reused == ref.reused
        assert all(r >= q for r, q in zip(pv.rows, pv.queries))
    assert seen == [0, 1, 2, 3, 4]
    assert set(shared_calls) == {(0, 1, 2)}  # the box and the small sphere: apart
    assert alone[1].rows == alone[1].queries
    assert dec.share_groups(8, 4) == [[0, 1, 2, 3], [4, 5], [6], [7]]
    assert dec.share_groups(3, 4) == [[0], [1], [2]]
    assert dec.share_groups(3, 1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="partition"):
        list(dec.iter_volumes(spy, range(3), 64, groups=[[0, 1]], **kw))


def test_iter_volumes_single_level_and_no_parts():
    fields = _fields(10.0)[:2]
    pvs = list(dec.iter_volumes(Calls(fields), [0, 1], 32, chunk=7000))
    assert [pv.mask for pv in pvs] == [None, None]
    assert [pv.queries for pv in pvs] == [[33 ** 3], [33 ** 3]]
    g0, _, _ = reference(fields[1], 32)
    assert torch.equal(pvs[1].grid, g0)
    assert list(dec.iter_volumes(Calls(fields), [], 64)) == []


# --------------------------------------------------------------------------- refinement kernels

def _refine_cases(device, sizes):
    """(grid, resolution, dilate) cases: fp16 noise fields with invalid blocks and an exact
    zero of ``G + level``."""
    g = torch.Generator().manual_seed(7)
    for d, fine, dilate in sizes:
        grid = (torch.randn(d, d, d, generator=g) * 0.8).half()
        grid[2:4, 1:5, 3:7] = dec.INVALID
        grid[0, 0, :] = dec.INVALID
        grid[d // 2, d // 2, d // 2] = 1 / 512
        yield grid.to(device), fine - 1, dilate


def _refine_reference(grid, resolution, dilate):
    m = dec.near_surface_mark(grid[None], resolution, dec.MC_LEVEL)
    if dilate:
        m = dec.dilate3(m)
    fine = dec.fine_index(m, resolution + 1)[0]
    return fine, fine.sum(dim=(1, 2))


_REFINE_SCRIPT = """
import torch
import test_decoding as t
from turbopart.xpart import refine_triton as R
for grid, r, dilate in t._refine_cases("cpu", ((9, 17, False), (9, 18, True), (6, 11, True))):
    fine, counts = R.refine_index(grid, r, t.dec.MC_LEVEL, dilate)
    ref, ref_counts = t._refine_reference(grid, r, dilate)
    assert torch.equal(R.mark(grid, r, t.dec.MC_LEVEL),
                       t.dec.near_surface_mark(grid[None], r, t.dec.MC_LEVEL)[0])
    assert torch.equal(fine, ref) and torch.equal(counts, ref_counts), (grid.shape, r)
assert not R.kern.disabled(), R.kern.disabled()
print("ok")
"""


@needs_triton
def test_refine_kernels_in_interpreter():
    """The mark / spread kernels give the PyTorch ops' boolean index and plane counts."""
    run_in_triton_interpreter(_REFINE_SCRIPT, timeout=600)


@needs_gpu
def test_refine_kernels_on_cuda_match_torch_ops():
    from turbopart.xpart import refine_triton as R
    for grid, r, dilate in _refine_cases("cuda", ((129, 257, True), (257, 513, False),
                                                  (40, 80, False))):
        fine, counts = R.refine_index(grid, r, dec.MC_LEVEL, dilate)
        ref, ref_counts = _refine_reference(grid, r, dilate)
        assert torch.equal(fine, ref) and torch.equal(counts, ref_counts), (grid.shape, r)
    assert "refine" not in R.kern.disabled(), R.kern.disabled()


@needs_gpu
def test_refine_warm_up_covers_the_octree_512_ladder():
    """After ``warm_up`` the decode compiles nothing: not for a part's grid sliced at a
    misaligned offset of the all-parts coarse grid either."""
    from turbopart.xpart import refine_triton as R
    R.warm_up("cuda")

    def compiled():
        return sum(len(c[0]) for k in (R._mark_kernel, R._spread_kernel)
                   for c in k.device_caches.values())
    before = compiled()
    coarse = torch.zeros(3, 129, 129, 129, dtype=torch.float16, device="cuda")
    R.refine_index(coarse[1], 256, dec.MC_LEVEL, True)
    R.refine_index(torch.zeros(257, 257, 257, dtype=torch.float16, device="cuda"), 512,
                   dec.MC_LEVEL, False)
    torch.cuda.synchronize()
    assert compiled() == before and "refine" not in R.kern.disabled()
