"""turbopart.mesh: loading (official semantics + clear errors), cleaning, sampling, export."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import trimesh

from conftest import case_path, mesh_path
from turbopart.cli import UserError
from turbopart.mesh import (MeshError, clean_mesh, export_parts_glb, load_mesh,
                            normalize_mesh, normalize_points, part_colors, sample_surface,
                            split_by_label)

OBJ_TRI = b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"


def _err(path) -> str:
    with pytest.raises(MeshError) as info:
        load_mesh(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert isinstance(info.value, UserError)
    return msg


def test_load_errors_are_one_clear_line(tmp_path):
    src = mesh_path("robot_expressive.glb").read_bytes()
    (tmp_path / "trunc.glb").write_bytes(src[: len(src) // 2])
    (tmp_path / "empty.glb").write_bytes(b"")
    (tmp_path / "nan.obj").write_bytes(b"v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "nofaces.obj").write_bytes(b"v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    (tmp_path / "x.fbx").write_bytes(b"abc")
    (tmp_path / "flat.obj").write_bytes(b"v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    assert "truncated or corrupt" in _err(tmp_path / "trunc.glb")
    assert "empty file" in _err(tmp_path / "empty.glb")
    assert "NaN" in _err(tmp_path / "nan.obj")
    assert "no triangle faces" in _err(tmp_path / "nofaces.obj")
    assert "unsupported file type '.fbx'" in _err(tmp_path / "x.fbx")
    assert "no such file" in _err(tmp_path / "missing.glb")
    assert "is a directory" in _err(tmp_path)
    assert "area is zero" in _err(tmp_path / "flat.obj")


def test_load_matches_trimesh_force_mesh():
    for name in ("robot_expressive.glb", "sheen_chair.glb", "table_lamp.glb"):
        p = mesh_path(name)
        ref = trimesh.load(str(p), force="mesh")
        ours = load_mesh(p)
        assert np.array_equal(ours.vertices, ref.vertices)
        assert np.array_equal(ours.faces, ref.faces)


def test_load_matches_golden_inputs():
    from turbopart.golden import load_case
    case = load_case(case_path("automask"))
    m = load_mesh(mesh_path("sheen_chair.glb"))
    assert np.array_equal(m.vertices, case.input("mesh.vertices").numpy())
    assert np.array_equal(m.faces, case.input("mesh.faces").numpy())


def test_xpart_normalize_matches_golden():
    from turbopart.golden import load_case
    case = load_case(case_path("automask_xpart"))
    m, center, scale = normalize_mesh(load_mesh(mesh_path("robot_expressive.glb")))
    assert np.array_equal(m.vertices, case.input("mesh.vertices").numpy())
    assert np.array_equal(center, case.input("xpart_normalize.center").numpy())
    assert scale == float(case.input("xpart_normalize.scale")[0])
    v = np.asarray(m.vertices)
    assert np.isclose(np.max(v.max(0) - v.min(0)), 1.6)


def test_clean_and_sample_match_golden():
    from turbopart.golden import load_case
    for name, rewrap in (("automask", True), ("automask_xpart", False)):
        case = load_case(case_path(name))
        m = trimesh.Trimesh(case.input("mesh.vertices").numpy(),
                            case.input("mesh.faces").numpy(), process=False)
        c = clean_mesh(m, rewrap_process=rewrap)
        assert np.array_equal(c.faces, case.outputs["clean.faces"].numpy())
        assert len(m.faces) == case.input("mesh.faces").shape[0]  # caller's mesh untouched
        n = case.rng("sample_points").shape[0]
        pts, fi = sample_surface(c, n, seed=case.meta["seeds"]["sample_surface"])
        assert pts.dtype == np.float64
        assert np.array_equal(pts, case.rng("sample_points").numpy())
        assert np.array_equal(fi, case.rng("sample_face_index").numpy())
        x, center, scale = normalize_points(pts)
        assert np.array_equal(center, case.outputs["normalize.center"].numpy())
        assert scale == float(case.outputs["normalize.scale"][0])
        assert np.abs(x).max() <= 1.0 + 1e-12


def test_clean_rewrap_variants_differ_on_seams():
    # two triangles sharing an edge whose vertices are duplicated (a UV-like seam)
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], float)
    f = np.array([[0, 1, 2], [3, 5, 4]])
    uv = np.array([[0, 0], [1, 0], [0, 1], [0.5, 0], [0, 0.5], [1, 1]])
    m = trimesh.Trimesh(v, f, visual=trimesh.visual.TextureVisuals(uv=uv), process=False)
    welded = clean_mesh(m, rewrap_process=True)
    kept = clean_mesh(m, rewrap_process=False)
    assert len(welded.vertices) == 4 and len(welded.face_adjacency) == 1
    assert len(kept.vertices) == 6 and len(kept.face_adjacency) == 0


def test_normalize_points_rule():
    p = np.array([[0.0, 0, 0], [2, 1, 0], [1, 4, 2]])
    x, c, s = normalize_points(p)
    assert np.allclose(c, [1, 2, 1]) and s == 2.0
    assert np.allclose(x, (p - c) / (2 + 1e-10))


def test_split_and_export_parts(tmp_path):
    m = load_mesh(mesh_path("robot_expressive.glb"))
    lab = (np.arange(len(m.faces)) % 4) - 1          # -1, 0, 1, 2
    groups = split_by_label(np.asarray(m.vertices), np.asarray(m.faces), lab)
    assert [g[0] for g in groups] == [-1, 0, 1, 2]
    assert sum(len(g[2]) for g in groups) == len(m.faces)
    for label, pv, pf in groups:
        orig = np.asarray(m.vertices)[np.asarray(m.faces)[lab == label]]
        assert np.array_equal(pv[pf], orig)
    out = export_parts_glb(tmp_path / "s.glb", m, lab, part_colors(3))
    data = out.read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    gltf = json.loads(data[20:20 + n])
    names = [nd["name"] for nd in gltf["nodes"]]
    assert names == ["part_000", "part_001", "part_002", "unlabeled"]
    assert [mt["name"] for mt in gltf["materials"]] == names
    scene = trimesh.load_scene(str(out))
    assert sum(len(g.faces) for g in scene.geometry.values()) == len(m.faces)


def test_part_colors_distinct():
    c = part_colors(40)
    assert c.shape == (40, 4) and c.dtype == np.uint8
    assert len({tuple(x) for x in c[:, :3]}) == 40


# --------------------------------------------------------------------------- fast cleaning

def _slow_clean(m, rewrap, monkeypatch):
    monkeypatch.setenv("TURBOPART_FAST_CLEAN", "0")
    try:
        return clean_mesh(m, rewrap_process=rewrap)
    finally:
        monkeypatch.delenv("TURBOPART_FAST_CLEAN")


def _assert_fast_clean_identical(m, monkeypatch, fast_expected=None):
    from turbopart.mesh import _clean_fast
    used = _clean_fast(m) is not None
    if fast_expected is not None:
        assert used == fast_expected
    for rewrap in (True, False):
        ref = _slow_clean(m, rewrap, monkeypatch)
        got = clean_mesh(m, rewrap_process=rewrap)
        assert got.vertices.dtype == ref.vertices.dtype and got.faces.dtype == ref.faces.dtype
        assert np.array_equal(got.vertices, ref.vertices)
        assert np.array_equal(got.faces, ref.faces)
    return used


def _tm(v, f):
    return trimesh.Trimesh(np.asarray(v, float), np.asarray(f), process=False)


def test_fast_clean_is_bit_identical_to_trimesh(monkeypatch):
    ico = trimesh.creation.icosphere(subdivisions=2)
    box = trimesh.creation.box()
    inv = _tm(ico.vertices, ico.faces[:, ::-1])
    tet_v = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, -1, 0], [0, 0, -1]]
    tets = _tm(tet_v, [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3],     # tet 1
                       [1, 4, 0], [5, 1, 0], [4, 5, 0], [5, 4, 1]])    # tet 2 (inverted)
    cases = {  # fast path applies; orientation fixes of every kind
        "sphere": (ico, True), "inverted sphere (one body)": (inv, True),
        "sphere + inverted box": (trimesh.util.concatenate(
            [ico, _tm(box.vertices + 3, box.faces[:, ::-1])]), True),
        "open inverted sphere": (_tm(ico.vertices, ico.faces[:-3, ::-1]), None),
        "tets sharing an edge (non-manifold)": (tets, True),
        "tets sharing an edge + inverted box": (trimesh.util.concatenate(
            [tets, _tm(box.vertices + 5, box.faces[:, ::-1])]), True),
    }
    dup_v = np.vstack([ico.vertices, ico.vertices[:1]])
    dup_f = np.where(ico.faces == 0, len(ico.vertices), ico.faces)
    dup_f[0] = ico.faces[0]
    bad_w = ico.faces.copy()
    bad_w[:5] = bad_w[:5, ::-1]
    cases.update({  # trimesh would merge / drop / re-wind: it runs itself
        "duplicate face": (_tm(ico.vertices, np.vstack([ico.faces, ico.faces[:2]])), False),
        "degenerate face": (_tm(ico.vertices, np.vstack([ico.faces, [[0, 0, 1]]])), False),
        "inconsistent winding": (_tm(ico.vertices, bad_w), False),
        "duplicate vertex (seam)": (_tm(dup_v, dup_f), False),
        "unreferenced vertex": (_tm(np.vstack([ico.vertices, [[9, 9, 9]]]), ico.faces),
                                False),
    })
    for name, (m, fast) in cases.items():
        _assert_fast_clean_identical(m, monkeypatch, fast)
    # the flips really happen (not only "nothing to do")
    assert np.array_equal(clean_mesh(inv).faces, ico.faces)
    rng = np.random.default_rng(0)
    shapes = [ico, box, trimesh.creation.cylinder(radius=0.5, height=1.0, sections=9)]
    for _ in range(8):
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            s = shapes[int(rng.integers(len(shapes)))]
            f = s.faces[:, ::-1] if rng.random() < 0.5 else s.faces
            if rng.random() < 0.3:
                f = f[:-1]
            parts.append(_tm(s.vertices * rng.uniform(0.5, 2) + rng.normal(0, 4, 3), f))
        m = trimesh.util.concatenate(parts)
        _assert_fast_clean_identical(trimesh.Trimesh(m.vertices, m.faces, process=True),
                                     monkeypatch)


@pytest.mark.parametrize("name", ["ai_dragon.glb", "sheen_chair.glb", "robot_expressive.glb",
                                  "table_lamp.glb"])
def test_fast_clean_on_shared_meshes(name, monkeypatch):
    m = load_mesh(mesh_path(name))
    _assert_fast_clean_identical(m, monkeypatch)
    ref = trimesh.load(str(mesh_path(name)), force="mesh")  # the merge skipped on load
    assert np.array_equal(m.vertices, ref.vertices) and np.array_equal(m.faces, ref.faces)


def _glb_json(data: bytes) -> dict:
    magic, version, total = struct.unpack("<4sII", data[:12])
    assert (magic, version, total) == (b"glTF", 2, len(data))
    n = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20:20 + n])


def test_write_glb_round_trip(tmp_path):
    from turbopart.mesh import GlbMesh, write_glb
    rng = np.random.default_rng(0)
    a = GlbMesh.of("part_000", rng.random((50, 3)), rng.integers(0, 50, (80, 3)), (255, 0, 0, 255))
    b = GlbMesh.of("part_001", rng.random((30, 3)) + 2, rng.integers(0, 30, (40, 3)),
                   (0, 128, 255, 255)).moved((0.5, 0, -1))
    out = write_glb(tmp_path / "s.glb", [a, b])
    doc = _glb_json(out.read_bytes())
    assert [n["name"] for n in doc["nodes"]] == ["part_000", "part_001"]
    assert "translation" not in doc["nodes"][0] and doc["nodes"][1]["translation"] == [0.5, 0, -1]
    assert doc["materials"][1]["pbrMetallicRoughness"]["baseColorFactor"] == [0, 128 / 255, 1, 1]
    assert doc["accessors"][0]["min"] == a.vertices.min(0).tolist()
    scene = trimesh.load_scene(str(out))
    for m in (a, b):
        g = scene.geometry[m.name]
        assert np.array_equal(np.asarray(g.vertices, dtype=np.float32), m.vertices)
        assert np.array_equal(g.faces, m.faces)
    tf, _ = scene.graph["part_001"]
    assert np.allclose(tf[:3, 3], [0.5, 0, -1])
    # the same scene through trimesh's exporter: same geometry
    ref = trimesh.load(trimesh.util.wrap_as_stream(scene.export(file_type="glb")),
                       file_type="glb")
    assert sorted(ref.geometry) == ["part_000", "part_001"]


@pytest.mark.parametrize("reserve", [None, 8])
def test_glb_writer_streams_meshes_and_sets_translations_last(tmp_path, reserve):
    """Meshes appended one by one, translations given at close: the same scene as
    write_glb of the moved meshes (a reservation too small for the document moves the
    binary chunk once)."""
    from turbopart.mesh import GlbMesh, GlbWriter, write_glb
    rng = np.random.default_rng(1)
    ms = [GlbMesh.of(f"part_{i:03d}", rng.random((20 + i, 3)), rng.integers(0, 20, (30, 3)),
                     (10 * i, 0, 0, 255)) for i in range(3)]
    w = (GlbWriter.for_meshes(tmp_path / "s.glb", 3) if reserve is None
         else GlbWriter(tmp_path / "s.glb", reserve))
    for m in ms:
        w.add(m)
    moves = {"part_001": (1.0, 2.0, 3.0)}
    data = w.close(moves).read_bytes()
    ref = write_glb(tmp_path / "r.glb", [m.moved(moves[m.name]) if m.name in moves else m
                                          for m in ms]).read_bytes()
    assert _glb_json(data) == _glb_json(ref)
    # the binary chunks are the same bytes
    n, nr = struct.unpack("<I", data[12:16])[0], struct.unpack("<I", ref[12:16])[0]
    assert data[20 + n:] == ref[20 + nr:]
    scene = trimesh.load_scene(str(tmp_path / "s.glb"))
    assert np.array_equal(np.asarray(scene.geometry["part_002"].faces), ms[2].faces)
    tf, _ = scene.graph["part_001"]
    assert np.allclose(tf[:3, 3], [1, 2, 3])


def test_write_glb_too_large(tmp_path, monkeypatch):
    import turbopart.mesh as M
    monkeypatch.setattr(M, "GLB_MAX_BYTES", 1000)
    m = M.GlbMesh.of("p", np.zeros((100, 3)), np.zeros((100, 3), dtype=int))
    with pytest.raises(M.GlbTooLarge):
        M.write_glb(tmp_path / "big.glb", [m])
    assert not (tmp_path / "big.glb").exists()


def test_write_outputs_skips_combined_scenes_past_4_gib(tmp_path, monkeypatch):
    """A combined scene past the GLB limit is skipped with a warning; part files remain."""
    import turbopart.mesh as M
    from turbopart.examples import example_boxes, example_mesh
    from turbopart.xpart.commands import Output, write_outputs
    from turbopart.xpart.pipeline import GenerationResult, PartResult
    boxes = example_boxes()[:2]
    box_mesh = trimesh.creation.box()
    parts = [PartResult(i, i, boxes[i], box_mesh.copy(), color=np.array([9, 9, 9, 255]))
             for i in range(2)]
    one = len(M.write_glb(tmp_path / "one.glb", [M.GlbMesh.of("part_000", box_mesh.vertices,
                                                             box_mesh.faces)]).read_bytes())
    monkeypatch.setattr(M, "GLB_MAX_BYTES", one + 50)
    out = Output(tmp_path / "o")
    write_outputs(out, GenerationResult(parts, np.zeros(3), 1.0), example_mesh(), boxes,
                  {"parts": []})
    dest = out.commit()
    assert (dest / "parts" / "part_000.glb").is_file() and (dest / "parts" / "part_001.glb").is_file()
    assert not (dest / "parts.glb").exists() and not (dest / "exploded.glb").exists()
    ex = trimesh.load_scene(str(dest / "parts" / "part_001.glb"))
    assert len(ex.geometry["part_001"].faces) == 12


def test_part_files_stream_parts_and_offsets_on_close(tmp_path):
    """Parts handed to PartFiles one by one give the part files and both scenes, nodes in
    arrival order, the exploded scene's translations those of explode_offsets."""
    from turbopart.examples import example_boxes
    from turbopart.xpart.commands import Output, PartFiles
    from turbopart.xpart.pipeline import PartResult, explode_offsets
    boxes = example_boxes()[:3]
    parts = [PartResult(i, i, boxes[i], trimesh.creation.box().apply_translation([i, 0, 0]),
                        color=np.array([9, 9, 9, 255])) for i in range(3)]
    parts.insert(1, PartResult(7, 7, boxes[0], None))  # no surface: skipped
    out = Output(tmp_path / "o")
    files = PartFiles(out, 2)  # fewer than arrive: the documents outgrow the reservation
    for p in parts:
        files.add(p)
    files.close()
    dest = out.commit()
    assert sorted(x.name for x in (dest / "parts").iterdir()) == [
        "part_000.glb", "part_001.glb", "part_002.glb"]
    ok = [p for p in parts if p.ok]
    offsets = explode_offsets(ok)
    for name in ("parts.glb", "exploded.glb"):
        doc = _glb_json((dest / name).read_bytes())
        assert [n["name"] for n in doc["nodes"]] == [p.name for p in ok]
        for n in doc["nodes"]:
            want = offsets[n["name"]].tolist() if name == "exploded.glb" else None
            assert n.get("translation") == want
    scene = trimesh.load_scene(str(dest / "exploded.glb"))
    assert np.allclose(scene.geometry["part_002"].vertices, ok[2].mesh.vertices, atol=1e-6)
