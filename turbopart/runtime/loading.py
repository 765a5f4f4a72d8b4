"""Load several checkpoint components at once, straight onto the target device.

Each component is built on the meta device and its tensors are read from the memory-mapped
safetensors file directly onto the device (``turbopart.weights.load_component``), so there
is no fp32 CPU construction pass (the official start-up spends 17–20 s building the DiT on
the CPU before the checkpoint overwrites it).  Components load in parallel threads: the
reads and host-to-device copies release the GIL.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch
from torch import nn

from ..weights import load_component
from .precision import Numerics


def load_components(weights: str | os.PathLike, components: Iterable[str], *,
                    device: torch.device | str = "cpu",
                    numerics: Numerics | str = Numerics.FAST,
                    parallel: bool = True, timings: dict | None = None
                    ) -> dict[str, nn.Module]:
    """``{name: loaded module}`` for ``components`` of the checkpoint dir ``weights``.

    ``timings`` (optional dict) receives the seconds each component took.  The biggest
    component starts first; errors propagate (the first one raised wins).
    """
    names = list(dict.fromkeys(components))
    order = {"model": 0, "conditioner": 1, "shapevae": 2, "p3sam": 3, "scheduler": 4}
    names.sort(key=lambda n: order.get(n, 9))
    device = torch.device(device)

    def one(name: str) -> tuple[str, nn.Module, float]:
        t0 = time.perf_counter()
        # Threads share one reader pool each; fewer workers per file when loading in parallel.
        m = load_component(weights, name, device=device, numerics=numerics,
                           workers=4 if parallel else 8)
        return name, m, time.perf_counter() - t0

    out: dict[str, nn.Module] = {}
    if parallel and len(names) > 1:
        with ThreadPoolExecutor(len(names)) as pool:
            for name, m, dt in pool.map(one, names):
                out[name] = m
                if timings is not None:
                    timings[name] = dt
    else:
        for name in names:
            _, m, dt = one(name)
            out[name] = m
            if timings is not None:
                timings[name] = dt
    return out
