"""Run the X-Part DiT for one sampling call: cached condition K/V, one step at a time.

For a fixed set of K parts and a fixed condition, :class:`DiTRunner`

* computes the cross-attention keys/values (``to_k``/``to_v`` of the condition, then
  ``k_norm``; spec §4.7, §8.7 item 5) **once** and reuses them at every step — all
  ``depth × 2`` cross-attentions when memory allows, the first blocks that fit otherwise
  (:func:`plan_cache_blocks`, budget from :mod:`turbopart.runtime.memory`);
* computes the time embedding once per step for all parts (they share t; §8.7 item 9);
* optionally captures the whole step in a CUDA graph (``fast`` with the grouped MoE has no
  host synchronisation), with the latents, the timestep and the part-embedding indices as
  static device inputs, so each step is one ``replay``.  By default only small steps are
  captured (at most :data:`GRAPH_MAX_TOKENS` latent tokens over all parts): there the host
  launches are the limit, while a larger step keeps the GPU busy without a graph, and the
  capture (two warm-up steps and the recording) then costs more than it saves (H100, 50
  steps: K = 1 0.84 against 1.85 s, K = 8 5.65 against 5.90–6.07 s eager against graphed,
  K = 16 12.56 against 13.1 s); ``cuda_graph`` / ``TURBOPART_DIT_GRAPH`` (``1`` always, ``0``
  never) overrides;
* optionally runs the blocks through ``torch.compile`` (fusing norms, casts, residual adds
  and activations; ``compile=True`` or ``TURBOPART_DIT_COMPILE=1``, mode from
  ``TURBOPART_DIT_COMPILE_MODE``), falling back to eager if compilation fails.  Inductor is
  told to round fused intermediates where eager rounds (``emulate_precision_casts``), so a
  compiled block computes what the eager block computes.

``fast`` steps run :meth:`PartFormerDiT.forward_fused` (the fused stream: residual updates
fused with the LayerNorms that read them, fused q/k RMSNorm, the MoE combine in the residual
kernel; Triton kernels on CUDA, each with its PyTorch formulation as the fallback).  Switches
(keyword arguments, else environment variables; defaults in brackets):

* ``kernels`` / ``TURBOPART_DIT_KERNELS`` [``all``]: ``all``, ``none`` (fused stream, PyTorch
  ops only), ``legacy`` (the per-block modules, ``DiTBlock.forward``) or a comma list of
  :data:`~turbopart.xpart.dit.KERNEL_GROUPS` (``ln,qk,moe``);
* ``sdpa`` / ``TURBOPART_DIT_SDPA`` [``auto``]: SDPA backend (``auto``, ``cudnn``,
  ``flash``, ``efficient``), for all attentions or per kind (``local=..,global=..,cross=..``);
* ``kv_layout`` / ``TURBOPART_DIT_KV_LAYOUT`` [``strided``]: layout of the cross K/V of
  uncached blocks (see :class:`~turbopart.xpart.dit.StepOptions`).

A failing fused step (a kernel that does not compile or launch) warns and falls back to
the per-block modules.  ``exact`` always runs the per-block modules, op for op.

Everything computes what :meth:`PartFormerDiT.forward` computes on the same inputs (the
K/V of a block is the same GEMM on the same condition, computed earlier; the fused step
differs only in fp32 reduction order).

:func:`denoise` is the official sampling loop (``PartFormerPipeline.__call__`` step 6, spec
§5.2) on top of a runner: one explicit part-embedding draw per step, the scheduler's dtype
quirks, and (``fast``) no model evaluation for the final σ = 1 → 1 step.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Mapping

import numpy as np
import torch

from ..runtime import memory
from ..runtime.precision import Numerics, autocast
from ..runtime.switches import switch
from ..nn import kernels as nn_kernels
from ..nn.attention import backend_context
from .dit import PartFormerDiT, StepOptions, draw_part_index
from .scheduler import FlowMatchEulerScheduler

#: Largest step (latent tokens over all parts) captured in a CUDA graph by default: two parts
#: of 1024 tokens (the graph won at K = 1 and 2 on an H100, eager steps from K = 4 on).
GRAPH_MAX_TOKENS = 2048


# --------------------------------------------------------------------------- memory plan

def kv_cache_bytes_per_block(model: PartFormerDiT, num_parts: int, obj_tokens: int,
                             geo_tokens: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of one block's cached K and V for both cross-attention streams."""
    item = torch.empty((), dtype=dtype or model.cd).element_size()
    blk = model.blocks[0]
    tokens = (obj_tokens if blk.use_cross_attention else 0) + \
        (geo_tokens if blk.use_cross_attention_2 else 0)
    return 2 * num_parts * tokens * model.hidden_size * item


def step_activation_bytes(model: PartFormerDiT, num_parts: int, latent_tokens: int,
                          cond_tokens: int, *, fused: bool | None = None) -> int:
    """An upper estimate of the transient memory of one ``fast`` DiT step (bytes).

    Fused stream (``fused``): the fp32 stream, the compute-dtype skip copies and one skip
    concatenation, plus the largest of a block's transients: self-attention (x, q|k|v,
    q, k, attention output, projection ≈ 8 rows of D), the MoE (padded input, sorted routes,
    [k·T, 4D] hidden ≈ 2 + 5k rows of D per token) or one uncached block's cross K/V
    (both streams) with the cross-attention's own tensors; 10 % and 256 MiB of margin.
    ``fused=False`` (default: whether the model runs the fused step): the more generous
    estimate for the per-block modules.
    """
    if fused is None:
        fused = model.fused_supported()
    d = model.hidden_size
    t = num_parts * (latent_tokens + 1)
    item = torch.empty((), dtype=model.cd).element_size()
    kv = 2 * num_parts * cond_tokens * 2 * d * item  # one uncached block's K/V
    if not fused:
        stream = t * d * 4 * 8
        ffn = 3 * 2 * t * (4 * d + 16) * item
        attn = 4 * t * 3 * d * item
        skips = (model.depth // 2) * t * d * 4
        return stream + ffn + attn + kv + skips
    row = t * d * item
    stream = t * d * 4 + (model.depth // 2) * row + 2 * row + row  # h, skips, concat, x
    top_k = next((b.moe.top_k for b in model.blocks if b.use_moe), 0)
    # padded input + sorted routes + [k·T, 4D] hidden (+ one row of slack); dense FFN: 6
    moe = (2 + 5 * top_k) * row
    block = max(8 * row, moe, kv + 6 * row)
    return int(1.1 * (stream + block)) + (256 << 20)


def plan_cache_blocks(model: PartFormerDiT, num_parts: int, latent_tokens: int,
                      obj_tokens: int, geo_tokens: int, requested: int | str = "auto",
                      device: torch.device | str | None = None, *,
                      fused: bool | None = None) -> int:
    """How many blocks (the first ones) get their cross-attention K/V cached.

    ``requested``: ``"all"``, ``"none"``, an int, or ``"auto"`` = as many as fit in the
    memory budget after the step's activations (1.41 GB per part in bf16 at full size).
    """
    depth = model.depth
    if requested == "all":
        return depth
    if requested == "none":
        return 0
    if isinstance(requested, int):
        return max(0, min(depth, requested))
    if requested != "auto":
        raise ValueError(f"cache_blocks must be 'auto', 'all', 'none' or an int, "
                         f"not {requested!r}")
    per_block = kv_cache_bytes_per_block(model, num_parts, obj_tokens, geo_tokens)
    if per_block == 0:
        return depth
    fixed = step_activation_bytes(model, num_parts, latent_tokens, max(obj_tokens, geo_tokens),
                                  fused=fused)
    return memory.items_that_fit(per_block, device or model.device, fixed=fixed, minimum=0,
                                 maximum=depth)


# --------------------------------------------------------------------------- runner

class DiTRunner:
    """One denoising step of a prepared :class:`PartFormerDiT` for a fixed K and condition.

    ``runner(x, t, part_index)``: latents ``x`` [K, n, C] (any float dtype; cast to the
    compute dtype exactly as the first Linear would), ``t`` the model timestep in [0, 1]
    shared by all parts (a float, a 0-dim or [1] tensor; of a [K] tensor the first entry is
    used), ``part_index`` [K] long (device tensor, see :func:`draw_part_index`).  Returns the
    velocity [K, n, C] in the compute dtype.

    ``kernels``, ``sdpa``, ``kv_layout``: see the module documentation (None: environment).
    """

    def __init__(self, model: PartFormerDiT, obj_cond: torch.Tensor | None,
                 geo_cond: torch.Tensor | None, *, cache_blocks: int | str = "auto",
                 cuda_graph: bool | None = None, compile: bool | None = None,
                 compile_mode: str | None = None, latent_tokens: int | None = None,
                 kernels: str | None = None, sdpa: str | None = None,
                 kv_layout: str | None = None):
        if not model.prepared:
            raise RuntimeError("call model.prepare(numerics) first")
        self.model = model
        self.device = model.device
        cd = model.cd
        ref = obj_cond if obj_cond is not None else geo_cond
        if ref is None:
            raise ValueError("no condition given")
        self.num_parts = ref.shape[0]
        if model.use_part_embed and self.num_parts > model.valid_num:
            raise ValueError(f"K = {self.num_parts} parts exceed valid_num = {model.valid_num}")
        if compile is None:
            compile = switch("TURBOPART_DIT_COMPILE", False)
        # exact keeps the official op-for-op eager arithmetic (and its per-expert loop).
        compile = bool(compile) and model.numerics is Numerics.FAST
        self.opts = self._options(kernels, sdpa, kv_layout, compile)
        self.obj = None if obj_cond is None else obj_cond.to(self.device, cd)
        self.geo = None if geo_cond is None else geo_cond.to(self.device, cd)
        n_lat = latent_tokens or model.params.get("input_size", 1024)
        s_obj = 0 if self.obj is None else self.obj.shape[1]
        s_geo = 0 if self.geo is None else self.geo.shape[1]
        self.cached_blocks = plan_cache_blocks(model, self.num_parts, n_lat, s_obj, s_geo,
                                               cache_blocks, self.device,
                                               fused=self.opts.fused)
        self.kv: list = [None] * model.depth
        with autocast(model.numerics, self.device), torch.no_grad():
            for i in range(self.cached_blocks):
                self.kv[i] = model.blocks[i].cross_kv(self.obj, self.geo)
        if self.cached_blocks == model.depth:
            self.obj = self.geo = None  # not needed any more
        grouped = all(b.moe.impl == "grouped" for b in model.blocks if b.use_moe)
        if cuda_graph is None:
            small = self.num_parts * n_lat <= GRAPH_MAX_TOKENS
            cuda_graph = (self.device.type == "cuda" and model.numerics is Numerics.FAST
                          and grouped and switch("TURBOPART_DIT_GRAPH", small))
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph needs a CUDA model")
        self.use_graph = bool(cuda_graph)
        self.compile_mode = compile_mode or os.environ.get("TURBOPART_DIT_COMPILE_MODE")
        self.block_fns = self._compiled_blocks() if compile else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ pieces

    def _options(self, kernels: str | None, sdpa: str | None, kv_layout: str | None,
                 compile: bool) -> StepOptions:
        """The step configuration (arguments, else environment variables)."""
        m = self.model
        if kernels is None:
            kernels = os.environ.get("TURBOPART_DIT_KERNELS", "all")
        fused, groups = StepOptions.parse_kernels(kernels)
        sd = StepOptions.parse_sdpa(sdpa if sdpa is not None else
                                    os.environ.get("TURBOPART_DIT_SDPA", "auto"))
        layout = (kv_layout or os.environ.get("TURBOPART_DIT_KV_LAYOUT", "strided")).lower()
        if layout not in ("strided", "contiguous"):
            raise ValueError(f"kv_layout must be 'strided' or 'contiguous', not {layout!r}")
        if m.numerics is not Numerics.FAST:
            # exact: the official modules, op for op, PyTorch's own SDPA choice.
            return StepOptions(fused=False, kernels=frozenset(),
                               sdpa=StepOptions.parse_sdpa("auto"), kv_layout="contiguous")
        if compile or not m.fused_supported():
            fused = False
        if fused and groups and not nn_kernels.available(self.device):
            if self.device.type == "cuda":
                warnings.warn("Triton is unavailable: the fused DiT step runs its PyTorch "
                              "formulation (TURBOPART_DIT_KERNELS=none)")
            groups = frozenset()
        if "moe" in groups and "ln" not in groups:
            groups = groups - {"moe"}  # the MoE combine rides in the residual kernel
        return StepOptions(fused=fused, kernels=groups if fused else frozenset(), sdpa=sd,
                           kv_layout=layout)

    def _compiled_blocks(self) -> list | None:
        try:
            import torch._dynamo as dynamo
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
            if hasattr(dynamo.config, "accumulated_cache_size_limit"):
                dynamo.config.accumulated_cache_size_limit = max(
                    dynamo.config.accumulated_cache_size_limit, 512)
            import torch._inductor.config as inductor_config
            if hasattr(inductor_config, "emulate_precision_casts"):
                # Round fused intermediates where eager rounds (bf16 op outputs), so the
                # compiled blocks compute what the eager ones do (bitwise on the CPU).
                inductor_config.emulate_precision_casts = True
            kw = {"mode": self.compile_mode} if self.compile_mode else {}
            return [torch.compile(b, dynamic=False, **kw) for b in self.model.blocks]
        except Exception as exc:  # pragma: no cover - depends on the installation
            warnings.warn(f"torch.compile unavailable ({exc}); running eager")
            return None

    def _time(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        return t.reshape(-1)[:1].to(torch.float32)

    def describe(self) -> str:
        """The configuration in use (for logs and benchmark records)."""
        extra = " compiled" if self.block_fns is not None else ""
        return (f"{self.opts.describe()}{extra} cached={self.cached_blocks}/"
                f"{self.model.depth} graph={self.use_graph}")

    def forward_eager(self, x: torch.Tensor, t: torch.Tensor, part_index: torch.Tensor | None
                      ) -> torch.Tensor:
        """The step without a graph (autocast for ``exact`` is entered by the caller)."""
        m = self.model
        c = m.time_embed(t)                      # once for all parts: [1, 1, D]
        if self.opts.fused:
            return m.forward_fused(x, c, part_index, self.obj, self.geo, self.kv, self.opts)
        h = m.embed(x, c, part_index)
        h = m.run_blocks(h, self.obj, self.geo, self.kv, None, self.block_fns)
        return m.final_layer(h, m.cd)

    def _run_eager(self, x, t, idx):
        try:
            return self.forward_eager(x, t, idx)
        except Exception as exc:
            if self.block_fns is None and not self.opts.fused:
                raise
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            what = "compiled DiT blocks" if self.block_fns is not None else \
                f"fused DiT step ({self.opts.describe()})"
            warnings.warn(f"{what} failed ({type(exc).__name__}: {exc}); falling back to the "
                          f"per-block modules", stacklevel=2)
            self.block_fns = None
            self.opts = dataclasses.replace(self.opts, fused=False, kernels=frozenset())
            return self.forward_eager(x, t, idx)

    def _capture(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None) -> None:
        st = self._static
        st["x"] = torch.empty(x.shape, device=self.device, dtype=self.model.cd)
        st["t"] = torch.empty(1, device=self.device, dtype=torch.float32)
        st["idx"] = torch.zeros(self.num_parts, device=self.device, dtype=torch.long)
        st["x"].copy_(x)
        st["t"].copy_(t)
        if idx is not None:
            st["idx"].copy_(idx)
        use_idx = st["idx"] if idx is not None else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS/cuDNN plans, compilation, allocator
                self._run_eager(st["x"], st["t"], use_idx)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st["out"] = self.forward_eager(st["x"], st["t"], use_idx)
        self.graph = graph

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor | float,
                 part_index: torch.Tensor | None = None, *, clone: bool = True
                 ) -> torch.Tensor:
        x = x.to(self.device)
        t = self._time(t)
        idx = None if part_index is None else \
            torch.as_tensor(part_index, device=self.device).reshape(-1).long()
        if x.shape[0] != self.num_parts:
            raise ValueError(f"latents have {x.shape[0]} parts, the condition {self.num_parts}")
        with autocast(self.model.numerics, self.device), \
                backend_context(self.opts.uniform_sdpa):
            if not self.use_graph:
                return self._run_eager(x, t, idx)
            if self.graph is None:
                try:
                    self._capture(x, t, idx)
                except Exception as exc:
                    warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                                  f"running eager")
                    self.use_graph, self.graph, self._static = False, None, {}
                    torch.cuda.synchronize(self.device)
                    return self._run_eager(x, t, idx)
            st = self._static
            if st["x"].shape != x.shape:
                raise ValueError("latent shape changed; build a new DiTRunner")
            st["x"].copy_(x)
            st["t"].copy_(t)
            if idx is not None:
                st["idx"].copy_(idx)
            self.graph.replay()
            return st["out"].clone() if clone else st["out"]

    def close(self) -> None:
        """Free the caches and the graph."""
        self.kv = [None] * self.model.depth
        self.graph, self._static = None, {}
        self.obj = self.geo = None


# --------------------------------------------------------------------------- sampling loop

def part_indices(num_steps: int, num_parts: int, valid_num: int,
                 generator: torch.Generator | None = None, *, deterministic: bool = False
                 ) -> torch.Tensor:
    """[steps, K] part-embedding rows, one official ``randperm(valid_num)[:K]`` per step.

    All draws are made up front (one per step, skipped steps included), so the generator
    ends in the state the official loop leaves the global CPU generator in.
    """
    return torch.stack([draw_part_index(num_parts, valid_num, generator,
                                        deterministic=deterministic)
                        for _ in range(num_steps)])


def denoise(model: PartFormerDiT, latents: torch.Tensor,
            cond: Mapping[str, torch.Tensor] | None = None, *,
            scheduler: FlowMatchEulerScheduler | None = None, num_inference_steps: int = 50,
            sigmas: np.ndarray | None = None,
            part_index: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
            generator: torch.Generator | None = None, skip_noop: bool | None = None,
            runner: DiTRunner | None = None,
            callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]
            | None = None, **runner_kwargs) -> torch.Tensor:
    """The official denoising loop (spec §5.2) from initial noise ``latents`` [K, n, C].

    * ``part_index``: [steps, K] rows, or ``f(step) -> [K]``; else drawn per step from
      ``generator`` (:func:`part_indices`).
    * ``skip_noop`` (default: ``fast``): no model evaluation for steps with dt = 0 (the
      last one), which is output-identical.
    * ``callback(i, timestep, latents_after, model_output_or_None)`` after every step.

    Returns the final latents (bf16 on CUDA, as the official loop leaves them).
    """
    k = latents.shape[0]
    dev = model.device
    sched = scheduler or FlowMatchEulerScheduler()
    n = num_inference_steps if sigmas is None else len(sigmas)
    sched.set_timesteps(n, device=dev,
                        sigmas=np.linspace(0, 1, n) if sigmas is None else sigmas)
    if isinstance(part_index, torch.Tensor):
        idx_all = part_index.to(dev).long()
        get_idx = lambda i: idx_all[i]  # noqa: E731
    elif callable(part_index):
        get_idx = part_index
    elif model.use_part_embed:
        idx_all = part_indices(n, k, model.valid_num, generator).to(dev)
        get_idx = lambda i: idx_all[i]  # noqa: E731
    else:
        get_idx = lambda i: None  # noqa: E731
    if runner is None:
        cond = cond or {}
        runner = DiTRunner(model, cond.get("obj_cond"), cond.get("geo_cond"),
                           latent_tokens=latents.shape[1], **runner_kwargs)
    if skip_noop is None:
        skip_noop = model.numerics is Numerics.FAST
    x = latents.to(dev)
    for i in range(n):
        if skip_noop and sched.is_noop(i):
            # dt = 0: the official step only casts the sample to the model-output dtype.
            x = x.to(model.cd)
            sched._step_index = i + 1
            if callback is not None:
                callback(i, sched.timesteps[i], x, None)
            continue
        t_model = sched.model_timestep(i, x.dtype)
        v = runner(x, t_model, get_idx(i))
        x = sched.step(v, None, x, step_index=i)
        if callback is not None:
            callback(i, sched.timesteps[i], x, v)
    return x
