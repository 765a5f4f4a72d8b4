"""X-Part preprocessing: SampleMesh / load_surface_points quirks, box membership, part
sampling identical to trimesh sub-meshes, empty boxes dropped (spec xpart §6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from turbopart.xpart import preprocess as pp


def _two_boxes_mesh():
    a = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b = trimesh.creation.box(extents=(0.5, 0.5, 2.0))
    b.apply_translation((2.0, 0.0, 0.0))
    return trimesh.util.concatenate([a, b])


def _reference_part_surfaces(mesh, boxes, n, seed):
    """The official procedure spelled out with trimesh sub-meshes (one per box)."""
    faces = mesh.faces.reshape(-1)
    pts = torch.from_numpy(mesh.vertices[faces])
    aabb = torch.from_numpy(boxes)
    m = torch.all((pts[None] >= aabb[:, :1]) & (pts[None] <= aabb[:, 1:]), dim=-1)
    m = torch.any(m.reshape(len(boxes), -1, 3), dim=-1)
    idx = [torch.nonzero(x).squeeze(-1).numpy() for x in m]
    valid = np.array([len(x) > 0 for x in idx])
    subs = mesh.submesh([x for x in idx if len(x)], append=False)
    out = []
    for part in subs:
        p, fi = trimesh.sample.sample_surface(part, n, seed=seed)
        out.append(np.concatenate([p, part.face_normals[fi], np.zeros((n, 1))], axis=1))
    return np.stack(out), valid


def test_normalization_longest_side():
    m = _two_boxes_mesh()
    c, s = pp.normalization(m.vertices)
    v = pp.normalize_vertices(m.vertices, c, s)
    ext = v.max(0) - v.min(0)
    assert np.isclose(ext.max(), 1.6) and np.allclose((v.max(0) + v.min(0)) / 2, 0, atol=1e-12)
    assert np.allclose(pp.denormalize(v, c, s), m.vertices)
    with pytest.raises(ValueError):
        pp.normalization(np.zeros((4, 3)))


def test_box_membership_any_vertex_closed_box():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5], [6, 5, 5], [5, 6, 5.0]])
    f = np.array([[0, 1, 2], [3, 4, 5]])
    boxes = np.array([
        [[0.9, -0.1, -0.1], [2, 0.1, 0.1]],     # contains only vertex 1 -> face 0
        [[6, 5, 5], [7, 7, 7]],                 # vertex 4 exactly on the min corner
        [[10, 10, 10], [11, 11, 11]],           # empty
    ], dtype=np.float64)
    m = pp.box_face_membership(v, f, boxes)
    assert m.tolist() == [[True, False], [False, True], [False, False]]


@pytest.mark.parametrize("seed,backend", [(42, "numpy"), (7, "numpy"), (42, "torch")])
def test_part_surfaces_identical_to_trimesh_submeshes(seed, backend):
    mesh = _two_boxes_mesh()
    c, s = pp.normalization(mesh.vertices)
    nm, _, _ = pp.normalize_mesh(mesh, c, s)
    boxes = np.array([
        [[-0.5, -0.5, -0.5], [0.0, 0.5, 0.5]],
        [[5, 5, 5], [6, 6, 6]],                  # empty: dropped
        [[0.2, -0.2, -0.9], [0.9, 0.2, 0.9]],
        [[-1, -1, -1], [1, 1, 1]],
    ])
    ours, valid = pp.part_surfaces(nm, boxes, seed, 3000, backend=backend)
    ref, rvalid = _reference_part_surfaces(nm, boxes, 3000, seed)
    assert valid.tolist() == rvalid.tolist() == [True, False, True, True]
    assert ours.dtype == torch.float64 and ours.shape == (3, 3000, 7)
    assert np.array_equal(ours.numpy(), ref)


def test_part_surfaces_on_shared_mesh():
    from conftest import mesh_path
    mesh = trimesh.load(mesh_path("robot_expressive.glb"), force="mesh")
    c, s = pp.normalization(mesh.vertices)
    nm, _, _ = pp.normalize_mesh(mesh, c, s)
    boxes = pp.grid_boxes(np.stack([nm.vertices.min(0), nm.vertices.max(0)]), (2, 2, 1))
    ref, rvalid = _reference_part_surfaces(nm, boxes, 2048, 42)
    for backend in ("numpy", "torch"):
        ours, valid = pp.part_surfaces(nm, boxes, 42, 2048, backend=backend)
        assert np.array_equal(valid, rvalid)
        assert np.array_equal(ours.numpy(), ref)


def test_sample_mesh_quirks():
    mesh = _two_boxes_mesh()
    v, f = mesh.vertices, mesh.faces
    surf = pp.sample_mesh(v, f, seed=42)
    assert surf.dtype == np.float16 and surf.shape == (pp.SAMPLE_NUM, 6)
    # the last face is sampled as a separate "fill" mesh: its share follows its area
    main = trimesh.Trimesh(v, f[:-1])
    fill = trimesh.Trimesh(v, f[-1:])
    num_fill = int(pp.SAMPLE_NUM * fill.area / (main.area + fill.area))
    assert num_fill > 0
    tail = surf[pp.SAMPLE_NUM - num_fill:].astype(np.float64)
    tri = v[f[-1]]
    n = np.cross(tri[1] - tri[0], tri[2] - tri[0])
    n /= np.linalg.norm(n)
    # fill points lie on the last face's plane (up to fp16 rounding)
    assert np.abs((tail[:, :3] - tri[0]) @ n).max() < 2e-3
    # first block = main mesh sampled with sample_surface(seed) then permuted by
    # default_rng(seed).choice
    p, fi = trimesh.sample.sample_surface(main, pp.SAMPLE_NUM - num_fill, seed=42)
    perm = np.random.default_rng(42).choice(len(p), len(p), replace=False)
    exp = np.concatenate([p[perm], main.face_normals[fi][perm]], 1).astype(np.float16)
    assert np.array_equal(surf[:len(p)], exp)


def test_object_surface_samples_only_the_kept_rows_identically():
    """object_surface computes only the 81 920 kept rows of the 249 856 samples; the result
    is bit for bit surface_points(sample_mesh(...)), fill-mesh rows included."""
    mesh = _two_boxes_mesh()
    v, f = mesh.vertices, mesh.faces
    full = pp.sample_mesh(v, f, seed=7)
    rows = np.random.default_rng(7).choice(pp.SAMPLE_NUM, 4096, replace=False)
    main_num = pp._sample_meshes(v, f)[0][1]
    assert (rows >= main_num).any()                 # some kept rows come from the fill
    assert torch.equal(pp.object_surface(v, f, seed=7, n_points=4096),
                       pp.surface_points(full, seed=7, n_points=4096))


def test_surface_points_choice_and_normals():
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.normal(size=(5000, 3)), rng.normal(size=(5000, 3)) * 3],
                         1).astype(np.float16)
    out = pp.surface_points(raw, seed=42, n_points=1000)
    ind = np.random.default_rng(42).choice(5000, 1000, replace=False)
    assert out.dtype == torch.float32 and out.shape == (1000, 7)
    assert torch.equal(out[:, :3], torch.from_numpy(raw[ind, :3].astype(np.float32)))
    assert torch.allclose(out[:, 3:6].norm(dim=1), torch.ones(1000))
    assert torch.all(out[:, 6] == 0)


def test_normalize_boxes_official_float32():
    c = np.array([0.1, 0.2, 0.3])
    s = 1.2345678901
    b = np.array([[[0.123456789, -1.0, 2.0], [1.0, 1.5, 3.0]]])
    f32 = pp.normalize_boxes(b, c, s)
    exp = ((torch.tensor(b).float() - torch.tensor(c).float()) / s).double().numpy()
    assert np.array_equal(f32, exp)
    f64 = pp.normalize_boxes(b, c, s, official_float32=False)
    assert np.array_equal(f64, (b - c) / s)
    with pytest.raises(ValueError):
        pp.normalize_boxes(np.zeros((2, 3)), c, s)


def test_prepare_drops_empty_boxes_and_keeps_order(caplog):
    mesh = _two_boxes_mesh()
    lo, hi = mesh.bounds
    boxes = np.array([
        [[1.8, -1, -2], [3, 1, 2]],          # the tall box
        [[50, 50, 50], [60, 60, 60]],        # empty
        [[-0.6, -0.6, -0.6], [0.6, 0.6, 0.6]],
    ])
    with caplog.at_level("WARNING"):
        prep = pp.prepare(mesh, boxes, seed=3, n_points=1024)
    assert "dropping 1 box" in caplog.text
    assert prep.num_parts == 2 and prep.box_index == [0, 2]
    assert prep.object_surface.shape == (1024, 7)
    assert prep.part_surface.shape == (2, 1024, 7)
    # part 0 samples lie in the tall box (x > 1.75 in the input frame)
    world = pp.denormalize(prep.part_surface[0, :, :3].numpy(), prep.center, prep.scale)
    assert world[:, 0].min() > 1.7
    assert np.allclose(prep.boxes_world(), boxes[[0, 2]], atol=1e-5)
    # the object surface sampled on the worker thread = the precomputed object inputs
    obj = pp.object_inputs(mesh, seed=3, n_points=1024)
    again = pp.prepare(mesh, boxes, seed=3, n_points=1024, obj=obj)
    assert torch.equal(prep.object_surface, obj.surface)
    assert torch.equal(prep.part_surface, again.part_surface)
    assert prep.center.tolist() == obj.center.tolist() and prep.scale == obj.scale


def test_grid_boxes():
    g = pp.grid_boxes(np.array([[0, 0, 0], [2, 3, 4.0]]), (2, 3, 4))
    assert g.shape == (24, 2, 3)
    pad = 4e-4
    assert np.allclose(g[0], [[-pad, -pad, -pad], [1 + pad, 1 + pad, 1 + pad]])
    assert np.allclose(g[-1, 1], [2 + pad, 3 + pad, 4 + pad])
