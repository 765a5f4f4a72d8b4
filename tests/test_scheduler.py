"""X-Part flow-matching Euler scheduler: golden parity and the bf16 quirks of spec §5.2."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import case_path, needs_gpu
from turbopart import weights
from turbopart.golden import compare, load_case
from turbopart.xpart import scheduler as sched_mod
from turbopart.xpart.scheduler import FlowMatchEulerScheduler, euler_update


def test_golden_scheduler_bitwise():
    from turbopart.golden import scheduler as runner
    case = load_case(case_path("scheduler"))
    out = runner.run(case)
    checks = compare(case, out)
    assert checks and all(c.ok for c in checks)
    for name, ref in case.outputs.items():
        assert torch.equal(out[name], ref), name


def test_pipeline_schedule_values():
    s = FlowMatchEulerScheduler()
    s.set_timesteps(50, sigmas=np.linspace(0, 1, 50))
    assert s.timesteps.shape == (50,) and s.sigmas.shape == (51,)
    assert float(s.timesteps[0]) == 0.0 and float(s.timesteps[-1]) == 1000.0
    assert float(s.sigmas[-1]) == 1.0 and float(s.sigmas[-2]) == 1.0
    assert [s.is_noop(i) for i in range(50)] == [False] * 49 + [True]
    # fp32 latents at step 0: t_model = 0
    assert float(s.model_timestep(0, torch.float32)) == 0.0
    # bf16 latents from step 1 on: t_model = bf16(bf16(1000 σ) / 1000)
    t1 = s.model_timestep(1, torch.bfloat16)
    assert t1.dtype == torch.bfloat16 and abs(float(t1) - 0.0203857) < 1e-6
    assert abs(float(s.model_timestep(2, torch.bfloat16)) - 0.0407715) < 1e-6
    assert float(s.model_timestep(49, torch.bfloat16)) == 1.0
    assert s.model_timestep(3, torch.float32, num_parts=4).shape == (4,)


def test_bf16_step_rounds_dt_and_increment():
    """dt = 1/49 becomes bf16 0.0203857421875; the increment is rounded to bf16 and the
    sum is cast back to bf16 (spec §5.2 item 3)."""
    s = FlowMatchEulerScheduler()
    s.set_timesteps(50, sigmas=np.linspace(0, 1, 50))
    v = torch.ones(4, dtype=torch.bfloat16)
    x = torch.zeros(4, dtype=torch.float32)
    out = s.step(v, s.timesteps[0], x)
    assert out.dtype == torch.bfloat16
    assert float(out[0]) == 0.0203857421875
    # generic values: x_{i+1} = bf16(fp32(x) + bf16(bf16(dt) * v))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g).bfloat16()
    v = torch.randn(64, generator=g).bfloat16()
    got = euler_update(x, v, s.sigmas[5], s.sigmas[6])
    dt = (s.sigmas[6] - s.sigmas[5]).bfloat16().float()
    want = (x.float() + (dt * v.float()).bfloat16().float()).bfloat16()
    assert torch.equal(got, want)
    # the 49 effective bf16 steps integrate 0.99890 of the path, not 1
    total = sum(float((s.sigmas[i + 1] - s.sigmas[i]).bfloat16()) for i in range(50))
    assert abs(total - 49 * 0.0203857421875) < 1e-12 and abs(total - 0.99890) < 1e-5
    # the last step (dt = 0) only casts
    y = torch.randn(8, generator=g).bfloat16()
    assert torch.equal(euler_update(y, torch.randn(8).bfloat16(), s.sigmas[49], s.sigmas[50]), y)


def test_fp32_step_matches_formula():
    s = FlowMatchEulerScheduler()
    s.set_timesteps(5, sigmas=np.linspace(0, 1, 5))
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(10, generator=g), torch.randn(10, generator=g)
    got = s.step(v, None, x, step_index=2)
    assert torch.equal(got, x + (s.sigmas[3] - s.sigmas[2]) * v)
    assert s.step_index == 3


def test_step_locates_first_index_by_timestep():
    s = FlowMatchEulerScheduler()
    s.set_timesteps(10, sigmas=np.linspace(0, 1, 10))
    x = torch.zeros(3)
    s.step(torch.ones(3), s.timesteps[4], x)
    assert s.step_index == 5
    with pytest.raises(ValueError):
        s.step(torch.ones(3), 3, x)


def test_default_schedule_and_shift():
    s = FlowMatchEulerScheduler()
    assert s.timesteps.shape == (1000,) and float(s.sigmas[0]) == pytest.approx(1e-3)
    s.set_timesteps(4)
    assert s.timesteps.shape == (4,)
    assert float(s.timesteps[0]) == pytest.approx(1.0) and float(s.timesteps[-1]) == 1000.0
    sh = FlowMatchEulerScheduler(shift=3.0)
    sh.set_timesteps(3, sigmas=np.array([0.0, 0.5, 1.0]))
    assert torch.allclose(sh.sigmas[:3], torch.tensor([0.0, 0.75, 1.0]))


def test_build_accepts_config_forms():
    assert sched_mod.build(None).num_train_timesteps == 1000
    assert sched_mod.build({"target": sched_mod.TARGET,
                            "params": {"num_train_timesteps": 500}}).num_train_timesteps == 500
    flat = sched_mod.build({"num_train_timesteps": 1000, "shift": 1.0,
                            "use_dynamic_shifting": False, "num_inference_steps": 50,
                            "_class_name": "x"})
    assert flat.shift == 1.0
    # the registry entry builds (under the loader's meta-device context too)
    s = weights.build("scheduler", weights.default_config("scheduler"))
    assert isinstance(s, FlowMatchEulerScheduler) and s.sigmas.device.type == "cpu"
    assert weights.default_config("scheduler")["params"] == sched_mod.default_params()
    assert sched_mod.tiny_config()["params"] == {"num_train_timesteps": 1000}


@needs_gpu
def test_bf16_update_is_the_torch_cuda_expression():
    """On CUDA our explicit formula equals the official expression evaluated by PyTorch
    (checks the dt-rounding claim of spec §5.2 on the installed PyTorch)."""
    s = FlowMatchEulerScheduler()
    s.set_timesteps(50, device="cuda", sigmas=np.linspace(0, 1, 50))
    g = torch.Generator(device="cuda").manual_seed(0)
    for i in (0, 1, 17, 48, 49):
        x = torch.randn(4096, device="cuda", generator=g)
        if i:
            x = x.bfloat16()
        v = torch.randn(4096, device="cuda", generator=g).bfloat16()
        official = (x.to(torch.float32) + (s.sigmas[i + 1] - s.sigmas[i]) * v).to(v.dtype)
        assert torch.equal(euler_update(x, v, s.sigmas[i], s.sigmas[i + 1]), official)
        t_off = s.timesteps[i].expand(3).to(x.dtype) / 1000
        assert torch.equal(s.model_timestep(i, x.dtype, 3), t_off)
