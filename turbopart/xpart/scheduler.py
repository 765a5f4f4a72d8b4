"""X-Part's flow-matching Euler scheduler (official ``FlowMatchEulerDiscreteScheduler``).

Spec: xpart §5.1–5.2, §11 item 4.  A variant of diffusers' FlowMatchEulerDiscrete with
**reversed time**: σ = 0 is noise, σ = 1 is data.  With the pipeline's settings:

* ``sigmas = numpy.linspace(0, 1, N)`` (float64; ``shift`` applied in float64, identity for
  shift 1), converted to fp32 on the device; ``timesteps = sigmas · 1000`` (fp32);
  ``self.sigmas`` gets an appended 1.0 (N + 1 values).
* step i uses σ_i and σ_{i+1}: ``x_next = fp32(x) + (σ_{i+1} − σ_i) · v``, cast to ``v``'s
  dtype.  The last step has σ_{N−1} = σ_N = 1, so its dt is 0 and the last model evaluation
  has no effect (:meth:`FlowMatchEulerScheduler.is_noop`).
* the DiT receives ``t_model = timesteps[i].to(latents.dtype) / 1000``.

bf16 quirks of the official CUDA run (§5.2), reproduced by the arithmetic below whenever the
model output is bf16 (both numerics on CUDA): dt is a 0-dim fp32 device tensor, and CUDA
reads it *as bf16* when multiplying a bf16 tensor, so ``dt`` is rounded to bf16 (1/49 →
0.0203857421875), the product is rounded to bf16, added to the fp32 sample, and the result is
cast back to bf16; from then on the latents are bf16, so ``t_model = bf16(bf16(1000σ)/1000)``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

TARGET = "partgen.models.diffusion.schedulers.FlowMatchEulerDiscreteScheduler"
REDUCED = (torch.bfloat16, torch.float16)


def default_params() -> dict:
    return {"num_train_timesteps": 1000}


def tiny_config() -> dict:
    return {"target": TARGET, "params": default_params()}


def euler_update(sample: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor,
                 sigma_next: torch.Tensor) -> torch.Tensor:
    """One official Euler step, dtype for dtype (see the module docstring).

    ``sigma``/``sigma_next`` are 0-dim fp32 tensors (the scheduler's device tensors).
    Returns the new sample in ``model_output.dtype``.
    """
    dt = sigma_next - sigma
    x = sample.to(torch.float32)
    if model_output.dtype in REDUCED:
        # CUDA TensorIterator loads the 0-dim fp32 operand as the common (bf16) dtype,
        # computes in fp32 and rounds the product to bf16 (official quirk, spec §5.2).
        inc = (dt.to(model_output.dtype).float() * model_output.float()).to(model_output.dtype)
        prev = x + inc
    else:
        prev = x + dt * model_output
    return prev.to(model_output.dtype)


class FlowMatchEulerScheduler(nn.Module):
    """Official scheduler state and ``step`` (returns the new sample tensor).

    An ``nn.Module`` without parameters only so that the component loader's contract
    (``modules()``, ``eval()``, ...) holds; its tensors are plain attributes.

    ``step`` accepts the official ``(model_output, timestep, sample)`` call (the first call
    finds its index by matching ``timestep`` in ``timesteps``, which reads back to the host
    once) or an explicit ``step_index=`` (no host synchronisation).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False):
        super().__init__()
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        ts = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32).copy()
        timesteps = torch.from_numpy(ts).to(dtype=torch.float32)
        sigmas = timesteps / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas.to("cpu")
        self.sigma_min = float(self.sigmas[-1])
        self.sigma_max = float(self.sigmas[0])
        self._sigmas_host = self.sigmas.tolist()
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.num_inference_steps: int | None = None

    # -------------------------------------------------------------- official API

    @property
    def config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "shift": self.shift,
                "use_dynamic_shifting": self.use_dynamic_shifting}

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: torch.device | str | None = None,
                      sigmas: Sequence[float] | np.ndarray | None = None,
                      mu: float | None = None) -> None:
        """Official ``set_timesteps`` (the pipeline passes ``sigmas=linspace(0, 1, N)``)."""
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting needs mu")
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or sigmas")
            self.num_inference_steps = num_inference_steps
            ts = np.linspace(self.sigma_max * self.num_train_timesteps,
                             self.sigma_min * self.num_train_timesteps, num_inference_steps)
            sig = ts / self.num_train_timesteps
        else:
            sig = np.asarray(sigmas, dtype=np.float64)
            self.num_inference_steps = len(sig)
        if self.use_dynamic_shifting:
            with np.errstate(divide="ignore"):
                sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
        else:
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        s = torch.from_numpy(np.asarray(sig)).to(dtype=torch.float32, device=dev)
        self.timesteps = (s * self.num_train_timesteps).to(device=dev)
        self.sigmas = torch.cat([s, torch.ones(1, device=s.device)])
        self._sigmas_host = self.sigmas.cpu().tolist()  # once per set_timesteps
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: torch.Tensor | float,
                           schedule_timesteps: torch.Tensor | None = None) -> int:
        sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = (sched == torch.as_tensor(timestep, device=sched.device)).nonzero()
        pos = 1 if len(hits) > 1 else 0
        return int(hits[pos].item())

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float | None,
             sample: torch.Tensor, *, step_index: int | None = None) -> torch.Tensor:
        """x_{i+1} from x_i (``sample``) and the velocity ``model_output``."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor)
                                         and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps (a float), or step_index=")
        if step_index is not None:
            self._step_index = step_index
        elif self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else \
                self.index_for_timestep(timestep)
        i = self._step_index
        prev = euler_update(sample, model_output, self.sigmas[i], self.sigmas[i + 1])
        self._step_index = i + 1
        return prev

    # -------------------------------------------------------------- helpers

    def model_timestep(self, i: int, latents_dtype: torch.dtype,
                       num_parts: int | None = None) -> torch.Tensor:
        """What the pipeline feeds the DiT at step i: ``timesteps[i].to(dtype) / 1000``."""
        t = self.timesteps[i:i + 1].to(latents_dtype) / self.num_train_timesteps
        return t.expand(num_parts) if num_parts is not None else t

    def is_noop(self, i: int) -> bool:
        """Step i leaves the sample unchanged (σ_{i+1} == σ_i; the pipeline's last step).

        Skipping its model evaluation is output-identical (the sample is only cast to the
        model-output dtype).  Host-side check, no device synchronisation.
        """
        return self._sigmas_host[i + 1] == self._sigmas_host[i]

    def __len__(self) -> int:
        return self.num_train_timesteps

    def forward(self, *args, **kwargs):  # pragma: no cover - not a network
        raise TypeError("the scheduler is not callable; use step()")


def build(config: Mapping[str, Any] | None = None, *, skip_unused: bool = False
          ) -> FlowMatchEulerScheduler:
    """The scheduler from its ``config.json`` (``{"target", "params"}`` or flat params)."""
    if config is None:
        params: dict = default_params()
    else:
        params = dict(config.get("params", config)) if isinstance(config, Mapping) else {}
    known = {"num_train_timesteps", "shift", "use_dynamic_shifting"}
    kwargs = {k: v for k, v in params.items() if k in known}
    return FlowMatchEulerScheduler(**kwargs)
