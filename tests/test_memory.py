"""The GPU working budget (turbopart.runtime.memory), with the CUDA queries stubbed."""
import torch

from turbopart.runtime import memory


def _fake_gpu(monkeypatch, free: int, allocated: int) -> None:
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_budget_stays_under_the_ceiling(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(memory, "GPU_BUDGET", 11 * gib)
    monkeypatch.setattr(memory, "MIN_WORK", gib)
    _fake_gpu(monkeypatch, free=60 * gib, allocated=8 * gib)
    assert memory.budget_bytes("cuda", fraction=0.5) == 3 * gib       # ceiling − allocated
    assert memory.budget_bytes("cuda", fraction=0.5, cap=gib // 2) == gib // 2
    assert memory.items_that_fit(gib // 4, "cuda", fraction=0.5) == 12


def test_resident_models_over_the_ceiling_keep_a_working_floor(monkeypatch):
    # exact numerics: ~14 GB of fp32 weights alone exceed the 11 GiB ceiling; chunked steps
    # still get MIN_WORK instead of collapsing to their minimum chunk
    gib = 2**30
    monkeypatch.setattr(memory, "GPU_BUDGET", 11 * gib)
    monkeypatch.setattr(memory, "MIN_WORK", gib)
    _fake_gpu(monkeypatch, free=60 * gib, allocated=14 * gib)
    assert memory.budget_bytes("cuda", fraction=0.5) == gib
    # ...but never more than the free memory allows
    _fake_gpu(monkeypatch, free=gib, allocated=14 * gib)
    assert memory.budget_bytes("cuda", fraction=0.5) == gib // 2
    assert memory.items_that_fit(gib, "cuda", fraction=0.5, minimum=3) == 3


def test_retry_smaller_halves_on_oom():
    sizes = []

    def fn(n):
        sizes.append(n)
        if n > 10:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return n
    assert memory.retry_smaller(fn, 64, minimum=4) == 8
    assert sizes == [64, 32, 16, 8]
