"""The official clean-up (export_to_trimesh + fix_mesh) in memory, on hand-made meshes."""
import numpy as np
import pytest
import torch

from conftest import needs_gpu, needs_triton, run_in_triton_interpreter
from turbopart.geometry import cleanup as C
from turbopart.geometry.marching_cubes import grid_to_world, marching_cubes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sheet(n=30, h=0.005, origin=(0.0, 0.0, 0.0)):
    """n×n quads (2n² faces) in the z=const plane, spacing h (normalised units)."""
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    v = np.stack([i * h, j * h, np.zeros_like(i, dtype=float)], -1).reshape(-1, 3)
    v = (v + np.array(origin)).astype(np.float32)
    idx = lambda a, b: a * (n + 1) + b  # noqa: E731
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a, b = a.ravel(), b.ravel()
    f = np.concatenate([np.stack([idx(a, b), idx(a + 1, b), idx(a + 1, b + 1)], 1),
                        np.stack([idx(a, b), idx(a + 1, b + 1), idx(a, b + 1)], 1)])
    return v, f


def _concat(*meshes):
    vs, fs, off = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs).astype(np.float32), np.concatenate(fs).astype(np.int64)


def _t(v, f):
    return torch.from_numpy(np.asarray(v, np.float32)), torch.from_numpy(np.asarray(f, np.int64))


def _th(max_size, ratio=C.SMALL_COMPONENT_RATIO):
    return int(np.float32(np.float32(max_size) * np.float32(ratio)))


def _tri_set(v, f):
    """Faces as a set of coordinate triples (order-independent comparison)."""
    v, f = np.asarray(v), np.asarray(f)
    return {tuple(map(tuple, v[t])) for t in f}


def test_long_sliver_removed_strict_and_loose():
    v, f = _sheet(30)
    # a sliver hanging off the border edge (0,0)-(h,0): its far vertex is 0.05 away
    far = len(v)
    v = np.concatenate([v, [[0.0025, -0.05, 0.0]]]).astype(np.float32)
    f = np.concatenate([f, [[0, far, 31]]])
    vt, ft = _t(v, f)
    sel = C.long_edge_faces(vt, ft)
    assert sel.tolist() == [False] * (len(f) - 1) + [True]
    ov, of = C.official_cleanup(vt, ft, reverse=False)
    assert len(of) == len(f) - 1 and len(ov) == len(v) - 1        # only the sliver goes
    assert _tri_set(ov, of) == _tri_set(v, f[:-1])
    lv, lf = C.official_cleanup(vt, ft, reverse=False, vertex_transfer="loose")
    ring = np.isin(f[:-1], [0, 31]).any(1)                        # 1-ring of its vertices
    assert ring.sum() > 0 and len(lf) == len(f) - 1 - ring.sum()
    assert _tri_set(lv, lf) == _tri_set(v, f[:-1][~ring])


def test_threshold_is_inclusive_and_zero_length_edges_select():
    h = C.MAX_EDGE
    v = np.array([[0, 0, 0], [h, 0, 0], [h / 2, 0.001, 0], [0, 0, 0]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]])                           # edge == threshold; 0-length
    assert C.long_edge_faces(*_t(v, f)).tolist() == [True, True]
    v[1, 0] = np.nextafter(np.float32(h), np.float32(0))
    assert C.long_edge_faces(*_t(v, f[:1])).tolist() == [False]


def test_small_floaters_removed_big_component_kept():
    big = _sheet(30)                                              # 1800 faces
    th = _th(1800)
    assert th == 8 or th == 9
    small = _sheet(3, origin=(0.5, 0.5, 0.2))                     # 18 faces
    small = (small[0], small[1].reshape(2, 9, 3).transpose(1, 0, 2).reshape(18, 3))
    # (faces ordered quad by quad: every prefix is edge-connected)
    f_small = small[1][: th - 1]                                  # th-1 faces: removed
    f_keep = small[1][:th]                                        # exactly th faces: kept
    v, f = _concat(big, (small[0], f_small), (small[0] + 0.3, f_keep))
    st = C.CleanupStats()
    ov, of = C.official_cleanup(*_t(v, f), reverse=False, stats=st)
    assert len(of) == 1800 + th
    assert st.counts["long_edges"][1] == len(f)
    assert st.counts["small_components"][1] == 1800 + th
    assert _tri_set(ov, of) == _tri_set(*big) | _tri_set(small[0] + 0.3, f_keep)
    # unreferenced vertices of the removed floater are gone; order of the rest kept
    assert len(ov) == len(np.unique(of)) and of.max() == len(ov) - 1


def test_ratio_is_relative_to_largest_component():
    """MeshLab: threshold from the largest component, not from the total face count."""
    comps = [_sheet(6, origin=(k * 0.1, 0, 0)) for k in range(10)]   # 10 × 72 faces
    comps.append(_sheet(1, origin=(0, 0.5, 0)))                      # 2 faces
    v, f = _concat(*comps)
    # 0.5 % of the total (722) is 3 faces, but 0.5 % of the largest (72) is 0: nothing goes
    assert _th(72) == 0
    ov, of = C.official_cleanup(*_t(v, f), reverse=False)
    assert len(of) == len(f)


def test_duplicate_vertices_merged_like_trimesh():
    trimesh = pytest.importorskip("trimesh")
    rng = np.random.default_rng(0)
    v = rng.random((40, 3)).astype(np.float32)
    v = np.concatenate([v, v[[3, 7, 7]], v[[5]] + np.float32(2e-9), [[9, 9, 9]]]).astype(np.float32)
    f = rng.integers(0, 44, (80, 3))
    f[:3] = [[40, 41, 42], [43, 1, 2], [3, 40, 5]]
    ref = trimesh.Trimesh(v, f)                                   # default processing
    mv, mf = C.merge_vertices(*C.drop_nonfinite(*_t(v, f)))
    assert np.array_equal(mv.numpy(), ref.vertices.astype(np.float32))
    assert np.array_equal(mf.numpy(), ref.faces)
    assert len(mv) < 44                                           # merged + unreferenced gone


def test_row_groups_wide_spans():
    rng = np.random.default_rng(3)
    base = rng.integers(-2**40, 2**40, (50, 3))
    q = base[rng.integers(0, 50, 400)]
    ids = C._row_groups(torch.from_numpy(q)).numpy()
    _, ref = np.unique(q, axis=0, return_inverse=True)
    # same partition of the rows
    assert len(np.unique(ids)) == len(np.unique(ref.ravel()))
    assert all(len(np.unique(ref.ravel()[ids == g])) == 1 for g in np.unique(ids))


def test_nan_vertices_dropped_with_their_faces():
    trimesh = pytest.importorskip("trimesh")
    v, f = _sheet(4)
    v = v.copy()
    v[[3, 12]] = np.nan
    v[7, 1] = np.inf
    ref = trimesh.Trimesh(v, f)
    dv, df = C.drop_nonfinite(*_t(v, f))
    dv, df = C.merge_vertices(dv, df)
    assert np.array_equal(dv.numpy(), ref.vertices.astype(np.float32))
    assert np.array_equal(df.numpy(), ref.faces)
    assert np.isfinite(dv.numpy()).all() and len(df) < len(f)


def test_repeated_index_faces_removed_at_load():
    f = torch.tensor([[0, 1, 2], [3, 3, 4], [5, 6, 5], [7, 8, 8], [1, 2, 3]])
    assert C.remove_repeated_index_faces(f).tolist() == [[0, 1, 2], [1, 2, 3]]


def test_face_edge_components_nonmanifold_edge_and_vertex_contact():
    # three triangles on one edge (0,1): one component; a fan touching only at vertex 0: apart
    f = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4],
                      [0, 5, 6], [5, 7, 6]])
    for backend in ("torch", "scipy"):
        lab = C.face_components(f, backend)
        assert lab.tolist() == [0, 0, 0, 3, 3]


@pytest.mark.parametrize("seed", [0, 1])
def test_components_torch_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    vol = rng.standard_normal((20, 20, 20)).astype(np.float32)
    _, f = marching_cubes(torch.from_numpy(vol), 0.3)
    f = f[torch.from_numpy(rng.permutation(len(f)))]             # scrambled face order
    a, b = C.face_components(f, "torch"), C.face_components(f, "scipy")
    assert torch.equal(a, b) and len(torch.unique(a)) > 5


_UNION_FIND_SCRIPT = r"""
import numpy as np, torch
from turbopart.geometry import cleanup as C
from turbopart.geometry.components_triton import component_roots
from turbopart.geometry.marching_cubes import marching_cubes
rng = np.random.default_rng(3)
vol = rng.standard_normal((12, 12, 12)).astype(np.float32)
_, f = marching_cubes(torch.from_numpy(vol), 0.3)
f = f[torch.from_numpy(rng.permutation(len(f)))].long()
u, v = C._edge_pairs(f)
ref = C._components_torch(len(f), u, v)
assert torch.equal(component_roots(len(f), u, v), ref)
assert len(torch.unique(ref)) > 3
# a long path given in the worst order, a star, self-pairs, duplicate pairs, isolated nodes
n = 700
path = torch.arange(n - 1, 0, -1)
u = torch.cat([path, torch.full((50,), 650), torch.tensor([5, 5, 9, 9])])
v = torch.cat([path - 1, torch.arange(600, 650), torch.tensor([5, 5, 10, 10])])
assert torch.equal(component_roots(n + 20, u, v), C._components_torch(n + 20, u, v))
assert component_roots(0, u[:0], v[:0]).numel() == 0
print("ok")
"""


@needs_triton
def test_union_find_components_in_interpreter():
    """The union-find kernel gives the PyTorch formulation's labels (interpreter)."""
    run_in_triton_interpreter(_UNION_FIND_SCRIPT, timeout=600)


@needs_gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_union_find_components_on_cuda(seed):
    """The CUDA union-find equals the PyTorch formulation on a foam of ~1 M faces in a
    scrambled order (concurrent links race; the labels may not depend on it)."""
    from turbopart.geometry.components_triton import component_roots
    from turbopart.nn.kernels import disabled
    g = torch.Generator(device="cuda").manual_seed(seed)
    vol = torch.randn(96, 96, 96, generator=g, device="cuda")
    vol = torch.nn.functional.avg_pool3d(vol[None, None], 5, 1, 2)[0, 0]
    _, f = marching_cubes(vol, 0.0)
    f = f[torch.randperm(len(f), generator=g, device="cuda")].long()
    u, v = C._edge_pairs(f)
    ref = C._components_torch(len(f), u, v)
    for _ in range(3):
        assert torch.equal(component_roots(len(f), u, v), ref)
    assert torch.equal(C.face_components(f), ref)
    assert "face_components" not in disabled()


def test_official_part_mesh_end_to_end():
    from scipy.ndimage import binary_dilation
    n = 65
    g = np.stack(np.meshgrid(*[np.linspace(-1.01, 1.01, n)] * 3, indexing="ij"), -1)
    d = np.linalg.norm(g - 0.05, axis=-1)
    logit = np.clip(40 * (0.55 - d), -12, 12)                     # positive inside
    d2 = np.linalg.norm(g - [0.8, 0.8, 0.8], axis=-1)
    logit = np.maximum(logit, np.clip(40 * (0.045 - d2), -12, 12))  # a small floater
    mask = binary_dilation(np.abs(logit) < 0.95, iterations=1)
    grid = logit.astype(np.float16)
    grid[~mask] = np.nan
    st = C.CleanupStats()
    v, f = C.official_part_mesh(torch.from_numpy(grid), torch.from_numpy(mask), stats=st,
                                max_edge=4.0)                     # coarse test grid
    assert st.counts["small_components"][1] < st.counts["long_edges"][1]   # floater gone
    assert np.isfinite(v.numpy()).all()
    r = np.linalg.norm(v.numpy() - 0.05, axis=1)
    assert abs(r.mean() - 0.55) < 0.01
    # outward winding after the official reversal: positive enclosed volume
    a, b, c = (v.numpy()[f.numpy()[:, k]].astype(np.float64) for k in range(3))
    assert np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6 > 0
    # the same through the sparse cell list
    from turbopart.geometry.marching_cubes import cells_from_points
    cells = cells_from_points(torch.from_numpy(np.argwhere(mask)), grid.shape)
    v2, f2 = C.official_part_mesh(torch.from_numpy(grid), cells=cells, max_edge=4.0)
    assert torch.equal(v2, v) and torch.equal(f2, f)


def test_to_trimesh_keeps_arrays():
    v, f = _sheet(3)
    m = C.to_trimesh(*_t(v, f))
    assert np.array_equal(m.vertices, v.astype(np.float64)) and np.array_equal(m.faces, f)
    assert len(m.export(file_type="glb")) > 0


def test_empty_mesh():
    v, f = C.official_cleanup(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))
    assert v.shape == (0, 3) and f.shape == (0, 3)
    v, f = C.official_cleanup(torch.full((3, 3), float("nan")), torch.tensor([[0, 1, 2]]))
    assert f.shape == (0, 3)


def test_matches_pymeshlab_reference():
    """Optional: bit-identical to the official trimesh + pymeshlab chain when installed."""
    pymeshlab = pytest.importorskip("pymeshlab")
    trimesh = pytest.importorskip("trimesh")
    import tempfile
    from scipy.ndimage import binary_dilation, gaussian_filter
    rng = np.random.default_rng(0)
    vol = gaussian_filter(rng.standard_normal((65, 65, 65)).astype(np.float32), 2.0)
    vol /= vol.std()
    mask = binary_dilation(np.abs(vol) < 0.8, iterations=1)
    vol[~mask] = np.nan
    V, F = marching_cubes(torch.from_numpy(vol).half(), C.MC_LEVEL, mask=torch.from_numpy(mask))
    V = grid_to_world(V, 64, 1.01) * 0.5                          # cells below 8/512 mostly
    mesh = trimesh.Trimesh(V.numpy(), F.numpy()[:, ::-1])
    with tempfile.TemporaryDirectory() as tmp:
        mesh.export(f"{tmp}/a.ply")
        ms = pymeshlab.MeshSet()
        ms.load_new_mesh(f"{tmp}/a.ply")
        for sel, kw in (("compute_selection_by_edge_length", {"threshold": 8 / 512}),
                        ("compute_selection_by_small_disconnected_components_per_face",
                         {"nbfaceratio": 0.005})):
            ms.apply_filter(sel, **kw)
            ms.apply_filter("compute_selection_transfer_face_to_vertex", inclusive=False)
            ms.apply_filter("meshing_remove_selected_vertices_and_faces")
        ms.save_current_mesh(f"{tmp}/b.ply")
        ref = trimesh.load(f"{tmp}/b.ply")
    ov, of = C.official_cleanup(V, F)
    assert np.array_equal(ov.numpy(), ref.vertices.astype(np.float32))
    assert np.array_equal(of.numpy(), ref.faces)
