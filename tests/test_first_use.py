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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_thread_finishes_on_cuda():
    t = first_use.start("cuda")
    assert t is not None
    t.join(120)
    assert not t.is_alive()
    from turbopart.nn.kernels import decoder_triton as kern
    assert "fourier" not in kern.disabled()
