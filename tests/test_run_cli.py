"""``turbopart run`` / ``generate`` / ``bench`` end to end on the CPU with tiny random weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from turbopart import cli
from turbopart.xpart import commands


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from turbopart import weights
    d = tmp_path_factory.mktemp("tiny_weights")
    weights.write_random(d, tiny=True)
    return d


@pytest.fixture(autouse=True)
def _xpart_commands(monkeypatch):
    """Register the X-Part commands beside the others (what turbopart.cli will do)."""
    orig = cli._register_product_commands

    def both(sub):
        orig(sub)
        if "generate" not in sub.choices:
            commands.register(sub)
    monkeypatch.setattr(cli, "_register_product_commands", both)


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _check_outputs(out, n_parts=None):
    names = {p.name for p in out.iterdir()}
    assert {"parts.glb", "parts", "exploded.glb", "boxes.glb", "parts.json"} <= names
    info = json.loads((out / "parts.json").read_text())
    parts = [p for p in info["parts"] if p["faces"] > 0]
    assert info["num_parts"] == len(parts) > 0
    if n_parts is not None:
        assert len(info["parts"]) <= n_parts
    for p in parts:
        assert (out / "parts" / f"{p['name']}.glb").is_file()
        assert set(p) >= {"id", "box", "faces", "vertices", "area", "aabb"}
        assert p["vertices"] > 0 and p["area"] > 0
    scene = trimesh.load(out / "parts.glb")
    assert sorted(scene.geometry) == sorted(p["name"] for p in parts)
    exploded = trimesh.load(out / "exploded.glb")
    assert sorted(exploded.geometry) == sorted(scene.geometry)
    boxes = trimesh.load(out / "boxes.glb")
    assert "input" in boxes.geometry
    assert set(info["timings_s"]) >= {"load", "condition", "sampling", "volume_decode",
                                      "marching_cubes", "export"}
    return info


def test_run_end_to_end_shared_mesh(tiny_dir, tmp_path, capsys):
    from conftest import mesh_path
    mesh = mesh_path("robot_expressive.glb")
    out = tmp_path / "out"
    prof = tmp_path / "profile.json"
    code, stdout, err = _run(["run", mesh, "-o", out, "--weights", tiny_dir, "--steps", 3,
                              "--octree-resolution", 64, "--points", 20000, "--prompts", 32,
                              "--max-parts", 2, "--device", "cpu", "--profile", prof, "-q"],
                             capsys)
    assert code == 0, err
    info = _check_outputs(out, n_parts=2)
    assert info["command"] == "run" and info["segmentation"]["parts"] <= 2
    assert info["settings"]["steps"] == 3 and info["settings"]["octree_resolution"] == 64
    assert "segmentation" in info["timings_s"]
    assert json.loads(prof.read_text())["timings_s"]["sampling"] > 0
    assert "wrote" in stdout
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_run_without_mesh_uses_the_example(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ex"
    code, _, err = _run(["run", "-o", out, "--weights", tiny_dir, "--steps", 1,
                         "--octree-resolution", 16, "--points", 2000, "--prompts", 8,
                         "--max-parts", 1, "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    info = _check_outputs(out, n_parts=1)
    assert info["source"] == "example:chair"


def test_run_with_benchmark_boxes(tiny_dir, tmp_path, capsys):
    """--bench-boxes (hidden, for the whole-job benchmark): P3-SAM runs and is timed, X-Part
    generates the given boxes."""
    from turbopart.examples import example_boxes
    boxes = tmp_path / "grid.json"
    boxes.write_text(json.dumps({"boxes": example_boxes()[[0, 1, 2]].tolist()}))
    out = tmp_path / "bench"
    code, _, err = _run(["run", "-o", out, "--weights", tiny_dir, "--steps", 1,
                         "--octree-resolution", 16, "--points", 2000, "--prompts", 8,
                         "--bench-boxes", boxes, "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    info = _check_outputs(out)
    assert [p["box_index"] for p in info["parts"]] == [0, 1, 2]
    assert np.allclose([p["box"] for p in info["parts"]], example_boxes()[[0, 1, 2]])
    assert info["timings_s"]["segmentation"] > 0 and "load_wait" in info["timings_s"]
    assert "--bench-boxes" not in cli.build_parser()._subparsers._group_actions[0].choices[
        "run"].format_help()


def test_generate_with_boxes_json_and_example(tiny_dir, tmp_path, capsys):
    from turbopart.examples import example_boxes, write_example
    mesh = tmp_path / "chair.glb"
    write_example(mesh)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(example_boxes()[[0, 1]].tolist()))
    out = tmp_path / "gen"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    code, _, err = _run(["generate", mesh, "--boxes", boxes, "-o", out, "--weights", tiny_dir,
                         "--steps", 2, "--octree-resolution", 32, "--device", "cpu", "-q"],
                        capsys)
    assert code == 0, err
    info = _check_outputs(out, n_parts=2)
    assert (out / "old.txt").read_text() == "kept"
    assert info["command"] == "generate"
    # the parts.json of a run is accepted as --boxes too (and --max-parts keeps the largest)
    out2 = tmp_path / "gen2"
    code, _, err = _run(["generate", mesh, "--boxes", out / "parts.json", "-o", out2,
                         "--weights", tiny_dir, "--preset", "fast", "--steps", 1,
                         "--octree-resolution", 16, "--max-parts", 1, "--device", "cpu",
                         "-q"], capsys)
    assert code == 0, err
    assert "keeping the 1 largest" in err
    assert len(json.loads((out2 / "parts.json").read_text())["parts"]) == 1


def test_bad_inputs_are_refused_cleanly(tiny_dir, tmp_path, capsys):
    from turbopart.examples import write_example
    bad = tmp_path / "broken.glb"
    bad.write_bytes(b"glTF\x02\x00\x00\x00" + b"\x00" * 5)
    out = tmp_path / "o"
    code, _, err = _run(["run", bad, "-o", out, "--weights", tiny_dir, "--device", "cpu"],
                        capsys)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("turbopart: error:"), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))

    mesh = tmp_path / "chair.glb"
    write_example(mesh)
    for content, needle in (("{not json", "not a JSON"), ("[[1, 2, 3]]", "box 0"),
                            ('{"parts": []}', "no boxes"),
                            ("[[[0, 0, 0], [-1, 1, 1]]]", "max < min")):
        bj = tmp_path / "b.json"
        bj.write_text(content)
        code, _, err = _run(["generate", mesh, "--boxes", bj, "-o", out, "--weights",
                             tiny_dir, "--device", "cpu"], capsys)
        assert code == 2 and needle in err and "Traceback" not in err, err
        assert not out.exists()
    bj.write_text("[[[0, 0, 0], [1, 1, 1]]]")
    code, _, err = _run(["generate", mesh, "--boxes", bj, "-o", out, "--weights",
                         tmp_path / "nowhere"], capsys)
    assert code == 2 and "no such directory" in err


def test_missing_weights_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def not_cached(*a, **k):
        raise FileNotFoundError("not in the cache (test)")
    monkeypatch.delenv("TURBOPART_WEIGHTS", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    code, _, err = _run(["run", "-o", tmp_path / "o", "--device", "cpu"], capsys)
    assert code == 2
    assert "turbopart weights download" in err and "--weights random" in err
    assert not (tmp_path / "o").exists()


def test_read_boxes_formats(tmp_path):
    seg = {"parts": [{"aabb": {"min": [0, 0, 0], "max": [1, 1, 1]}},
                     {"box": [[1, 1, 1], [2, 3, 4]]}]}
    p = tmp_path / "p.json"
    p.write_text(json.dumps(seg))
    b = commands.read_boxes(p)
    assert b.shape == (2, 2, 3) and np.allclose(b[1, 1], [2, 3, 4])
    p.write_text(json.dumps({"boxes": [[[0, 0, 0], [1, 1, 1]]]}))
    assert commands.read_boxes(p).shape == (1, 2, 3)
    kept = commands.limit_boxes(np.array([[[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [3, 3, 3]],
                                          [[0, 0, 0], [2, 2, 2.0]]]), 2)
    assert np.allclose(kept[:, 1, 0], [3, 2])


def test_bench_smoke(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = _run(["bench", "--tiny", "--weights", tiny_dir, "--modes", "fast",
                              "--parts", 8, "--no-segmentation", "--out", out], capsys)
    assert code == 0, err
    rep = json.loads(out.read_text())
    r = rep["modes"]["fast"]
    assert r["startup"]["startup_s"] > r["startup"]["load_s"] > 0
    k8 = r["k8"]
    assert k8["k"] == 8 and len(k8["queries_per_part"]) == k8["parts"]
    assert k8["export_s"] > 0 and k8["dit_step_ms"] > 0
    assert "official K=8" in stdout and "call total" in stdout


def test_write_outputs_without_any_surface(tmp_path):
    """All parts empty (a noise field can give none): boxes.glb and parts.json, no crash."""
    import numpy as np

    from turbopart.examples import example_boxes, example_mesh
    from turbopart.xpart.commands import Output, write_outputs
    from turbopart.xpart.pipeline import GenerationResult, PartResult
    boxes = example_boxes()[:2]
    parts = [PartResult(i, i, boxes[i], None) for i in range(2)]
    result = GenerationResult(parts, np.zeros(3), 1.0)
    out = Output(tmp_path / "o")
    write_outputs(out, result, example_mesh(), boxes, {"parts": []})
    dest = out.commit()
    assert (dest / "boxes.glb").is_file() and (dest / "parts.json").is_file()
    assert not (dest / "parts.glb").exists()
