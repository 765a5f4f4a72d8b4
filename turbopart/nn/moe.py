"""Mixture of experts with the official X-Part layout and two dispatch formulations.

Layout (spec xpart §1.4, §2.8; official ``moe_layers.MoEBlock``): ``gate.weight`` [E, D]
(no bias), ``experts.{e}.net.0.proj`` (D→F, bias), ``experts.{e}.net.2`` (F→D, bias) and
``shared_experts.net.*`` — diffusers' ``FeedForward`` naming (GELU wrapper holding the first
Linear at index 0, a parameter-free Dropout(0) at index 1, the second Linear at index 2).

Routing (official ``MoEGate``): logits = x·Wgᵀ (a bf16 GEMM under autocast), softmax in
fp32 over the E experts, ``topk`` of the probabilities, **no renormalisation** of the top-k
weights.  Output: Σ_j p_j · E_{i_j}(x) + S(x) with the shared expert S on every token.

Combine (official *training-mode* path, the one the pipeline runs because it never calls
``.eval()``): each routed expert output (bf16) is written to an **fp32** buffer, weighted by
the fp32 probabilities and summed over the top-k in fp32; the shared expert's bf16 output is
added last (fp32 result).

Two formulations of the routed part, same arithmetic per token:

* :func:`moe_loop` — the official one: one GEMM pair per expert on the rows routed to it
  (boolean indexing, i.e. a host synchronisation per expert).  Used by ``exact``.
* :func:`moe_grouped` — sort the (token, slot) routes by expert and run both expert GEMMs as
  ``torch._grouped_mm`` calls over the sorted rows, with per-expert offsets computed on the
  device: fixed shapes, no host synchronisation, CUDA-graph capturable.  The biases ride in
  the GEMMs (see :class:`StackedExperts`) so every expert output is rounded once, as the
  official ``addmm`` with a bias epilogue does.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

#: Extra K columns of the augmented expert GEMMs (16 bytes of bf16: keeps rows aligned).
PAD = 8
#: Value of the constant column fed to the second expert GEMM: GELU(16) == 16 exactly in
#: fp32 (Φ(16) rounds to 1), and b / 16 is exact in binary floating point.
ONE_COL = 16.0


class GELUProj(nn.Module):
    """diffusers ``GELU`` activation module: a Linear (``proj``) followed by exact GELU."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """diffusers ``FeedForward(dim, activation_fn="gelu", inner_dim=F, bias=True)`` layout."""

    def __init__(self, dim: int, inner_dim: int, bias: bool = True):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner_dim, bias), nn.Dropout(0.0),
                                  nn.Linear(inner_dim, dim, bias=bias)])

    @property
    def fc1(self) -> nn.Linear:
        return self.net[0].proj

    @property
    def fc2(self) -> nn.Linear:
        return self.net[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear → GELU(exact) → Linear, each Linear in ``x.dtype`` (bf16 under autocast)."""
        return ffn(x, self.fc1, self.fc2)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``F.linear`` in the dtype of ``x`` (see :func:`linear_wb`)."""
    return linear_wb(x, layer.weight, layer.bias)


def linear_wb(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in the dtype of ``x``.

    Under autocast (``exact`` on CUDA: fp32 weights) the weights are left to autocast, which
    casts them to bf16 and caches the copies for the whole autocast region, as the official
    run does.  Outside autocast a weight of another dtype is cast here.
    """
    if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        w = w.to(x.dtype)
        b = None if b is None else b.to(x.dtype)
    return F.linear(x, w, b)


def ffn(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, *, inplace: bool = False
        ) -> torch.Tensor:
    """Linear → exact GELU → Linear (``inplace``: GELU overwrites the hidden activations,
    same values, one [T, F] buffer less)."""
    h = linear(x, fc1)
    return linear(gelu_(h) if inplace else F.gelu(h), fc2)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in place."""
    return torch.ops.aten.gelu_(x)


class StackedExperts:
    """The routed experts' weights stacked for grouped GEMMs, with the biases folded in.

    ``w1`` [E, F+PAD, D+PAD]: rows ``:F`` are the first Linear, column ``D`` its bias (the
    token rows carry a constant 1 there), row ``F`` has ``ONE_COL`` at column ``D`` (it makes
    the first GEMM emit a constant column of 16, which GELU keeps at 16), other pads 0.
    ``w2`` [E, D, F+PAD]: columns ``:F`` are the second Linear, column ``F`` its bias / 16.
    The expert parameters are re-pointed to views of these tensors (no second copy), except
    the second bias, which lives in ``b2`` [E, D].
    """

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, dim: int,
                 inner: int):
        self.w1, self.w2, self.b2, self.dim, self.inner = w1, w2, b2, dim, inner

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]


class MoE(nn.Module):
    """Official ``MoEBlock`` layout; ``forward`` reproduces the training-mode arithmetic."""

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        inner = inner_dim or 4 * dim
        self.dim, self.inner, self.top_k, self.num_experts = dim, inner, top_k, num_experts
        self.experts = nn.ModuleList([FeedForward(dim, inner, bias) for _ in range(num_experts)])
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.shared_experts = FeedForward(dim, inner, bias)
        self.stacked: StackedExperts | None = None
        self.impl = "loop"

    # ------------------------------------------------------------------ routing

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k expert indices [T, k], their fp32 softmax probabilities [T, k])."""
        logits = linear(x, self.gate)
        scores = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return idx, w

    # ------------------------------------------------------------------ preparation

    def stack(self) -> StackedExperts:
        """Stack the routed experts (see :class:`StackedExperts`) and view the params into it."""
        if self.stacked is not None:
            return self.stacked
        e0 = self.experts[0]
        ref = e0.fc1.weight
        dev, dt = ref.device, ref.dtype
        E, D, Fh = self.num_experts, self.dim, self.inner
        if e0.fc1.bias is None or e0.fc2.bias is None:
            raise ValueError("grouped experts need biased Linears (ff_bias=True)")
        w1 = torch.zeros(E, Fh + PAD, D + PAD, device=dev, dtype=dt)
        w2 = torch.zeros(E, D, Fh + PAD, device=dev, dtype=dt)
        b2 = torch.zeros(E, D, device=dev, dtype=e0.fc2.bias.dtype)
        for e, ex in enumerate(self.experts):
            with torch.no_grad():
                w1[e, :Fh, :D].copy_(ex.fc1.weight)
                w1[e, :Fh, D].copy_(ex.fc1.bias)
                w1[e, Fh, D] = ONE_COL
                w2[e, :, :Fh].copy_(ex.fc2.weight)
                b2[e].copy_(ex.fc2.bias)
                w2[e, :, Fh].copy_(ex.fc2.bias.to(dt) / ONE_COL)
            # Re-point the parameters to views: the state dict keeps its official keys and
            # the memory holds one copy.
            ex.fc1.weight = nn.Parameter(w1[e, :Fh, :D], requires_grad=False)
            ex.fc1.bias = nn.Parameter(w1[e, :Fh, D], requires_grad=False)
            ex.fc2.weight = nn.Parameter(w2[e, :, :Fh], requires_grad=False)
            ex.fc2.bias = nn.Parameter(b2[e], requires_grad=False)
        if not torch.equal((w2[:, :, Fh].float() * ONE_COL), b2.to(dt).float()):
            raise ValueError("second expert bias not exactly representable after scaling")
        self.stacked = StackedExperts(w1, w2, b2, D, Fh)
        return self.stacked

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, impl: str | None = None, record: dict | None = None,
                x_padded: torch.Tensor | None = None) -> torch.Tensor:
        """MoE output for ``x`` [..., D] (fp32 for a bf16/fp32 compute dtype, see module doc).

        ``x`` is the compute-dtype input (the norm3 output cast to bf16 on CUDA, fp32 on the
        CPU).  ``record`` receives ``topk_idx`` / ``topk_weight`` when given.  ``x_padded``:
        the same rows as [T, D+PAD] with the bias column (grouped path; see
        :func:`pad_tokens`), when the caller already wrote them so.
        """
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        idx, w = self.route(x2)
        if record is not None:
            record["topk_idx"], record["topk_weight"] = idx, w
        impl = impl or self.impl
        if impl == "grouped":
            routed = moe_grouped(x2, idx, w, self.stack(), x_padded)
        elif impl == "loop":
            routed = moe_loop(x2, idx, w, self.experts)
        else:
            raise ValueError(f"unknown MoE implementation {impl!r}")
        y = routed + self.shared_experts(x2)
        return y.view(*shape[:-1], y.shape[-1])


def moe_loop(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
             experts: nn.ModuleList) -> torch.Tensor:
    """Routed part, official training-mode formulation (one masked GEMM pair per expert)."""
    k = idx.shape[1]
    xr = x.repeat_interleave(k, dim=0)
    flat = idx.reshape(-1)
    y = torch.empty(xr.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    for e, ex in enumerate(experts):
        m = flat == e
        y[m] = ex(xr[m]).to(torch.float32)
    return (y.view(*w.shape, -1) * w.unsqueeze(-1)).sum(dim=1)


def pad_tokens(x: torch.Tensor) -> torch.Tensor:
    """[T, D] → [T, D+PAD] in ``x.dtype`` with a constant-1 column at D (the bias input)."""
    t, d = x.shape
    out = torch.zeros(t, d + PAD, device=x.device, dtype=x.dtype)
    out[:, :d] = x
    out[:, d] = 1.0
    return out


def sort_routes(idx: torch.Tensor, num_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order [R], token of each sorted route [R], cumulative expert offsets [E] int32).

    Device-only (no ``bincount``, whose CUDA version reads the maximum back to the host).
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, device=idx.device, dtype=torch.int64)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return order, torch.div(order, k, rounding_mode="floor"), offs


def moe_grouped(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, st: StackedExperts,
                x_padded: torch.Tensor | None = None) -> torch.Tensor:
    """Routed part as two grouped GEMMs over expert-sorted routes (no host sync).

    ``x_padded`` ([T, D+PAD] from :func:`pad_tokens`) may be passed when the caller already
    wrote its norm output into such a buffer.  Per route the arithmetic is the official one:
    bf16(x·W1ᵀ + b1) → GELU → bf16(h·W2ᵀ + b2) → fp32, then the fp32 weighted top-k sum.
    """
    T, k = idx.shape
    dt = st.w1.dtype
    xp = x_padded if x_padded is not None else pad_tokens(x.to(dt))
    order, tok, offs = sort_routes(idx, st.num_experts)
    xs = xp.index_select(0, tok)
    h = grouped_mm(xs, st.w1.transpose(1, 2), offs)        # [R, F+PAD], column F == 16
    h = F.gelu(h)
    y = grouped_mm(h, st.w2.transpose(1, 2), offs)         # [R, D] = bf16(h W2ᵀ + b2)
    y = torch.empty_like(y).index_copy_(0, order, y)       # back to (token, slot) order
    return (y.view(T, k, -1).to(torch.float32) * w.unsqueeze(-1)).sum(dim=1)


def moe_grouped_parts(moe: MoE, x: torch.Tensor, x_padded: torch.Tensor, *,
                      fc1_gelu=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    """The grouped MoE up to (not including) the combine, for callers that fuse the combine.

    ``x`` [T, D] compute-dtype rows (may be the ``[:, :D]`` view of ``x_padded``), ``x_padded``
    [T, D+PAD] (see :func:`pad_tokens`).  Returns ``(ys, inv, w, shared)``: the expert
    outputs [R, D] in expert-sorted route order, ``inv`` [T·k] (route ``t·k + j`` is row
    ``inv[t·k + j]`` of ``ys``), the fp32 route weights [T, k] and the shared expert's output
    [T, D].  :func:`combine_routes` finishes the official combine; GELUs run in place.
    ``fc1_gelu(x, w, b)``: optional fused ``gelu(linear(x, w, b))`` for the shared expert.
    """
    idx, w = moe.route(x)
    st = moe.stack()
    order, tok, offs = sort_routes(idx, st.num_experts)
    xs = x_padded.index_select(0, tok)
    h = grouped_mm(xs, st.w1.transpose(1, 2), offs)        # [R, F+PAD], column F == 16
    del xs
    ys = grouped_mm(gelu_(h), st.w2.transpose(1, 2), offs)  # [R, D] = bf16(h W2ᵀ + b2)
    del h
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=order.device, dtype=order.dtype))
    se = moe.shared_experts
    if fc1_gelu is not None:
        shared = linear(fc1_gelu(x, se.fc1.weight, se.fc1.bias), se.fc2)
    else:
        shared = ffn(x, se.fc1, se.fc2, inplace=True)
    return ys, inv, w.contiguous(), shared


def combine_routes(ys: torch.Tensor, inv: torch.Tensor, w: torch.Tensor,
                   shared: torch.Tensor) -> torch.Tensor:
    """Official training-mode combine of :func:`moe_grouped_parts` outputs: fp32 [T, D]."""
    t, k = w.shape
    y = ys.index_select(0, inv).view(t, k, -1).to(torch.float32)
    return (y * w.unsqueeze(-1)).sum(dim=1) + shared


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a`` [M, K] rows grouped by ``offs`` times ``b`` [G, K, N] → [M, N] in ``a.dtype``."""
    return torch._grouped_mm(a, b, offs=offs)


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device/dtype (tried once on a tiny case)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dev = torch.device(device_type, device_index) if device_index is not None else \
        torch.device(device_type)
    try:
        a = torch.ones(16, 32, device=dev, dtype=dtype)
        b = torch.ones(2, 16, 32, device=dev, dtype=dtype)  # [G, N, K]
        offs = torch.tensor([8, 16], device=dev, dtype=torch.int32)
        out = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return bool(torch.all(out == 32).item())
    except Exception:
        return False
