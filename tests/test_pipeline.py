"""X-Part pipeline: golden sampling parity, generation with tiny random weights, scenes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from conftest import needs_gpu
from turbopart.examples import example_boxes, example_mesh
from turbopart.xpart import pipeline as pl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from turbopart import weights
    d = tmp_path_factory.mktemp("tiny_weights")
    weights.write_random(d, tiny=True, components=["model", "shapevae", "conditioner",
                                                   "scheduler"])
    return d


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return pl.XPartPipeline.from_pretrained(tiny_dir, device="cpu", numerics="fast")


def test_golden_sampling():
    from conftest import case_path
    from turbopart import golden
    path = case_path("sampling")
    case = golden.load_case(path)
    checks = golden.compare(case, golden.run_case(path))
    bad = [(c.name, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert {c.name for c in checks} >= {"final_latents", "grid_logits", "decoded_latents",
                                        "cond.geo_cond", "cond.obj_cond", "timesteps"}
    assert max(c.max_abs for c in checks) < 1e-4


def test_generate_tiny_drops_empty_boxes_and_is_deterministic(pipe):
    mesh = example_mesh("chair")
    boxes = example_boxes("chair")[[0, 1]]
    far = np.array([[[5.0, 5.0, 5.0], [6.0, 6.0, 6.0]]])
    boxes = np.concatenate([boxes[:1], far, boxes[1:]])
    res = pipe(mesh, boxes, steps=2, octree_resolution=16, seed=3, keep_latents=True)
    assert res.dropped_boxes == [1]
    assert [p.box_index for p in res.parts] == [0, 2]
    assert res.counters["queries_per_level"] == [[17 ** 3], [17 ** 3]]
    assert res.settings["ladder"] == [16]
    ok = [p for p in res.parts if p.ok]
    assert ok, "noise fields still give surfaces"
    lo = res.center - 1.01 * res.scale - 1e-6
    hi = res.center + 1.01 * res.scale + 1e-6
    for p in ok:
        v = np.asarray(p.mesh.vertices)
        assert np.all(v >= lo) and np.all(v <= hi)
        assert np.all(np.isfinite(v))
        assert p.raw_faces >= len(p.mesh.faces) > 0
        # the area summed on the device during clean-up is the mesh's own area
        assert p.info()["area"] == pytest.approx(float(p.mesh.area), rel=1e-5)
    vol = pipe.volumes(res.latents, 16)
    assert vol.grid.shape == (2, 17, 17, 17) and vol.mask is None
    again = pipe(mesh, boxes, steps=2, octree_resolution=16, seed=3, keep_latents=True)
    assert torch.equal(res.latents, again.latents)
    for a, b in zip(res.parts, again.parts):
        assert np.array_equal(a.mesh.vertices, b.mesh.vertices)


def test_parts_finished_beside_decoding_match_inline(pipe, monkeypatch):
    """Finishing each part on the worker thread gives the parts of finishing it in the
    decoding thread, in order, and hands each to ``on_part`` once, in order."""
    monkeypatch.setattr(pl, "FINISH_THREAD_MIN_FACES", 0)  # tiny parts: threaded too
    mesh = example_mesh("chair")
    boxes = example_boxes("chair")[:3]
    seen = []
    res = pipe(mesh, boxes, steps=2, octree_resolution=16, seed=5, on_part=seen.append)
    assert [p.index for p in seen] == [p.index for p in res.parts] == [0, 1, 2]
    assert all(a is b for a, b in zip(seen, res.parts))
    monkeypatch.setenv("TURBOPART_FINISH_THREAD", "0")
    inline = pipe(mesh, boxes, steps=2, octree_resolution=16, seed=5)
    assert res.counters["faces"] == inline.counters["faces"]
    for a, b in zip(res.parts, inline.parts):
        assert a.ok == b.ok
        if a.ok:
            assert np.array_equal(a.mesh.vertices, b.mesh.vertices)
            assert np.array_equal(a.mesh.faces, b.mesh.faces)
    assert "finish_wait" in res.timings and "cleanup" in res.timings


def test_part_finisher_order_errors_and_memory_fallback(monkeypatch):
    import threading
    main = threading.get_ident()
    with pl.PartFinisher("cpu", threaded=True) as fin:
        for i in range(4):
            fin.submit(lambda i: (i, threading.get_ident()), i)
        out = fin.results()
    assert [i for i, _ in out] == [0, 1, 2, 3] and all(t != main for _, t in out)
    # a part whose finishing needs more than half the free memory runs in this thread
    with pl.PartFinisher("cpu", threaded=True) as fin:
        fin.submit(lambda: threading.get_ident(), num_faces=1 << 60)
        assert fin.results() == [main]
    # so does a small part
    with pl.PartFinisher("cpu", threaded=True) as fin:
        fin.submit(lambda: threading.get_ident(), num_faces=pl.FINISH_THREAD_MIN_FACES - 1)
        assert fin.results() == [main]

    def boom():
        raise ValueError("part failed")
    with pytest.raises(ValueError, match="part failed"):
        with pl.PartFinisher("cpu", threaded=True) as fin:
            fin.submit(boom)
            fin.results()


def test_no_faces_and_too_many_parts(pipe):
    mesh = example_mesh("lamp")
    with pytest.raises(ValueError, match="no box contains"):
        pipe(mesh, np.array([[[9, 9, 9], [10, 10, 10.0]]]), steps=1, octree_resolution=16)
    big = np.repeat(np.asarray(mesh.bounds)[None], pipe.max_parts + 1, axis=0)
    with pytest.raises(ValueError, match="at most"):
        pipe(mesh, big, steps=1, octree_resolution=16)


def test_query_adapter_selects_parts(pipe):
    vae = pipe.vae
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, vae.num_latents, vae.embed_dim, generator=g)
    kv = vae.geo_decoder.precompute_kv(pipe.decode_latents(lat))
    q = pipe._query_fn(kv)
    pts = torch.rand(1, 50, 3, generator=g) * 2 - 1
    full = q(pts, [0, 1, 2])
    assert full.shape == (3, 50)
    assert torch.allclose(q(pts, [2, 0]), full[[2, 0]], atol=1e-6, rtol=0)
    assert torch.allclose(q(pts, [1]), full[1:2], atol=1e-6, rtol=0)


def _part(i, center, size=0.1):
    m = trimesh.creation.box(extents=(size, size, size))
    m.apply_translation(center)
    return pl.PartResult(i, i, np.stack([m.bounds[0], m.bounds[1]]), m, [1], 12,
                         np.array([10 * i, 20, 30, 255], dtype=np.uint8))


def _node_offsets(scene):
    return {n: scene.graph[n][0][:3, 3] for n in scene.graph.nodes_geometry}


def test_explode_moves_parts_outward():
    parts = [_part(0, (1.0, 0, 0)), _part(1, (-1.0, 0, 0)), _part(2, (0, 2.0, 0))]
    off = _node_offsets(pl.explode(parts, 0.2))
    centers = np.array([p.mesh.vertices.mean(0) for p in parts])
    g = centers.mean(0)
    for p, c in zip(parts, centers):
        d = (c - g) / np.linalg.norm(c - g)
        assert np.allclose(off[p.name], 0.2 * d)
    # one part: nothing moves
    one = _node_offsets(pl.explode(parts[:1]))
    assert np.allclose(one["part_000"], 0)
    # a part at the common centre: deterministic unit fallback direction
    sym = [_part(0, (1.0, 0, 0)), _part(1, (-1.0, 0, 0)), _part(2, (0, 0, 0))]
    a = _node_offsets(pl.explode(sym))
    b = _node_offsets(pl.explode(sym))
    assert np.isclose(np.linalg.norm(a["part_002"]), 0.2)
    assert np.allclose(a["part_002"], b["part_002"])


def test_scenes_named_nodes_and_boxes():
    parts = [_part(0, (0, 0, 0)), _part(1, (1, 0, 0))]
    parts.append(pl.PartResult(2, 5, parts[0].box, None))
    scene = pl.parts_scene(parts)
    assert sorted(scene.graph.nodes_geometry) == ["part_000", "part_001"]
    data = scene.export(file_type="glb")
    back = trimesh.load(trimesh.util.wrap_as_stream(data), file_type="glb")
    assert sorted(back.geometry) == ["part_000", "part_001"]
    bs = pl.boxes_scene(example_mesh("lamp"), [p.box for p in parts], [p.color for p in parts])
    assert "input" in bs.geometry and "box_002" in bs.geometry
    assert len(bs.export(file_type="glb")) > 0
    outline = pl.box_outline(np.array([[0, 0, 0], [1, 2, 3.0]]))
    assert np.allclose(outline.bounds, [[0, 0, 0], [1, 2, 3]])


def test_presets_and_edge_threshold():
    assert pl.PRESETS["quality"] == {"steps": 50, "octree_resolution": 512}
    assert pl.edge_threshold(512) == 8 / 512
    assert pl.edge_threshold(1024) == 8 / 512
    assert pl.edge_threshold(64) == 8 / 64


@needs_gpu
@pytest.mark.parametrize("numerics", ["exact", "fast"])
def test_generate_tiny_on_gpu(tiny_dir, numerics):
    p = pl.XPartPipeline.from_pretrained(tiny_dir, device="cuda", numerics=numerics)
    res = p(example_mesh("chair"), example_boxes("chair")[:3], steps=3,
            octree_resolution=256, keep_latents=True)
    assert len(res.parts) == 3 and res.latents.is_cuda
    assert all(len(q) == 2 for q in res.counters["queries_per_level"])
    assert any(part.ok for part in res.parts)


def test_load_time_warm_up_runs_and_changes_nothing(tiny_dir, pipe):
    # warm_up=True forces the load-time conditioner pass (default: off; opt-in on CUDA)
    warm = pl.XPartPipeline.from_pretrained(tiny_dir, device="cpu", numerics="fast",
                                            warm_up=True)
    assert warm.load_timings.get("conditioner_on_loaded", 0.0) > 0.0
    assert "model_on_loaded" in warm.load_timings                   # the hook ran for every one
    assert not any(k.endswith("_on_loaded") for k in pipe.load_timings)  # off by default
    mesh = example_mesh("chair")
    boxes = example_boxes("chair")[[0, 1]]
    a = pipe(mesh, boxes, steps=2, octree_resolution=16, seed=5, keep_latents=True)
    b = warm(mesh, boxes, steps=2, octree_resolution=16, seed=5, keep_latents=True)
    assert torch.equal(a.latents, b.latents)
