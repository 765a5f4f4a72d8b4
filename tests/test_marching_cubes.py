"""GPU-style marching cubes checked against scikit-image on the same volumes (CPU)."""
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation, gaussian_filter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from conftest import needs_gpu
from turbopart.geometry import mc_tables
from turbopart.geometry.marching_cubes import (cells_from_points, grid_to_world,
                                               marching_cubes)

skmeasure = pytest.importorskip("skimage.measure")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers

def _grid(n):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij"), -1)


def _sk(vol, level, mask=None):
    v, f, _, _ = skmeasure.marching_cubes(vol, level, method="lewiner", mask=mask)
    return v, f


def _ours(vol, level, mask=None, **kw):
    m = None if mask is None else torch.from_numpy(mask)
    v, f = marching_cubes(torch.from_numpy(vol), level, mask=m, **kw)
    assert v.dtype == torch.float32 and f.dtype == torch.int64
    return v.numpy(), f.numpy()


def _components(v, f):
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]]])
    g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(len(v), len(v)))
    _, lab = connected_components(g, directed=False)
    return len(np.unique(lab[np.unique(f)]))


def _closed_and_oriented(f):
    """Every undirected edge used by exactly two faces, every directed edge once."""
    d = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    _, cnt = np.unique(np.sort(d, 1), axis=0, return_counts=True)
    return bool((cnt == 2).all()) and len(np.unique(d, axis=0)) == len(d)


def _signed_volume(v, f):
    a, b, c = v[f[:, 0]].astype(np.float64), v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6)


def _on_grid_edge(v):
    """A marching-cubes edge vertex has (at least) two integer coordinates."""
    return (np.abs(v - np.round(v)) < 1e-6).sum(1) >= 2


def _compare(vol, level, mask=None, tol=1e-5):
    """Vertex sets, component counts; returns the (ours, skimage) meshes."""
    sv, sf = _sk(vol, level, mask)
    ov, of = _ours(vol, level, mask)
    sfin, ofin = np.isfinite(sv).all(1), np.isfinite(ov).all(1)
    d_os, _ = cKDTree(sv[sfin]).query(ov[ofin])
    d_so, _ = cKDTree(ov[ofin]).query(sv[sfin])
    # every edge vertex of ours is a skimage vertex and vice versa; the only unmatched
    # vertices are interior (cell-centre) points, Lewiner's or ours
    ours_only, sk_only = ov[ofin][d_os >= tol], sv[sfin][d_so >= tol]
    assert _on_grid_edge(ours_only).sum() == 0 and _on_grid_edge(sk_only).sum() == 0
    assert len(ours_only) <= 0.002 * len(ov) + 1 and len(sk_only) <= 0.01 * len(sv) + 1
    return (ov, of), (sv, sf), len(sk_only) + len(ours_only)


def _face_sample(v, f, n, seed=0):
    rng = np.random.default_rng(seed)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    idx = rng.choice(len(f), n, p=area / area.sum())
    r1, r2 = rng.random((2, n, 1))
    s = np.sqrt(r1)
    return (1 - s) * a[idx] + s * (1 - r2) * b[idx] + s * r2 * c[idx]


def _point_triangle_distance(p, a, b, c):
    """Exact distance from points p [n,3] to triangles (a, b, c) [n,k,3] (min over k)."""
    p = p[:, None, :]
    ab, ac, ap = b - a, c - a, p - a
    d00 = (ab * ab).sum(-1)
    d01 = (ab * ac).sum(-1)
    d11 = (ac * ac).sum(-1)
    d20 = (ap * ab).sum(-1)
    d21 = (ap * ac).sum(-1)
    den = np.maximum(d00 * d11 - d01 * d01, 1e-30)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    inside = (v >= 0) & (w >= 0) & (v + w <= 1)
    proj = a + v[..., None] * ab + w[..., None] * ac
    best = np.where(inside, np.linalg.norm(p - proj, axis=-1), np.inf)
    for s0, s1 in ((a, b), (b, c), (c, a)):                    # closest point on each edge
        e = s1 - s0
        t = np.clip(((p - s0) * e).sum(-1) / np.maximum((e * e).sum(-1), 1e-30), 0, 1)
        best = np.minimum(best, np.linalg.norm(p - (s0 + t[..., None] * e), axis=-1))
    return best.min(1)


def _chamfer(m1, m2, n=3000, k=12):
    """Symmetric mean point-to-surface distance (voxels) from surface samples."""
    d = 0.0
    for (va, fa), (vb, fb) in ((m1, m2), (m2, m1)):
        pts = _face_sample(va, fa, n)
        tri = vb[fb].astype(np.float64)
        _, cand = cKDTree(tri.mean(1)).query(pts, k=min(k, len(fb)))
        t = tri[cand]
        d += _point_triangle_distance(pts, t[:, :, 0], t[:, :, 1], t[:, :, 2]).mean()
    return d


def _sphere(n=28, r=9.3, c=(13.2, 13.7, 12.9)):
    return (r - np.linalg.norm(_grid(n) - np.array(c), axis=-1)).astype(np.float32)


def _torus(n=36, R=10.0, r=3.7, c=(17.3, 17.6, 17.1)):
    p = _grid(n) - np.array(c, dtype=np.float32)
    q = np.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2) - R
    return (r - np.sqrt(q ** 2 + p[..., 2] ** 2)).astype(np.float32)


def _blobs(n=40, k=14, seed=3):
    rng = np.random.default_rng(seed)
    g = _grid(n)
    f = np.zeros((n, n, n), np.float32)
    for _ in range(k):
        c, s = rng.uniform(6, n - 6, 3), rng.uniform(1.5, 4.0)
        f += np.exp(-((g - c) ** 2).sum(-1) / (2 * s * s))
    return f - 0.35


def _smooth_noise(n=40, sigma=2.0, seed=0):
    rng = np.random.default_rng(seed)
    f = gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), sigma)
    return f / f.std()


# ----------------------------------------------------------------------------- tables

def test_tables_cover_every_crossed_edge_once():
    t = mc_tables.tables()
    assert t.ntri.max() <= mc_tables.MAX_TRIS
    for case in range(1, 255):
        crossed = {e for e in range(12) if (t.crossed[case] >> e) & 1}
        amb = int(t.ambiguous[case])
        for bits in {0, amb, amb & 0b010101, amb & 0b101010}:
            loops = mc_tables.loops_for(case, bits)
            flat = [e for lp in loops for e in lp]
            assert sorted(flat) == sorted(crossed)            # each crossed edge in one loop
            row = t.tris[case * 64 + bits, : t.ntri[case * 64 + bits]]
            used = set(row.ravel().tolist())
            centre = set(np.flatnonzero(t.centre[case * 64 + bits]).tolist())
            assert sorted(used - {mc_tables.CENTER}) == sorted(crossed)
            assert (mc_tables.CENTER in used) == bool(centre) and centre <= crossed
    assert t.ntri[0] == 0 and t.ntri[255 * 64] == 0


def test_tables_complement_reverses_orientation():
    """Swapping above/below with complementary face decisions gives the same loops reversed."""
    for case in range(1, 255):
        amb = mc_tables.ambiguous_faces(case)
        for bits in (0, amb):
            a = {tuple(sorted(lp)) for lp in mc_tables.loops_for(case, bits)}
            b = {tuple(sorted(lp)) for lp in mc_tables.loops_for(255 - case, amb & ~bits)}
            assert a == b


# ----------------------------------------------------------------------------- vs skimage

@pytest.mark.parametrize("shape", ["sphere", "torus", "blobs"])
def test_closed_shapes_match_skimage(shape):
    vol = {"sphere": _sphere, "torus": _torus, "blobs": _blobs}[shape]()
    (ov, of), (sv, sf), extra = _compare(vol, 0.0)
    assert extra == 0 and len(ov) == len(sv)
    assert _closed_and_oriented(of)
    assert _components(ov, of) == _components(sv, sf)
    # "descent": same winding as skimage (normals toward larger values: negative volume here)
    vo, vs = _signed_volume(ov, of), _signed_volume(sv, sf)
    assert vo < 0 and abs(vo - vs) < 1e-3 * abs(vs)
    assert _chamfer((ov, of), (sv, sf)) < 0.02           # voxels; quad diagonals may differ


@pytest.mark.parametrize("sigma", [1.5, 2.5])
def test_random_smooth_fields_match_skimage(sigma):
    vol = _smooth_noise(40, sigma, seed=int(sigma * 10))
    (ov, of), (sv, sf), extra = _compare(vol, 0.1)
    assert _components(ov, of) == _components(sv, sf)
    assert _chamfer((ov, of), (sv, sf)) < 0.05
    # open only where the surface leaves the volume: interior edges are shared twice
    d = np.concatenate([of[:, [0, 1]], of[:, [1, 2]], of[:, [2, 0]]])
    und, cnt = np.unique(np.sort(d, 1), axis=0, return_counts=True)
    border = und[cnt == 1]
    assert (cnt <= 2).all()
    bv = ov[border.ravel()]
    assert ((bv <= 1e-6) | (bv >= 39 - 1e-6)).any(1).all()   # boundary edges lie on the box


def test_foam_is_closed_manifold_and_oriented():
    """White noise (every ambiguous case, many times) padded by 'below': a closed surface."""
    rng = np.random.default_rng(1)
    vol = np.full((26, 26, 26), -1.0, np.float32)
    vol[1:-1, 1:-1, 1:-1] = rng.standard_normal((24, 24, 24))
    v, f = _ours(vol, 0.0)
    assert _closed_and_oriented(f)
    assert len(np.unique(f)) == len(v)                    # no unused vertex
    centres = ~_on_grid_edge(v)
    assert 0 < centres.sum() < 0.03 * len(v)              # a few loops needed a centre point
    sv, sf = _sk(vol, 0.0)
    d, _ = cKDTree(sv).query(v[~centres])
    assert d.max() < 1e-3                                 # edge vertices are skimage's
    # per component: closed surfaces bound positive volume from the inside ("descent")
    assert _signed_volume(v, f) < 0


def test_nan_and_mask_semantics_match_skimage():
    vol = _smooth_noise(36, 2.0, seed=7)
    mask = binary_dilation(np.abs(vol) < 0.7, iterations=1)
    vol[~mask] = np.nan
    level = -1 / 512
    (ov, of), (sv, sf), _ = _compare(vol, level, mask)
    # the same cells produce triangles (cell = floor of the face centroid, NaN → via corners)
    def cells(v, f):
        fin = np.isfinite(v).all(1)
        keep = fin[f].all(1)
        return {tuple(c) for c in np.floor(v[f[keep]].mean(1)).astype(int)}
    co, cs = cells(ov, of), cells(sv, sf)
    assert len(co ^ cs) <= 0.01 * len(cs)             # only NaN-ambiguous cells differ
    # NaN vertices exist exactly on edges toward NaN corners, as in skimage
    assert abs(int((~np.isfinite(ov).all(1)).sum()) - int((~np.isfinite(sv).all(1)).sum())) \
        <= 0.01 * len(sv)
    # the finite part is closed except where it meets NaN faces
    assert _components(ov, of) > 0


def test_mask_uses_maximum_corner():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((6, 6, 6)).astype(np.float32)
    for p in [(2, 3, 4), (1, 1, 1), (5, 5, 5), (0, 3, 3)]:
        mask = np.zeros(vol.shape, bool)
        mask[p] = True
        v, f = _ours(vol, 0.0, mask)
        if min(p) == 0:
            assert len(f) == 0
            continue
        cell = np.floor(v[f].mean(1)).astype(int)
        assert (cell == np.array(p) - 1).all()
        assert len(f) == len(_sk(vol, 0.0, mask)[1])


def test_level_and_nan_classification():
    vol = np.full((3, 3, 3), -1.0, np.float32)
    vol[1, 1, 1] = 0.0                                  # exactly at the level: below
    assert len(_ours(vol, 0.0)[1]) == 0
    vol[1, 1, 1] = 1e-30                                # barely above
    v, f = _ours(vol, 0.0)
    assert len(f) == 8 and np.allclose(np.sort(v.sum(1)), 3.0, atol=1e-5)
    vol[1, 1, 1] = np.float32(0.3)                      # float32(0.3) > 0.3 in double: above
    assert len(_ours(vol, 0.3)[1]) == 8 == len(_sk(vol, 0.3)[1])
    half = torch.from_numpy(vol).half()                 # fp16(0.3) = 0.300048828125
    assert len(marching_cubes(half, 0.30004)[1]) == 8
    assert len(marching_cubes(half, 0.30005)[1]) == 0
    vol[1, 1, 1] = 0.5
    vol[0, 1, 1] = np.nan                               # NaN corner counts as below
    v, f = _ours(vol, 0.0)
    assert len(f) == 8
    bad = ~np.isfinite(v).all(1)
    assert bad.sum() == 1                               # the edge toward the NaN corner
    sv, _ = _sk(vol, 0.0)
    assert (~np.isfinite(sv).all(1)).sum() == 1


def test_fp16_input_and_official_level():
    vol = _sphere().astype(np.float16)
    level = -1 / 512
    v16, f16 = marching_cubes(torch.from_numpy(vol), level)
    v32, f32 = marching_cubes(torch.from_numpy(vol.astype(np.float32)), level)
    assert torch.equal(f16, f32) and torch.equal(v16, v32)
    sv, _ = _sk(vol, level)                             # skimage converts to float32 itself
    assert cKDTree(sv).query(v16.numpy())[0].max() < 1e-4


def test_ascent_reverses_winding_and_spacing_scales():
    vol = _sphere()
    v, f = marching_cubes(torch.from_numpy(vol), 0.0)
    va, fa = marching_cubes(torch.from_numpy(vol), 0.0, gradient_direction="ascent",
                            spacing=(2.0, 1.0, 0.5))
    assert torch.equal(fa, f.flip(1))
    assert torch.allclose(va, v * torch.tensor([2.0, 1.0, 0.5]))


def test_sparse_cells_equal_dense_mask_and_chunking(monkeypatch):
    vol = _smooth_noise(32, 2.0, seed=11)
    mask = binary_dilation(np.abs(vol) < 0.5, iterations=1)
    vol[~mask] = np.nan
    ref = marching_cubes(torch.from_numpy(vol), 0.0, mask=torch.from_numpy(mask))
    pts = torch.from_numpy(np.argwhere(mask))
    sparse = marching_cubes(torch.from_numpy(vol), 0.0, cells=cells_from_points(pts, vol.shape))
    flat_cells = cells_from_points(pts, vol.shape) @ torch.tensor([32 * 32, 32, 1])
    sparse_flat = marching_cubes(torch.from_numpy(vol), 0.0, cells=flat_cells)
    shuffled = torch.cat([flat_cells[torch.randperm(len(flat_cells))], flat_cells[:50]])
    sparse_shuffled = marching_cubes(torch.from_numpy(vol), 0.0, cells=shuffled)
    from turbopart.runtime import memory
    monkeypatch.setattr(memory, "CPU_BUDGET", 150_000)  # several slabs and cell chunks
    monkeypatch.setattr(memory, "MIN_BUDGET", 1, raising=False)
    chunked = marching_cubes(torch.from_numpy(vol), 0.0, mask=torch.from_numpy(mask))
    for v, f in (sparse, sparse_flat, sparse_shuffled, chunked):
        assert torch.equal(f, ref[1])
        assert torch.equal(torch.nan_to_num(v, 123.0), torch.nan_to_num(ref[0], 123.0))


def test_empty_and_tiny_volumes():
    v, f = marching_cubes(torch.zeros(4, 4, 4), 0.5)
    assert v.shape == (0, 3) and f.shape == (0, 3)
    v, f = marching_cubes(torch.full((3, 3, 3), float("nan")), 0.0)
    assert f.shape == (0, 3)
    with pytest.raises(ValueError):
        marching_cubes(torch.zeros(1, 4, 4), 0.0)


def test_grid_to_world_matches_official_numpy_rounding():
    rng = np.random.default_rng(0)
    v = (rng.random((1000, 3)) * 512).astype(np.float32)
    grid_size = np.array([513] * 3)
    bmin, bmax = np.array([-1.01] * 3), np.array([1.01] * 3)
    ref = (v / (grid_size - 1) * (bmax - bmin) + bmin).astype(np.float32)
    assert np.array_equal(grid_to_world(torch.from_numpy(v), 512, 1.01).numpy(), ref)


@needs_gpu
def test_cuda_matches_cpu():
    vol = _smooth_noise(48, 2.0, seed=5)
    mask = binary_dilation(np.abs(vol) < 0.6, iterations=1)
    vol[~mask] = np.nan
    t = torch.from_numpy(vol).half()
    vc, fc = marching_cubes(t, -1 / 512, mask=torch.from_numpy(mask))
    vg, fg = marching_cubes(t.cuda(), -1 / 512, mask=torch.from_numpy(mask).cuda())
    assert torch.equal(fg.cpu(), fc)
    assert torch.allclose(torch.nan_to_num(vg.cpu(), 7.0), torch.nan_to_num(vc, 7.0),
                          atol=1e-5)
