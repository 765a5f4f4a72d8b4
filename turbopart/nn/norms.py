"""Normalisation helpers with the dtype behaviour of the official runs.

The official X-Part DiT keeps ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` modules (their
``weight``/``bias`` parameters are the checkpoint keys) and runs under CUDA bf16 autocast
(spec xpart §2.9):

* ``LayerNorm`` is on autocast's fp32 list: the input is upcast, the result is **fp32**.
* ``RMSNorm`` is not: with a bf16 input and an fp32 weight PyTorch cannot use its fused
  kernel and runs its composite.  Recent PyTorch (the 2.11 of the H100 baseline, the 2.13
  here) normalises in fp32, multiplies by the fp32 weight and rounds **once** to the input
  dtype.  PyTorch 2.4–2.6 rounded the normalised value to bf16 first and multiplied by the
  fp32 weight afterwards (an fp32 result that SDPA then rounds again).  The mode is read off
  the installed PyTorch once (:func:`rms_rounding`), so ``exact`` reproduces what the
  official ``nn.RMSNorm`` computes on the same PyTorch; both modes can be forced.

The helpers take the parameter tensors, not the modules, so fused callers can pass stacked
weights (e.g. q_norm and k_norm of one attention as one ``[2, head_dim]`` weight).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

#: "single": bf16(normalised * w) (PyTorch >= 2.8 composite); "double": bf16(normalised) * w
RMS_MODES = ("single", "double")


@functools.lru_cache(maxsize=None)
def rms_rounding() -> str:
    """How the installed PyTorch's ``rms_norm`` rounds a bf16 input with an fp32 weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    w = 1.0 + 0.3 * torch.randn(32, generator=g)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.rms_norm(x, (32,), w, 1e-6)
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    single = (n * w).to(torch.bfloat16)
    double = n.to(torch.bfloat16).float() * w
    if ref.dtype == torch.bfloat16 and torch.equal(ref, single):
        return "single"
    if torch.equal(ref.float(), double) or torch.equal(ref.float(), double.to(ref.dtype).float()):
        return "double"
    return "single"


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim computed and returned in fp32 (autocast's fp32 policy)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             mode: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim as ``torch.nn.RMSNorm`` computes it for ``x.dtype``.

    fp32 in: fp32 out.  bf16/fp16 in: see the module docstring (``mode`` defaults to the
    installed PyTorch's behaviour).  ``weight`` broadcasts against ``x`` over the trailing
    dims (so a ``[2, d]`` weight normalises a ``[..., 2, d]`` pair with two weights).
    """
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if x.dtype == torch.float32:
        return n if weight is None else n * weight.float()
    mode = mode or rms_rounding()
    if weight is None:
        return n.to(x.dtype)
    if mode == "double":
        # PyTorch 2.4-2.6 composite: round the normalised value, multiply by the fp32 weight
        # (fp32 result; the consumer rounds again).
        return n.to(x.dtype).float() * weight.float()
    return (n * weight.float()).to(x.dtype)


def apply_norm(module: nn.Module, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Run an official norm module (LayerNorm / RMSNorm / Identity) with official dtypes."""
    if isinstance(module, nn.LayerNorm):
        return layer_norm(x, module.weight, module.bias, module.eps)
    if isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        return rms_norm(x, module.weight, eps, mode)
    if isinstance(module, nn.Identity):
        return x
    raise TypeError(f"unsupported norm module {type(module).__name__}")


def norm_eps(module: nn.Module) -> float | None:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    return None
