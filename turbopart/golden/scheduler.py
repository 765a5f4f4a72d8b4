"""Golden runner for ``scheduler`` cases: timesteps/sigmas and N sequential ``step`` calls.

Builds :class:`~turbopart.xpart.scheduler.FlowMatchEulerScheduler` from ``case.config``,
records its state after construction (``init.*``), sets the pipeline's schedule
(``sigmas = linspace(0, 1, N)``), and steps ``input.sample`` with ``input.model_output[i]``
(each step located by its timestep, as the official loop does).
"""
from __future__ import annotations

import numpy as np
import torch

from . import Case
from ..xpart.scheduler import build


def run(case: Case) -> dict[str, torch.Tensor]:
    cfg = case.config
    sched = build(cfg)
    out = {"init.timesteps": sched.timesteps.clone(), "init.sigmas": sched.sigmas.clone()}
    v = case.input("model_output")
    n = int(cfg.get("num_inference_steps", case.meta.get("extra", {}).get(
        "num_inference_steps", v.shape[0])))
    sched.set_timesteps(n, device="cpu", sigmas=np.linspace(0, 1, n))
    out["timesteps"] = sched.timesteps.clone()
    out["sigmas"] = sched.sigmas.clone()
    x = case.input("sample")
    prev, mts = [], []
    for i, t in enumerate(sched.timesteps):
        mts.append(sched.model_timestep(i, x.dtype))
        x = sched.step(v[i], t, x)
        prev.append(x)
    out["model_timestep_input"] = torch.cat(mts)
    out["prev_sample"] = torch.stack(prev)
    return out
