"""The checkpoint layer: layouts, validation, loading, random directories."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbopart import weights
from turbopart.weights import CheckpointError, CheckpointFile, validate

from conftest import MANIFESTS, needs_shared


def test_validate_names_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    found = {"a": (3, 2), "c": (1,), "d": (5,)}
    with pytest.raises(CheckpointError) as err:
        validate(expected, found, "x.safetensors")
    msg = str(err.value)
    assert "missing:     b [4]" in msg
    assert "unexpected:  d [5]" in msg
    assert "wrong shape: a expected [2, 3], found [3, 2]" in msg
    validate(expected, dict(expected), "ok")  # no error


def test_checkpoint_file_safetensors_prefix_and_dtypes(tmp_path):
    path = tmp_path / "p3sam.safetensors"
    save_file({"dit.w": torch.randn(3, 2).to(torch.bfloat16), "dit.b": torch.zeros(3)}, str(path))
    f = CheckpointFile(path, strip_prefix="dit.")
    assert f.shapes == {"w": (3, 2), "b": (3,)}
    assert f.dtypes["w"] == torch.bfloat16
    t = f.load(["w", "b"], "cpu", {"w": torch.float32}, workers=1)
    assert t["w"].dtype == torch.float32 and t["b"].shape == (3,)


def test_checkpoint_file_pickle_is_weights_only(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"dit.x": torch.ones(2)}, "epoch": 3}, good)
    f = CheckpointFile(good, strip_prefix="dit.")
    assert f.shapes == {"x": (2,)}
    assert torch.equal(f.load(["x"])["x"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "obj": Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        CheckpointFile(bad)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        CheckpointFile(path)


@needs_shared
@pytest.mark.parametrize("component", ["p3sam", "model", "shapevae", "conditioner"])
def test_layout_equals_official_manifest(component):
    manifest = json.loads((MANIFESTS / f"{component}.json").read_text())["state_dict"]
    ours = weights.layout(component)
    assert list(ours) == list(manifest) or set(ours) == set(manifest)
    assert {k: list(v) for k, v in ours.items()} == {k: v["shape"] for k, v in manifest.items()}


def _tiny_dir(tmp_path):
    return weights.write_random(tmp_path / "w", tiny=True, seed=1)


def test_random_tiny_dir_checks_and_loads(tmp_path):
    d = _tiny_dir(tmp_path)
    report = weights.check_dir(d)
    assert set(report) == set(weights.COMPONENTS)
    for comp in weights.WEIGHT_COMPONENTS:
        m = weights.load_component(d, comp, numerics="exact")
        assert not any(p.is_meta for p in m.parameters())
    # plain init: biases 0, norm weights 1
    sd = load_file(str(d / "model" / "model.safetensors"))
    biases = [v for k, v in sd.items() if k.endswith("bias")]
    assert biases and all(float(b.float().abs().max()) == 0.0 for b in biases)
    assert sd["final_layer.norm_final.weight"].float().eq(1).all()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    d = _tiny_dir(tmp_path)
    path = d / "shapevae" / "shapevae.safetensors"
    sd = load_file(str(path))
    victim = sorted(sd)[3]
    sd.pop(victim)
    other = "post_kl.weight"
    sd[other] = torch.zeros(sd[other].shape[0] + 1, sd[other].shape[1], dtype=sd[other].dtype)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        weights.check_dir(d)
    assert f"missing:     {victim}" in str(err.value)
    assert f"wrong shape: {other}" in str(err.value)


def test_cli_weights_random_and_check(tmp_path):
    d = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, "-m", "turbopart", *a],
                                    capture_output=True, text=True)
    r = run("weights", "random", "--tiny", "--out", str(d))
    assert r.returncode == 0, r.stderr
    r = run("weights", "check", str(d))
    assert r.returncode == 0, r.stderr
    assert "p3sam" in r.stdout and "ok" in r.stdout
    (d / "p3sam" / "p3sam.safetensors").write_bytes(b"\x00" * 10)
    r = run("weights", "check", str(d))
    assert r.returncode != 0 and "p3sam.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


def test_realistic_init_rule():
    from turbopart.weights import random_state_dict
    plain = random_state_dict("shapevae", weights.tiny_config("shapevae"), seed=3)
    real = random_state_dict("shapevae", weights.tiny_config("shapevae"), seed=3,
                             init="realistic")
    w = real["geo_decoder.query_proj.weight"].float()
    nz = torch.nonzero(w[0]).flatten().tolist()
    assert nz == [28, 36, 44] and torch.allclose(w[0, nz], torch.tensor(100.0))
    assert float(real["geo_decoder.query_proj.bias"][0]) == pytest.approx(-270.0)
    assert real["geo_decoder.output_proj.weight"].float().count_nonzero() == 1
    assert float(real["geo_decoder.output_proj.weight"][0, 0]) == pytest.approx(0.4, abs=2e-3)
    changed = {k for k in plain if not torch.equal(plain[k], real[k])}
    assert changed <= {"geo_decoder.query_proj.weight", "geo_decoder.query_proj.bias",
                       "geo_decoder.cross_attn_decoder.attn.c_proj.weight",
                       "geo_decoder.cross_attn_decoder.mlp.c_proj.weight",
                       "geo_decoder.output_proj.weight", "geo_decoder.output_proj.bias"}


# --------------------------------------------------------------------------- resolution

def _hf_cache(root, src):
    """A Hugging Face hub cache holding ``src`` as tencent/Hunyuan3D-Part at revision main."""
    import shutil
    repo = root / "models--tencent--Hunyuan3D-Part"
    rev = "0" * 40
    shutil.copytree(src, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


def test_resolution_order(tmp_path, monkeypatch):
    d = _tiny_dir(tmp_path)
    cache = _hf_cache(tmp_path / "hub", d)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TURBOPART_WEIGHTS", raising=False)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    assert weights.resolve().resolve() == cache.resolve()          # 3. the HF cache
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv("TURBOPART_WEIGHTS", str(other))
    assert weights.resolve() == other                              # 2. the environment
    assert weights.resolve(d) == d                                 # 1. --weights
    with pytest.raises(CheckpointError, match="no such directory"):
        weights.resolve(tmp_path / "missing")


def test_download_is_opt_in_and_validated(tmp_path, monkeypatch):
    """The download path, offline: snapshot_download served from a local directory."""
    import shutil
    import huggingface_hub
    src = _tiny_dir(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, local_dir=None, local_files_only=False, **kw):
        calls.append((repo_id, local_dir, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        dest = tmp_path / "downloaded" if local_dir is None else local_dir
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("TURBOPART_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match="weights download"):
        weights.resolve()                                          # no silent download
    assert weights.resolve(download=True, progress=False) == tmp_path / "downloaded"
    assert calls[-1] == ("tencent/Hunyuan3D-Part", None, False)
    got = weights.fetch(tmp_path / "local", progress=False)        # turbopart weights download
    assert got == tmp_path / "local" and (got / "model" / "config.json").is_file()
    # a download that arrives incomplete is refused, naming what is wrong
    (src / "shapevae" / "shapevae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shapevae"):
        weights.fetch(tmp_path / "broken", progress=False)
