"""`turbopart segment` end to end on the CPU with tiny random weights, and its refusals."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from conftest import REPO, mesh_path
from turbopart.cli import build_parser, main

try:
    import turbopart.p3sam.predictor  # noqa: F401
    _PREDICTOR_ERROR = None
except Exception as exc:  # the network module is another engineer's; it may be mid-edit
    _PREDICTOR_ERROR = f"turbopart.p3sam.predictor cannot be imported yet: {exc}"

needs_predictor = pytest.mark.skipif(_PREDICTOR_ERROR is not None,
                                     reason=_PREDICTOR_ERROR or "")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from turbopart.weights import write_random
    d = tmp_path_factory.mktemp("tiny_weights")
    write_random(d, tiny=True, components=["p3sam"])
    return d


def _segment(args: list[str]) -> int:
    return main(["segment", *args])


@needs_predictor
def test_segment_end_to_end(tiny_weights, tmp_path, capsys):
    src = mesh_path("robot_expressive.glb")
    out = tmp_path / "out"
    rc = _segment([str(src), "-o", str(out), "--weights", str(tiny_weights),
                   "--points", "20000", "--prompts", "32", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["face_ids.npy", "parts.json",
                                                     "segmented.glb"]
    info = json.loads((out / "parts.json").read_text())
    ids = np.load(out / "face_ids.npy")
    n = info["num_parts"]
    assert n >= 1 and len(info["parts"]) == n
    assert ids.dtype == np.int64 and ids.shape == (info["mesh"]["cleaned"]["faces"],)
    assert ids.min() >= -1 and ids.max() == n - 1
    assert set(np.unique(ids[ids >= 0])) == set(range(n))
    assert sum(p["faces"] for p in info["parts"]) + info["unlabeled_faces"] == ids.size
    assert info["settings"]["points"] == 20000 and info["settings"]["prompts"] == 32
    mesh = trimesh.load(str(src), force="mesh")
    lo, hi = mesh.bounds
    for k, p in enumerate(info["parts"]):
        assert p["id"] == k and p["name"] == f"part_{k:03d}"
        assert p["faces"] == int((ids == k).sum())
        bmin, bmax = np.array(p["aabb"]["min"]), np.array(p["aabb"]["max"])
        assert (bmin >= lo - 1e-9).all() and (bmax <= hi + 1e-9).all() and (bmin <= bmax).all()
    scene = trimesh.load_scene(str(out / "segmented.glb"))
    names = sorted(scene.graph.nodes_geometry)
    expect = [f"part_{k:03d}" for k in range(n)] + (["unlabeled"] if (ids < 0).any() else [])
    assert names == sorted(expect)
    assert sum(len(g.faces) for g in scene.geometry.values()) == ids.size
    assert "robot_expressive.glb: " in capsys.readouterr().out


@needs_predictor
def test_segment_folder_and_max_parts(tiny_weights, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(mesh_path("robot_expressive.glb"), folder / "robot.glb")
    shutil.copy(mesh_path("fandisk_cad.glb"), folder / "fandisk.glb")
    (folder / "notes.txt").write_text("not a mesh")
    out = tmp_path / "out"
    rc = _segment([str(folder), "-o", str(out), "--weights", str(tiny_weights),
                   "--points", "3000", "--prompts", "8", "--max-parts", "2",
                   "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["fandisk", "robot"]
    for stem in ("fandisk", "robot"):
        info = json.loads((out / stem / "parts.json").read_text())
        assert 1 <= info["num_parts"] <= 2


def test_truncated_glb_is_refused_without_traceback(tmp_path):
    src = mesh_path("robot_expressive.glb").read_bytes()
    bad = tmp_path / "bad.glb"
    bad.write_bytes(src[: len(src) // 3])
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "turbopart", "segment", str(bad), "-o",
                           str(out), "--device", "cpu"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("turbopart: error: ") and "bad.glb" in lines[0]
    assert "truncated or corrupt" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n", "NaN"),
    (b"v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no triangle faces"),
])
def test_bad_meshes_are_refused_in_process(tmp_path, capsys, content, needle):
    bad = tmp_path / ("m.obj" if content else "m.glb")
    bad.write_bytes(content)
    out = tmp_path / "out"
    rc = _segment([str(bad), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not out.exists()


def test_unsupported_and_missing_inputs(tmp_path, capsys):
    (tmp_path / "m.fbx").write_bytes(b"x")
    for path, needle in ((tmp_path / "m.fbx", "unsupported file type"),
                         (tmp_path / "nope.glb", "no such file")):
        rc = _segment([str(path), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["segment"].format_help()
    for opt in ("--out", "--weights", "--points", "--prompts", "--threshold",
                "--no-post-process", "--max-parts", "--seed", "--device", "--exact",
                "--fast", "--variant"):
        assert opt in text
    assert "segmented.glb" in text and "parts.json" in text and "face_ids.npy" in text
