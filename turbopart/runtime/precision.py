"""The two numerics of turbopart, one switch.

``exact`` reproduces the official arithmetic: fp32 weights, bf16 autocast where the
official pipeline autocasts (X-Part on CUDA), fp16 Sonata attention (the official flash
path casts q/k/v to fp16), fp32 P3-SAM heads.

``fast`` is ours: Linear / sparse-conv weights stored in bf16 (what autocast computes
anyway, without a master copy), norms and embeddings kept in fp32, fused kernels, caches
and graphs.  On the CPU both modes compute in fp32 unless a test asks otherwise.
"""
from __future__ import annotations

import contextlib
import enum

import torch
from torch import nn


class Numerics(str, enum.Enum):
    EXACT = "exact"
    FAST = "fast"

    @classmethod
    def parse(cls, value: "Numerics | str | None") -> "Numerics":
        if value is None:
            return cls.FAST
        if isinstance(value, Numerics):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"numerics must be 'exact' or 'fast', got {value!r}") from None


#: Module types whose parameters are matrix weights (stored in bf16 by ``fast``).
MATMUL_MODULES: tuple[type[nn.Module], ...] = (nn.Linear,)


def register_matmul_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: parameters of ``cls`` are matrix weights (bf16 in ``fast``)."""
    global MATMUL_MODULES
    if cls not in MATMUL_MODULES:
        MATMUL_MODULES = MATMUL_MODULES + (cls,)
    return cls


def compute_dtype(numerics: Numerics | str, device: torch.device | str) -> torch.dtype:
    """dtype of matmul weights / activations for ``numerics`` on ``device``."""
    numerics = Numerics.parse(numerics)
    device = torch.device(device)
    if numerics is Numerics.FAST and device.type == "cuda":
        return torch.bfloat16
    return torch.float32


def param_dtypes(module: nn.Module, numerics: Numerics | str,
                 device: torch.device | str) -> dict[str, torch.dtype]:
    """Storage dtype of every parameter/buffer key of ``module`` under ``numerics``.

    Matmul weights (``MATMUL_MODULES``) take :func:`compute_dtype`; everything else
    (LayerNorm/RMSNorm weights, ``part_embed``, ``mask_token``) stays fp32.
    """
    mm = compute_dtype(numerics, device)
    out: dict[str, torch.dtype] = {}
    for mod_name, mod in module.named_modules():
        is_mm = isinstance(mod, MATMUL_MODULES)
        for p_name, _ in list(mod.named_parameters(recurse=False)) + list(
                mod.named_buffers(recurse=False)):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            out[key] = mm if is_mm else torch.float32
    return out


def autocast(numerics: Numerics | str, device: torch.device | str):
    """The official autocast context: bf16 on CUDA for ``exact``; nothing otherwise.

    ``fast`` modules hold bf16 weights and cast explicitly, so they need no autocast.
    """
    numerics = Numerics.parse(numerics)
    device = torch.device(device)
    if numerics is Numerics.EXACT and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
