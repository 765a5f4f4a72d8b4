"""Fourier (sin/cos) embedding of 3-D points, as the ShapeVAE's ``FourierEmbedder``.

Spec xpart §3.1: frequencies ``2^k`` for k = 0 … num_freqs−1 (times π only when include_pi),
output ``[x (3) | sin(x_a · f_k) (3·F, axis-major) | cos(x_a · f_k) (3·F)]`` = 51 columns for
F = 8.  The frequency buffer is fp32; the product follows PyTorch type promotion with the
input, so fp16 coordinates are embedded in fp32 and fp64 coordinates in fp64 (§3.5), exactly
as the official module does.  Multiplying by a power of two is exact, so only sin/cos round.
"""
from __future__ import annotations

import torch
from torch import nn


def fourier_frequencies(num_freqs: int, include_pi: bool, device=None) -> torch.Tensor:
    """The official frequency vector (fp32): ``2^k`` (``·π`` in fp32 when include_pi)."""
    # Computed on the CPU, then moved: an arange on the meta device (where the builders run)
    # goes through PyTorch's Python decompositions, which import torch._dynamo (~1 s of
    # start-up).  Powers of two and one fp32 product: the same values on every device.
    f = 2.0 ** torch.arange(num_freqs, dtype=torch.float32, device="cpu")
    if include_pi:
        f = f * torch.pi
    return f.to(device if device is not None else torch.get_default_device())


def fourier_features(x: torch.Tensor, frequencies: torch.Tensor, *, include_input: bool = True,
                     out_dtype: torch.dtype | None = None, pad_to: int | None = None
                     ) -> torch.Tensor:
    """``[x | sin(x·f) | cos(x·f)]`` over the last axis of ``x`` (official column order).

    ``out_dtype``: cast of the result (the geometry decoder casts to the latents' dtype).
    ``pad_to``: append zero columns up to this width (an aligned GEMM operand; zero columns
    times zero weight columns leave the projection unchanged).
    """
    if frequencies.numel() == 0:
        feats = x
    else:
        prod = (x[..., None] * frequencies).flatten(-2)  # [..., D·F], axis-major
        parts = [x.to(prod.dtype)] if include_input else []
        parts += [prod.sin(), prod.cos()]
        feats = torch.cat(parts, dim=-1)
    if out_dtype is not None and feats.dtype != out_dtype:
        feats = feats.to(out_dtype)
    if pad_to is not None and pad_to > feats.shape[-1]:
        feats = torch.nn.functional.pad(feats, (0, pad_to - feats.shape[-1]))
    return feats


class FourierEmbedder(nn.Module):
    """Official ``FourierEmbedder`` (logspace, include_input); ``frequencies`` is a
    non-persistent buffer (no state-dict key), created by :meth:`reset_non_persistent`."""

    def __init__(self, num_freqs: int = 6, include_pi: bool = True, input_dim: int = 3,
                 include_input: bool = True):
        super().__init__()
        self.num_freqs = int(num_freqs)
        self.include_pi = bool(include_pi)
        self.input_dim = int(input_dim)
        self.include_input = bool(include_input)
        self.register_buffer("frequencies", fourier_frequencies(self.num_freqs, self.include_pi),
                             persistent=False)

    @property
    def out_dim(self) -> int:
        keep = 1 if (self.include_input or self.num_freqs == 0) else 0
        return self.input_dim * (2 * self.num_freqs + keep)

    def reset_non_persistent(self, device: torch.device | str) -> None:
        self.frequencies = fourier_frequencies(self.num_freqs, self.include_pi, device=device)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None,
                pad_to: int | None = None) -> torch.Tensor:
        return fourier_features(x, self.frequencies, include_input=self.include_input,
                                out_dtype=out_dtype, pad_to=pad_to)
