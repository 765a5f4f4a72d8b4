"""turbopart.runtime.first_use: the background warm-up of library first-use costs."""
from __future__ import annotations

import pytest
import torch

from turbopart.runtime import first_use


def test_off_on_cpu_and_by_switch(monkeypatch):
    assert first_use.start("cpu") is None
    monkeypatch.setenv("TURBOPART_FIRST_USE", "0")
    assert not first_use.enabled()
    assert first_use.start("cuda") is None


def test_work_never_raises(monkeypatch):
    """A failing CUDA warm-up is swallowed; the Triton part still runs (or is skipped)."""
    def boom(device):
        raise RuntimeError("no GPU here")
    monkeypatch.setattr(first_use, "_cuda", boom)
    first_use._work(torch.device("cuda"))


def test_geometry_warm_up_meshes_a_sphere(monkeypatch):
    """The geometry warm-up runs the real ladder's bookkeeping, marching cubes and clean-up
    (CPU here, at a small octree) and leaves no state behind."""
    from turbopart.geometry import cleanup
    seen = []
    real = cleanup.official_cleanup

    def spy(v, f, **kw):
        out = real(v, f, **kw)
        seen.append(out[1].shape[0])
        return out
    monkeypatch.setattr(cleanup, "official_cleanup", spy)
    first_use.geometry_kernels(torch.device("cpu"), octree_resolution=256)
    assert len(seen) == 1 and seen[0] > 100  # a closed sphere of radius 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_thread_finishes_on_cuda():
    t = first_use.start("cuda")
    assert t is not None
    t.join(120)
    assert not t.is_alive()
    from turbopart.nn.kernels import decoder_triton as kern
    assert "fourier" not in kern.disabled()


def test_hold_defers_the_decoder_and_geometry_warm_ups(monkeypatch):
    import threading
    ran = []
    monkeypatch.setattr(first_use, "_cuda", lambda d: ran.append("cuda"))
    monkeypatch.setattr(first_use, "_triton", lambda: ran.append("triton"))
    monkeypatch.setattr(first_use, "prompt_kernels", lambda d: ran.append("prompts"))
    monkeypatch.setattr(first_use, "decoder_kernels", lambda d: ran.append("decoder"))
    monkeypatch.setattr(first_use, "geometry_kernels", lambda d: ran.append("geometry"))
    hold = threading.Event()
    t = threading.Thread(target=first_use._work, args=(torch.device("cuda"), hold))
    t.start()
    t.join(0.3)
    assert t.is_alive() and ran == ["cuda", "triton", "prompts"]
    hold.set()
    t.join(10)
    assert not t.is_alive() and ran == ["cuda", "triton", "prompts", "decoder", "geometry"]
