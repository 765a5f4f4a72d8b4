"""Start-up: the sequential checkpoint reader, the read-ahead helper and its profile, the
CLI hook, lazy imports and the P3-SAM tile default (GPU paths: benchmarks/bench_startup.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from turbopart import _LazyModule, _lazy_import, weights
from turbopart.runtime import loading as L
from turbopart.runtime import prefetch as P
from turbopart.weights import CheckpointError

from conftest import REPO


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No read-ahead, profile or cache outside tmp_path."""
    monkeypatch.setenv("TURBOPART_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TURBOPART_STARTUP_PROFILE", str(tmp_path / "cache" / "profile.json"))
    monkeypatch.delenv("TURBOPART_LOADER", raising=False)
    monkeypatch.delenv("TURBOPART_PREFETCH", raising=False)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 53, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(53, generator=g),
        "b.idx": torch.randint(-5, 5, (7, 3), generator=g),
        "b.mask": torch.rand(11, generator=g) > 0.5,
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4),
        "d.big": torch.randn(300, 40, generator=g),
        "d.half": torch.randn(17, generator=g).half(),
        "e.skip": torch.randn(1000, generator=g),  # not requested: a gap
    }


# --------------------------------------------------------------------------- plan

@pytest.mark.parametrize("chunk,gap", [(64, 0), (100, 16), (1 << 20, 1 << 20), (7, 1000)])
def test_plan_chunks_places_every_byte_once(chunk, gap):
    g = torch.Generator().manual_seed(chunk)
    spans, pos = [], 0
    for i in range(40):
        pos += int(torch.randint(0, 50, (1,), generator=g))
        n = int(torch.randint(0, 120, (1,), generator=g))
        spans.append((pos, pos + n, f"t{i}"))
        pos += n
    plan = L.plan_chunks(spans, chunk, gap)
    seen = {k: [] for _, _, k in spans}
    last = -1
    for start, end, pieces in plan:
        assert start >= last and 0 < end - start <= chunk
        last = end
        for key, off, toff, n in pieces:
            assert 0 <= off and off + n <= end - start and n > 0
            seen[key].append((toff, start + off, n))
    for b, e, k in spans:
        got = sorted(seen[k])
        assert sum(n for _, _, n in got) == e - b
        pos_t = 0
        for toff, fpos, n in got:  # contiguous, right file bytes
            assert toff == pos_t and fpos == b + toff
            pos_t += n


# --------------------------------------------------------------------------- reader

@pytest.mark.parametrize("workers", [1, 3])
def test_sequential_reader_equals_safetensors(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(L, "CHUNK", 256)   # many reads, tensors split across them
    monkeypatch.setattr(L, "GAP", 64)
    path = tmp_path / "x.safetensors"
    ref = _tensors()
    save_file(ref, str(path))
    _, index = P.safetensors_index(path)
    keys = [k for k in ref if k != "e.skip"]
    dtypes = {"a.weight": torch.float32, "b.idx": torch.float32, "d.half": torch.float32}
    r = L.SafetensorsReader(path, {k: index[k] for k in keys}, "cpu", dtypes,
                            workers=workers).start()
    out = r.result()
    assert list(out) == keys
    for k in keys:
        want = ref[k]
        if k in ("a.weight", "d.half"):
            want = want.float()
        assert out[k].dtype == want.dtype and out[k].shape == want.shape, k
        assert torch.equal(out[k], want), k
    assert r.bytes_read >= sum(ref[k].numel() * ref[k].element_size() for k in keys)


def test_safetensors_index_agrees_and_rejects_bad_files(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    start, index = P.safetensors_index(path)
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            dt, shape, b, e = index[k]
            assert list(shape) == f.get_slice(k).get_shape() and dt == f.get_slice(k).get_dtype()
            t = f.get_tensor(k)
            assert e - b == t.numel() * t.element_size()
            if t.numel():
                assert raw[b:e] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    for bad in (raw[:5], raw[:start - 3], raw[:-8]):
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            P.safetensors_index(path)


def test_load_component_sequential_equals_mmap(tmp_path, monkeypatch):
    d = weights.write_random(tmp_path / "w", tiny=True, seed=5)
    for comp in weights.WEIGHT_COMPONENTS:
        for num in ("exact", "fast"):
            monkeypatch.setenv("TURBOPART_LOADER", "sequential")
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback taken
                a = weights.load_component(d, comp, numerics=num, workers=3).state_dict()
            monkeypatch.setenv("TURBOPART_LOADER", "mmap")
            b = weights.load_component(d, comp, numerics=num).state_dict()
            assert list(a) == list(b)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (comp, num, k)


def test_loader_mode_defaults(monkeypatch):
    monkeypatch.delenv("TURBOPART_LOADER", raising=False)
    assert L.loader_mode("cuda") == "mmap" and L.loader_mode("cpu") == "mmap"
    monkeypatch.setenv("TURBOPART_LOADER", "mmap")
    assert L.loader_mode("cuda") == "mmap"
    monkeypatch.setenv("TURBOPART_LOADER", "sequential")
    assert L.loader_mode("cpu") == "sequential"


def test_reader_failure_falls_back_loudly(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    ref = _tensors()
    save_file(ref, str(path))
    monkeypatch.setenv("TURBOPART_LOADER", "sequential")

    def broken(self, fd, buf, start, end):
        raise OSError("simulated read error")
    monkeypatch.setattr(L.SafetensorsReader, "_read", broken)
    f = weights.CheckpointFile(path)
    with pytest.warns(RuntimeWarning, match="sequential reader failed"):
        out = f.load(list(ref), "cpu", workers=2)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_validation_error_still_names_every_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOPART_LOADER", "sequential")
    d = weights.write_random(tmp_path / "w", tiny=True, seed=2)
    path = d / "shapevae" / "shapevae.safetensors"
    sd = load_file(str(path))
    sd["post_kl.weight"] = torch.zeros(sd["post_kl.weight"].shape[0] + 1,
                                       sd["post_kl.weight"].shape[1])
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="wrong shape: post_kl.weight"):
        weights.load_component(d, "shapevae")
    # a file that is valid for the layout but truncated on disk
    sd = load_file(str(d / "p3sam" / "p3sam.safetensors"))
    save_file(sd, str(d / "p3sam" / "p3sam.safetensors"))
    raw = (d / "p3sam" / "p3sam.safetensors").read_bytes()
    (d / "p3sam" / "p3sam.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError):
        weights.load_component(d, "p3sam")


# --------------------------------------------------------------------------- prefetch

@pytest.mark.parametrize("tiny", [True, False])
def test_unused_rules_match_the_builders(tiny):
    """prefetch.UNUSED names exactly the keys skip_unused drops (tiny and full size)."""
    for comp in weights.WEIGHT_COMPONENTS:
        cfg = weights.tiny_config(comp) if tiny else None
        full = weights.layout(comp, cfg)
        lean = weights.build(comp, cfg, skip_unused=True).state_dict()
        prefix = P.STRIP_PREFIX.get(comp, "")
        assert prefix == weights.COMPONENTS[comp].strip_prefix
        for k in full:
            assert P.needed(comp, prefix + k) == (k in lean), (comp, k)


def test_weight_ranges_cover_the_loaded_tensors(tmp_path):
    d = weights.write_random(tmp_path / "w", tiny=True, seed=1)
    plan = dict(P.weight_ranges(d, ["p3sam", "shapevae", "conditioner", "model"]))
    for comp in weights.WEIGHT_COMPONENTS:
        path = str(P.component_file(d, comp))
        _, index = P.safetensors_index(path)
        lean = weights.build(comp, weights.read_config(d / comp, comp),
                             skip_unused=True).state_dict()
        prefix = P.STRIP_PREFIX.get(comp, "")
        for k in lean:
            _, _, b, e = index.get(prefix + k) or index[k]  # official files: "dit." keys
            assert any(rb <= b and e <= re_ for rb, re_ in plan[path]), (comp, k)


def test_find_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("TURBOPART_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert P.find_weights(None) is None
    snap = tmp_path / "hub" / "models--tencent--Hunyuan3D-Part" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc\n")
    assert P.find_weights(None) == snap
    monkeypatch.setenv("TURBOPART_WEIGHTS", str(tmp_path))
    assert P.find_weights(None) == tmp_path
    assert P.find_weights(str(tmp_path / "nope")) is None
    assert P.find_weights("random") is None  # not built yet
    rnd = P.random_weights_dir("plain")
    rnd.mkdir(parents=True)
    (rnd / ".complete").write_text("x")
    assert P.find_weights("random:plain") == rnd


def test_prefetch_helper_reads_the_planned_bytes(tmp_path, monkeypatch):
    d = weights.write_random(tmp_path / "w", tiny=True, seed=1)
    log = tmp_path / "prefetch.json"
    monkeypatch.setenv("TURBOPART_PREFETCH_LOG", str(log))
    monkeypatch.setenv("TURBOPART_PREFETCH", "weights")
    comps = P.COMMAND_COMPONENTS["run"]
    h = P.start(d, comps, record=False)
    assert h is not None
    assert h.wait(60) == 0
    stats = json.loads(log.read_text())
    planned = sum(e - b for _, rng in P.weight_ranges(d, comps) for b, e in rng)
    assert stats["planned_bytes"]["weights"] == planned > 0
    assert stats["weights_first"]["bytes"] + stats["weights"]["bytes"] == planned
    first = P.weight_ranges(d, comps[:1])[0][1]
    assert stats["weights_first"]["bytes"] == sum(e - b for b, e in first) > 0
    assert stats["planned_bytes"]["libs"] == 0
    # libs: the recorded profile only, the weights are left to the process
    prof = tmp_path / "profile.json"
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"z" * 20000)
    prof.write_text(json.dumps({"version": 1, "ready": True, "files": {str(lib): {
        "key": P._file_key(str(lib)), "ranges": [[0, 8192]], "later": [[8192, 20000]],
        "order": 0, "kind": "lib"}}}))
    monkeypatch.setenv("TURBOPART_STARTUP_PROFILE", str(prof))
    monkeypatch.setenv("TURBOPART_PREFETCH", "libs")
    h = P.start(d, comps, record=False)
    assert h is not None and h.wait(60) == 0
    stats = json.loads(log.read_text())
    assert stats["planned_bytes"] == {"weights": 0, "libs": 8192, "later": 20000 - 8192}
    monkeypatch.setenv("TURBOPART_PREFETCH", "0")
    assert P.start(d, comps) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap")
def test_profile_records_pages_and_drops_changed_files(tmp_path):
    snap = P.snapshot()
    libs = {k: v for k, v in snap.items() if v["kind"] == "lib"}
    mods = {k: v for k, v in snap.items() if v["kind"] == "module"}
    assert libs and mods
    assert not any(k.endswith(".safetensors") for k in snap)
    for path, ent in libs.items():
        assert ent["key"][0] == os.path.getsize(path)
        assert all(0 <= b < e <= ent["key"][0] for b, e in ent["ranges"])
    prof = tmp_path / "cache" / "profile.json"
    rec = P._Recorder()
    rec.enabled = True
    rec.mark_ready()
    assert rec.ready  # no profile yet: the start-up pages are noted
    rec.write()
    assert json.loads(prof.read_text())["ready"] is True
    data = json.loads(prof.read_text())["files"]
    assert set(libs) <= set(data)
    assert any(v["ranges"] for v in data.values())
    for v in data.values():  # later pages exclude the start-up pages
        assert P.subtract_ranges(v["later"], v["ranges"]) == v["later"]
    # a file that changed since is ignored
    victim = tmp_path / "lib.so"
    victim.write_bytes(b"x" * 10000)
    data[str(victim)] = {"key": P._file_key(str(victim)), "ranges": [[0, 4096]],
                         "order": 0, "kind": "lib", "later": []}
    prof.write_text(json.dumps({"version": 1, "files": data}))
    assert str(victim) in P.load_profile(prof)
    time.sleep(0.01)
    victim.write_bytes(b"y" * 20000)
    counts = [0, 0]
    assert str(victim) not in P.load_profile(prof, counts=counts)
    assert counts[0] == counts[1] - 1


def test_range_helpers():
    assert P.merge_ranges([(10, 20), (0, 5), (6, 8), (30, 31)], 1) == [[0, 8], [10, 20],
                                                                       [30, 31]]
    a = [[0, 10], [20, 30], [40, 50]]
    assert P.subtract_ranges(a, [[5, 25], [45, 46]]) == [[0, 5], [25, 30], [40, 45], [46, 50]]
    assert P.subtract_ranges(a, []) == a and P.subtract_ranges(a, [[0, 100]]) == []
    assert P.subtract_ranges([[0, 10]], [[2, 3], [4, 5]]) == [[0, 2], [3, 4], [5, 10]]


def test_read_ahead_modes():
    assert P.mode() == "all"  # unset: the default
    for value, want in (("0", "off"), ("libs", "libs"), ("weights", "weights"), ("1", "all")):
        os.environ["TURBOPART_PREFETCH"] = value
        try:
            assert P.mode() == want
        finally:
            del os.environ["TURBOPART_PREFETCH"]


def test_cli_hook_starts_the_read_ahead_for_model_commands(tmp_path, monkeypatch):
    from turbopart import cli
    calls = []
    monkeypatch.setattr(P, "start", lambda w, c, **kw: calls.append((w, tuple(c))) or "h")
    d = tmp_path / "w"
    d.mkdir()
    assert cli._early_prefetch(["run", "m.glb", "-o", "out", "--weights", str(d)]) == "h"
    assert calls[-1] == (d, P.COMMAND_COMPONENTS["run"])
    assert cli._early_prefetch(["segment", "m.glb", f"--weights={d}", "-o", "o"]) == "h"
    assert calls[-1] == (d, ("p3sam",))
    monkeypatch.setenv("TURBOPART_WEIGHTS", str(d))
    assert cli._early_prefetch(["generate", "m.glb", "--boxes", "b.json", "-o", "o"]) == "h"
    assert calls[-1] == (d, P.COMMAND_COMPONENTS["generate"])
    n = len(calls)
    for argv in (["weights", "check", str(d)], ["golden", "x"], ["run", "--help"], []):
        assert cli._early_prefetch(argv) is None
    assert len(calls) == n


def test_cli_process_prefetches_and_records_a_profile(tmp_path):
    """`python -m turbopart segment` on tiny weights: the helper runs, the profile appears."""
    d = weights.write_random(tmp_path / "w", tiny=True, seed=1)
    env = dict(os.environ, TURBOPART_CACHE=str(tmp_path / "cache"),
               TURBOPART_STARTUP_PROFILE=str(tmp_path / "cache" / "p.json"),
               TURBOPART_PREFETCH_LOG=str(tmp_path / "log.json"), TURBOPART_PREFETCH="all",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "turbopart", "segment", str(tmp_path / "no.glb"),
                        "-o", str(tmp_path / "out"), "--weights", str(d)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "no.glb" in r.stderr  # the command itself refuses the mesh
    if sys.platform.startswith("linux"):
        assert (tmp_path / "cache" / "p.json").is_file()


# --------------------------------------------------------------------------- imports

def test_model_modules_import_without_trimesh_scipy_or_dynamo():
    code = ("import sys, torch\n"
            "import turbopart.xpart.pipeline, turbopart.p3sam.segmenter, turbopart.weights\n"
            "from turbopart import weights as W\n"
            "for c in ('p3sam', 'model', 'shapevae', 'conditioner'):\n"
            "    W.build(c, W.tiny_config(c), skip_unused=True); W.layout(c, W.tiny_config(c))\n"
            "print([m for m in ('trimesh', 'scipy', 'networkx', 'torch._dynamo', 'triton')\n"
            "       if m in sys.modules])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = eval(r.stdout.strip().splitlines()[-1])
    assert not ({"trimesh", "scipy", "networkx", "torch._dynamo"} & set(loaded)), loaded


def test_lazy_module():
    import json as js
    assert _lazy_import("json") is js
    name = "turbopart_test_lazy_mod"
    mod = _LazyModule(name)
    sys.modules.pop(name, None)
    with pytest.raises(ModuleNotFoundError):
        mod.anything
    lazy = _LazyModule("json")
    assert lazy.dumps([1]) == "[1]" and "dumps" in dir(lazy)


# --------------------------------------------------------------------------- P3-SAM tiles

def test_p3sam_tiles_fixed_by_default(monkeypatch):
    from turbopart.p3sam import predictor as pr
    monkeypatch.delenv("TURBOPART_P3SAM_TUNE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not pr.tune_default() and not pr._TritonPairs().tune
    assert pr._TritonPairs(tune=True).tune and not pr._TritonPairs(tune=False).tune
    monkeypatch.setenv("TURBOPART_P3SAM_TUNE", "1")
    assert pr.tune_default() and pr._TritonPairs().tune
    # the H100 winners, each a valid candidate shape for its kernel
    h100 = pr.FIXED_CONFIGS[(9, 0)]
    assert h100[(False, 3, 512, False)] == pr.KernelConfig(64, 512, 32, 64, 8, 3)
    assert h100[(False, 3, 256, True)] == pr.KernelConfig(128, 256, 64, 64, 8, 3)
    assert h100[(True, 1, 256, True)] == pr.KernelConfig(128, 0, 64, 128, 8, 3)
    for (max_mode, _, d, _), c in h100.items():
        assert d % c.bk == 0 and (d % c.bn3 == 0 if max_mode else d % c.bn == 0)
    assert pr.fixed_config(False, 3, 512, False, "cpu", torch.bfloat16) is None


def test_profile_lists_sources_of_modules_without_bytecode(tmp_path, monkeypatch):
    """Without .pyc files (PYTHONDONTWRITEBYTECODE) the import reads the source: listed."""
    import importlib
    (tmp_path / "tp_no_pyc_mod.py").write_text("X = 1\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("tp_no_pyc_mod")
    try:
        assert not os.path.exists(mod.__cached__)
        assert mod.__file__ in P._module_files()
    finally:
        sys.modules.pop("tp_no_pyc_mod", None)
