"""GPU memory budget: how much work fits now, and degrading instead of failing on OOM."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

#: Fraction of the currently free device memory a single transient allocation may use.
DEFAULT_FRACTION = float(os.environ.get("TURBOPART_MEM_FRACTION", "0.6"))
#: Working budget on the CPU (bytes): chunked code paths stay bounded there too.
CPU_BUDGET = int(float(os.environ.get("TURBOPART_CPU_BUDGET_GB", "2")) * 2**30)
#: Ceiling on the GPU memory the process holds (weights + caches + work), bytes.  Every size
#: chosen through this module keeps ``memory_allocated() + new work`` under it, so the peak
#: stays near it whatever card runs the job.  ``TURBOPART_GPU_BUDGET_GB`` or
#: :func:`set_gpu_budget` change it (e.g. more for K/V caches on an 80 GB card).
GPU_BUDGET = int(float(os.environ.get("TURBOPART_GPU_BUDGET_GB", "11")) * 2**30)


#: Working memory (bytes) every chunked step may still use when the resident models alone
#: exceed :data:`GPU_BUDGET` (``exact`` keeps ~14 GB of fp32 weights): without this floor
#: every chunk would shrink to its minimum (e.g. marching cubes 100× slower).  Never more
#: than the budget fraction of the free memory.  ``TURBOPART_MIN_WORK_GB``.
MIN_WORK = int(float(os.environ.get("TURBOPART_MIN_WORK_GB", "1.5")) * 2**30)


def set_gpu_budget(gigabytes: float | None) -> None:
    """Set the process-wide GPU memory ceiling (None: no ceiling beyond free memory)."""
    global GPU_BUDGET
    GPU_BUDGET = 1 << 62 if gigabytes is None else int(gigabytes * 2**30)


def free_bytes(device: torch.device | str) -> int:
    """Bytes that can be allocated on ``device`` right now (allocator cache included)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BUDGET
    free, _total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    return int(free + max(reserved - allocated, 0))


def budget_bytes(device: torch.device | str, fraction: float | None = None,
                 cap: int | None = None) -> int:
    """A working budget: ``fraction`` of :func:`free_bytes`, within :data:`GPU_BUDGET`
    (less what is allocated now, but at least :data:`MIN_WORK`), optionally capped."""
    device = torch.device(device)
    b = int(free_bytes(device) * (DEFAULT_FRACTION if fraction is None else fraction))
    if device.type == "cuda":
        b = min(b, max(GPU_BUDGET - torch.cuda.memory_allocated(device), MIN_WORK))
    if cap is not None:
        b = min(b, int(cap))
    return max(b, 0)


def items_that_fit(bytes_per_item: float, device: torch.device | str, *, fixed: float = 0,
                   fraction: float | None = None, cap_bytes: int | None = None,
                   minimum: int = 1, maximum: int | None = None) -> int:
    """How many items of ``bytes_per_item`` fit in the budget after ``fixed`` bytes."""
    avail = budget_bytes(device, fraction, cap_bytes) - fixed
    n = int(avail // max(bytes_per_item, 1))
    if maximum is not None:
        n = min(n, maximum)
    return max(n, minimum)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def retry_smaller(fn: Callable[[int], T], size: int, *, minimum: int = 1,
                  device: torch.device | str | None = None) -> T:
    """Call ``fn(size)``; on a GPU OOM halve ``size`` and retry down to ``minimum``."""
    while True:
        try:
            return fn(size)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc) or size <= minimum:
                raise
            size = max(minimum, size // 2)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
