"""The X-Part ShapeVAE (official ``VolumeDecoderShapeVAE``), with official state-dict keys.

Pieces (spec xpart §3):

* :class:`PointEncoder` (§3.2, official ``PointCrossAttentionEncoder``): random subset of the
  surface, farthest-point-sampled queries, one cross-attention block, ``layers`` self-attention
  blocks, ``ln_post`` (eps 1e-5).  Used by the conditioner ("encode_shape", before pre_kl).
* ``pre_kl`` / ``post_kl`` and the posterior (mean | logvar, logvar clamped to [−30, 20]).
* the decoder (§3.3): ``post_kl`` then a 16-block :class:`Transformer`, **no final norm**.
* :class:`GeometryDecoder` (§3.4, official ``CrossAttentionDecoder``): Fourier(query) cast to
  the latents' dtype → query_proj → one cross-attention block → ln_post (eps 1e-5) →
  output_proj.  The logit is **positive inside**.  Its fast query API caches the latents'
  keys/values once per part (:meth:`GeometryDecoder.precompute_kv`) and evaluates chunks of
  queries against them (:meth:`GeometryDecoder.query`), either op for op as the official
  code (``eager``) or through fused kernels (``fused``: Triton LayerNorm/residual/output
  kernels, flash-style attention with q_norm fused, optional GEMM epilogues; the same
  rounding points, fp32 reduction order aside).  ``TURBOPART_DECODER`` picks the path
  (default: fused for ``fast`` numerics on CUDA, eager otherwise), see
  :meth:`GeometryDecoder.query_mode` and :class:`FusedOptions`.

Every random draw is explicit: the subset permutation and the FPS start per batch item are
arguments (or come from a ``torch.Generator``); ``encode`` takes the posterior noise ``eps``.

Builder contract (``turbopart.weights``): :func:`build`, :func:`default_params`,
:func:`tiny_config`.  ``skip_unused=True`` leaves out the encoder and ``pre_kl`` (X-Part only
decodes, spec §1.5).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.fps import farthest_point_sampling
from ..nn.attention import attention
from ..nn.fourier import FourierEmbedder, fourier_features
from ..runtime import memory
from ..runtime.switches import switch
from .decoding import GridQuery
from .vae_blocks import (ResidualCrossAttentionBlock, Transformer, compute_dtype, layer_norm,
                         linear)

OFFICIAL_TARGET = "partgen.models.autoencoders.VolumeDecoderShapeVAE"

#: Official constructor defaults of VolumeDecoderShapeVAE (spec xpart §1.2).
CONSTRUCTOR_DEFAULTS: dict[str, Any] = {
    "num_encoder_layers": 8, "pc_size": 5120, "pc_sharpedge_size": 5120, "point_feats": 3,
    "downsample_ratio": 20, "geo_decoder_downsample_ratio": 1,
    "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_ln_post": True, "num_freqs": 8,
    "include_pi": True, "qkv_bias": True, "qk_norm": False, "label_type": "binary",
    "drop_path_rate": 0.0, "scale_factor": 1.0, "use_ln_post": True,
}

#: FPS running-minimum start value of torch_cluster (spec xpart §3.2).
FPS_INIT_DIST = 5e4


def default_params() -> dict:
    """``infer.yaml`` shapevae params (the official full-size config.json ``params``)."""
    return {
        "num_latents": 1024, "embed_dim": 64, "num_freqs": 8, "include_pi": False,
        "heads": 16, "width": 1024, "num_encoder_layers": 8, "num_decoder_layers": 16,
        "qkv_bias": False, "qk_norm": True, "scale_factor": 1.0039506158752403,
        "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_downsample_ratio": 1,
        "geo_decoder_ln_post": True, "point_feats": 4, "pc_size": 81920,
        "pc_sharpedge_size": 0,
    }


def tiny_params() -> dict:
    """The golden ``shapevae`` case's configuration (width 32, 4 heads, 32 latents)."""
    return {
        "num_latents": 32, "embed_dim": 8, "num_freqs": 8, "include_pi": False, "heads": 4,
        "width": 32, "num_encoder_layers": 2, "num_decoder_layers": 2, "qkv_bias": False,
        "qk_norm": True, "scale_factor": 1.0039506158752403,
        "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_downsample_ratio": 1,
        "geo_decoder_ln_post": True, "point_feats": 4, "pc_size": 1024,
        "pc_sharpedge_size": 0,
    }


def tiny_config() -> dict:
    return {"target": OFFICIAL_TARGET, "params": tiny_params()}


def params_of(config: Mapping[str, Any] | None) -> dict:
    """Constructor arguments with the official defaults filled in (config.json or params)."""
    if config is None:
        p = default_params()
    else:
        p = dict(config.get("params", config)) if "params" in config or "target" in config \
            else dict(config)
    out = dict(CONSTRUCTOR_DEFAULTS)
    out.update(p)
    for key in ("num_latents", "embed_dim", "width", "heads", "num_decoder_layers"):
        if key not in out:
            raise ValueError(f"ShapeVAE config lacks {key!r}")
    return out


# --------------------------------------------------------------------------- encoder

@dataclass
class EncoderSizes:
    """Subset / query sizes of ``sample_points_and_latents`` (spec xpart §3.2)."""
    num_input: int     # random subset size (num_latents · downsample_ratio)
    num_query: int     # FPS count ceil(fp32(n) · fp32(ratio))
    ratio: float


def encoder_sizes(num_latents: int, downsample_ratio: int, pc_size: int,
                  pc_sharpedge_size: int) -> EncoderSizes:
    """The official size arithmetic, float quirks included.

    num_random_query = pc_size / (pc_size + sharp) · num_latents (a float);
    input size = int(num_random_query · downsample_ratio); FPS ratio = queries / input size;
    torch_cluster returns ceil(n · ratio) points, with n and ratio in float32.
    """
    num_pts = num_latents * downsample_ratio
    nl = int(num_pts / downsample_ratio)
    nrq = pc_size / (pc_size + pc_sharpedge_size) * nl
    n_in = int(nrq * downsample_ratio)
    ratio = nrq / n_in
    nq = int(math.ceil(float(torch.tensor(float(n_in), dtype=torch.float32)
                             * torch.tensor(ratio, dtype=torch.float32))))
    return EncoderSizes(n_in, nq, ratio)


def fps_start_from_uniform(u: torch.Tensor, n: int) -> torch.Tensor:
    """torch_cluster's random start: trunc(fp32(u) · fp32(n)).  Clamped to n−1 (the product
    can round up to n for u within 2^-24 of 1, an out-of-range read in the original)."""
    s = (u.float() * float(n)).long()
    return s.clamp_(max=n - 1)


class SampledPoints(NamedTuple):
    """Explicit encoder sampling: ``input_idx`` [n] rows of the surface (shared by the
    batch, the official randperm subset); ``query_idx`` [B, L] rows of that subset (FPS)."""
    input_idx: torch.Tensor
    query_idx: torch.Tensor


class PointEncoder(nn.Module):
    """Official ``PointCrossAttentionEncoder`` (spec xpart §3.2)."""

    def __init__(self, fourier: FourierEmbedder, *, num_latents: int, downsample_ratio: int,
                 pc_size: int, pc_sharpedge_size: int, point_feats: int, width: int,
                 heads: int, layers: int, qkv_bias: bool, qk_norm: bool, use_ln_post: bool):
        super().__init__()
        self.fourier_embedder = fourier
        self.num_latents = num_latents
        self.downsample_ratio = downsample_ratio
        self.pc_size = pc_size
        self.pc_sharpedge_size = pc_sharpedge_size
        self.point_feats = point_feats
        self.width = width
        self.heads = heads
        self.input_proj = nn.Linear(fourier.out_dim + point_feats, width)
        self.cross_attn = ResidualCrossAttentionBlock(width, heads, qkv_bias, qk_norm)
        self.self_attn = Transformer(width, layers, heads, qkv_bias, qk_norm) \
            if layers > 0 else None
        self.ln_post = nn.LayerNorm(width) if use_ln_post else None  # eps 1e-5

    @property
    def sizes(self) -> EncoderSizes:
        return encoder_sizes(self.num_latents, self.downsample_ratio, self.pc_size,
                             self.pc_sharpedge_size)

    # ---------------------------------------------------------------- sampling

    def _check_surface(self, surface: torch.Tensor) -> None:
        if self.pc_sharpedge_size != 0:
            raise NotImplementedError("sharp-edge surface points (pc_sharpedge_size > 0) are not "
                                      "used by X-Part and not supported")
        if surface.shape[-2] != self.pc_size:
            raise ValueError(f"the encoder needs exactly pc_size = {self.pc_size} surface points "
                             f"(the official code splits the rows into [pc_size, sharp]); "
                             f"got {surface.shape[-2]}")

    def draw(self, batch: int, device: torch.device | str,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official draws in order: randperm(pc_size), then U[0,1) per batch item
        (both on ``device``/``generator``, as the official CUDA generator)."""
        gdev = generator.device if generator is not None else device
        perm = torch.randperm(self.pc_size, device=gdev, generator=generator)
        u = torch.rand(batch, device=gdev, generator=generator)
        return perm.to(device), fps_start_from_uniform(u, self.sizes.num_input).to(device)

    def sample(self, xyz: torch.Tensor, randperm: torch.Tensor, fps_start: torch.Tensor,
               query_idx: torch.Tensor | None = None) -> SampledPoints:
        """Subset = ``randperm[:n]``; FPS (torch_cluster semantics: squared distance, running
        minimum from 5e4, first index on ties) of ``L`` queries from each batch item's subset,
        starting at ``fps_start[b]``.  ``xyz``: [B, pc_size, 3] (or [1, …] shared).
        ``query_idx`` [B, L]: recorded FPS picks (golden replays) instead of running FPS."""
        sizes = self.sizes
        input_idx = randperm[:sizes.num_input].to(xyz.device)
        if query_idx is not None:
            return SampledPoints(input_idx, query_idx.to(xyz.device))
        sub = xyz[:, input_idx]
        start = torch.as_tensor(fps_start, device=xyz.device).reshape(-1)
        if sub.shape[0] == 1 and start.numel() > 1:  # one shared cloud, several starts
            sub = sub.expand(start.numel(), -1, -1)
        q = farthest_point_sampling(sub, sizes.num_query, start, ties="first",
                                    init_dist=FPS_INIT_DIST)
        return SampledPoints(input_idx, q)

    # ---------------------------------------------------------------- network

    def data_tokens(self, surface: torch.Tensor, input_idx: torch.Tensor, cdt: torch.dtype
                    ) -> torch.Tensor:
        """input_proj([Fourier(xyz) | feats]) of the subset rows, [B, n, W] in ``cdt``."""
        rows = surface[:, input_idx]
        xyz, feats = rows[..., :3], rows[..., 3:3 + self.point_feats]
        f = self.fourier_embedder(xyz)
        if self.point_feats:
            f = torch.cat([f, feats.to(f.dtype)], dim=-1)
        return linear(f, self.input_proj, cdt)

    def encode_tokens(self, data: torch.Tensor, query_idx: torch.Tensor, cdt: torch.dtype
                      ) -> torch.Tensor:
        """Encoder output (after ln_post) for queries ``query_idx`` [B, L] of ``data``.

        ``data`` is [B, n, W], or [1, n, W] shared by all B query sets (the object encoder,
        spec §8.7 item 12): then ln_2/c_kv run once and the B query sets attend to the same
        keys as one long query sequence (rows of attention are independent, so this equals
        B separate calls).  Query tokens are rows of ``data`` (same point, same projection).
        """
        b, lq = query_idx.shape
        w = data.shape[-1]
        # data side in row chunks: ~24 bytes per (row, channel) of transients (fp32 LN, c_kv)
        rows = memory.items_that_fit(24 * w * data.shape[0], data.device, minimum=1024)
        kv = self.cross_attn.kv(data, cdt, rows)
        if data.shape[0] == 1 and b > 1:
            query = data[0, query_idx.reshape(-1)].reshape(1, b * lq, w)
        else:
            query = torch.gather(data, 1, query_idx[..., None].expand(b, lq, w))
        x = self.cross_attn.forward_kv(query, kv, cdt).reshape(b, lq, w)
        if self.self_attn is not None:
            x = self.self_attn(x, cdt)
        if self.ln_post is not None:
            x = layer_norm(x, self.ln_post)
        return x

    def forward(self, surface: torch.Tensor, sampled: SampledPoints, cdt: torch.dtype,
                max_batch: int | None = None) -> torch.Tensor:
        """Latents [B, L, W] (fp32 after ln_post) of ``surface`` [B or 1, pc_size, C]."""
        self._check_surface(surface)
        b = sampled.query_idx.shape[0]
        if surface.shape[0] == 1:
            data = self.data_tokens(surface, sampled.input_idx, cdt)
            return self.encode_tokens(data, sampled.query_idx, cdt)
        if surface.shape[0] != b:
            raise ValueError(f"{surface.shape[0]} surfaces for {b} query sets")
        step = max_batch or self.batch_that_fits(surface.device)
        outs = []
        for s in range(0, b, step):
            data = self.data_tokens(surface[s:s + step], sampled.input_idx, cdt)
            outs.append(self.encode_tokens(data, sampled.query_idx[s:s + step], cdt))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def batch_that_fits(self, device: torch.device | str) -> int:
        """Surfaces encoded together: data tokens and K/V per item (the data-side transients
        are chunked), plus the query tokens' activations."""
        n, w = self.sizes.num_input, self.width
        per_item = n * w * (4 + 2) * 2 + self.sizes.num_query * w * 40
        return memory.items_that_fit(per_item, device)


# --------------------------------------------------------------------------- geometry decoder

class DecoderKV(NamedTuple):
    """What :meth:`GeometryDecoder.query` needs per part batch: the latents' keys (after
    k_norm) and values [B, H, T, d], and the decoder weights in the matmul dtype."""
    k: torch.Tensor
    v: torch.Tensor
    weights: "DecoderWeights"

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def select(self, start: int, stop: int) -> "DecoderKV":
        return DecoderKV(self.k[start:stop], self.v[start:stop], self.weights)


class DecoderWeights(NamedTuple):
    """Geometry-decoder weights in the matmul dtype; LayerNorm weights in fp32;
    ``query_w`` zero-padded to an aligned width (exact: zero columns add nothing).
    ``feat_dtype``: the latents' dtype, which the official code casts the Fourier features
    to before query_proj (bf16 in the pipeline, where it equals the matmul dtype)."""
    feat_dtype: torch.dtype
    frequencies: torch.Tensor
    query_w: torch.Tensor
    query_b: torch.Tensor
    ln1_w: torch.Tensor | None
    ln1_b: torch.Tensor | None
    cq_w: torch.Tensor
    cq_b: torch.Tensor | None
    qn_w: torch.Tensor | None
    qn_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln3_w: torch.Tensor | None
    ln3_b: torch.Tensor | None
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    lnp_w: torch.Tensor | None
    lnp_b: torch.Tensor | None
    out_w: torch.Tensor
    out_b: torch.Tensor


def _decode_chunk(pts: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: DecoderWeights,
                  heads: int, include_input: bool, has_ln_post: bool, has_qk_norm: bool,
                  block_eps: float, post_eps: float) -> torch.Tensor:
    """Logits [B, q] of query points ``pts`` [Bp, q, 3] (Bp = B, or 1 shared by all B parts)
    against cached ``k``/``v`` [B, H, T, d].  Official arithmetic (spec xpart §3.4/§3.5):
    Fourier in the promoted dtype of the points (fp32 for fp16/fp32, fp64 for fp64), cast to
    the matmul dtype; LayerNorms in fp32; every Linear in the matmul dtype."""
    cdt = w.query_w.dtype
    bp, q, _ = pts.shape
    b = k.shape[0]
    width = w.cq_w.shape[0]
    f = fourier_features(pts, w.frequencies, include_input=include_input,
                         out_dtype=w.feat_dtype).to(cdt)
    if f.shape[-1] < w.query_w.shape[1]:
        f = F.pad(f, (0, w.query_w.shape[1] - f.shape[-1]))
    e = F.linear(f, w.query_w, w.query_b)                                  # [Bp, q, W]
    h = F.layer_norm(e.float(), (width,), w.ln1_w, w.ln1_b, block_eps).to(cdt)
    qh = F.linear(h, w.cq_w, w.cq_b).view(bp, q, heads, -1)
    if has_qk_norm:
        qh = F.layer_norm(qh.float(), (qh.shape[-1],), w.qn_w, w.qn_b, block_eps).to(cdt)
    qh = qh.transpose(1, 2)
    if bp != b:  # one shared query set: materialise per part (SDPA backends want real strides)
        qh = qh.expand(b, -1, -1, -1).contiguous()
    a = attention(qh, k, v)                                                # [B, H, q, d]
    a = F.linear(a.transpose(1, 2).reshape(b, q, width), w.proj_w, w.proj_b)
    x = e + a
    h = F.layer_norm(x.float(), (width,), w.ln3_w, w.ln3_b, block_eps).to(cdt)
    h = F.linear(F.gelu(F.linear(h, w.fc_w, w.fc_b)), w.fc2_w, w.fc2_b)
    x = x + h
    if has_ln_post:
        x = F.layer_norm(x.float(), (width,), w.lnp_w, w.lnp_b, post_eps).to(cdt)
    return F.linear(x.to(cdt), w.out_w, w.out_b)[..., 0]


class FusedOptions(NamedTuple):
    """Choices of the fused geometry-decoder path (:func:`_decode_chunk_fused`).

    ``attn``: "triton" (default: flash-style kernel with q_norm fused and the shared coarse
    query set read once for every part), or SDPA after a q_norm kernel: "sdpa" (PyTorch's
    choice), "flash", "cudnn", "efficient".  cuDNN wins the fixed-shape micro-benchmark
    (21.2 / 18.5 M q/s coarse / fine against 20.2 / 18.0) but loses inside the pipeline,
    where every chunk of the fine levels has a new row count (1.75 s against 1.43 s for the
    8-part decode on the same H100).
    ``gemm``: "gelu_gluon" (default: c_fc + its exact GELU as a warp-specialised Gluon
    kernel whose GELU runs beside the next tile's tensor-core work,
    :mod:`~turbopart.nn.kernels.gelu_gemm_gluon`, the other Linears in cuBLAS; on GPUs
    other than Hopper, or without Gluon, exactly "cublas"; 5 % faster pipeline decoding
    than "cublas": see BENCHMARKS.md), "cublas" (every Linear in cuBLAS, GELU as
    ``F.gelu``), "gelu" / "gelu_tma" / "gelu_pers" (c_fc as a Triton GEMM with the bias +
    exact GELU epilogue: pointer loads, TMA loads, or TMA loads in a persistent kernel;
    "gelu_pers" ≈1 % faster than "cublas" in the pipeline), "triton" / "triton_tma" (all
    four 1024-wide Linears in Triton, residual adds in the c_proj epilogues).
    ``glue``: the LayerNorm / residual / output-projection kernels in Triton (False: the
    PyTorch ops, for checks).
    ``front``: for queries on a grid, :data:`FRONT_CHOICES`.
    """
    attn: str = "triton"
    gemm: str = "gelu_gluon"
    glue: bool = True
    front: str = "grid"

    @classmethod
    def from_env(cls) -> "FusedOptions":
        """``TURBOPART_DECODER_ATTN`` / ``TURBOPART_DECODER_GEMM`` /
        ``TURBOPART_DECODER_GLUE`` (0 = PyTorch glue) / ``TURBOPART_DECODER_FRONT`` over
        the defaults."""
        d = cls()
        choice = {}
        for name, options in (("attn", ATTN_CHOICES), ("gemm", GEMM_CHOICES),
                              ("front", FRONT_CHOICES)):
            var = f"TURBOPART_DECODER_{name.upper()}"
            choice[name] = os.environ.get(var, getattr(d, name)).lower()
            if choice[name] not in options:
                raise ValueError(f"{var} must be one of {options}, got {choice[name]!r}")
        return cls(choice["attn"], choice["gemm"], switch("TURBOPART_DECODER_GLUE"),
                   choice["front"])


ATTN_CHOICES = ("triton", "sdpa", "flash", "cudnn", "efficient")
GEMM_CHOICES = ("cublas", "gelu", "gelu_tma", "gelu_pers", "gelu_gluon", "triton", "triton_tma")
#: ``front``: queries on a grid (the volume decoder's levels) through the separable tables
#: of :mod:`~turbopart.nn.kernels.grid_front` ("grid"), or as points through Fourier,
#: query_proj, ln_1 and c_q with the official rounding points ("points").
FRONT_CHOICES = ("grid", "points")


class GridRows(NamedTuple):
    """A chunk of grid-vertex queries with the tables of their grid axis (fused path)."""
    lin: torch.Tensor
    tables: Any


#: ``TURBOPART_DECODER``: "auto" (fused on CUDA for bf16-stored weights, i.e. ``fast``
#: numerics; eager otherwise), "eager" (the official op sequence), "fused", "compile".
DECODER_MODES = ("auto", "eager", "fused", "compile")


def _have_triton() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def _sdpa_backend(name: str):
    if name in ("triton", "sdpa"):
        return None
    from torch.nn.attention import SDPBackend
    return [{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]]


def _decode_chunk_fused(pts: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: DecoderWeights,
                        heads: int, include_input: bool, has_ln_post: bool, has_qk_norm: bool,
                        block_eps: float, post_eps: float, opts: FusedOptions) -> torch.Tensor:
    """:func:`_decode_chunk` with fused kernels (:mod:`turbopart.nn.kernels.decoder_triton`).

    Same rounding points as the official sequence (Fourier in the points' promoted dtype cast
    to the matmul dtype; bf16 Linear outputs; LayerNorms in fp32 rounded to bf16; bf16
    residual adds; flash-style bf16 attention), only fp32 reduction orders differ.  Rows are
    part-major [B·q]; with one shared query set (``pts`` [1, q, 3], B parts) query_proj,
    ln_1 and c_q run once and the residual reads the shared rows.
    """
    from ..nn.kernels import decoder_triton as kern  # Triton is imported on first use
    cdt = w.query_w.dtype
    b = k.shape[0]
    width = w.cq_w.shape[0]
    glue = opts.glue
    gm = opts.gemm
    mode = gm.rpartition("_")[2] if gm.endswith(("_tma", "_pers", "_gluon")) else "ptr"
    all_triton = gm in ("triton", "triton_tma")
    gelu_triton = gm != "cublas"

    def lin(x, wt, bias, epi=0, res=None, use=all_triton):
        if use:
            return kern.linear(x, wt, bias, epi, res, mode=mode)
        return kern.linear_ref(x, wt, bias, epi, res)

    if isinstance(pts, GridRows):  # one shared set of grid vertices: separable front
        from ..nn.kernels.grid_front import grid_front
        bp, q = 1, pts.lin.shape[0]
        e, qh = grid_front(pts.lin, pts.tables, cdt, use_triton=glue)
    else:
        bp, q, _ = pts.shape
        f = kern.fourier_rows(pts.reshape(bp * q, 3), w.frequencies, include_input,
                              w.feat_dtype, cdt, w.query_w.shape[1], use_triton=glue)
        e = F.linear(f, w.query_w, w.query_b)                              # [Bp·q, W]
        del f
        h = kern.layer_norm(e, w.ln1_w, w.ln1_b, block_eps, use_triton=glue)
        qh = lin(h, w.cq_w, w.cq_b)
        del h
    qn_w = w.qn_w if has_qk_norm else None
    qn_b = w.qn_b if has_qk_norm else None
    if opts.attn == "triton":
        a = kern.attention(qh, k, v, qn_w, qn_b, block_eps, q)
    else:
        if glue and has_qk_norm:  # q_norm kernel, then SDPA on the normalised heads
            d = width // heads
            qh = kern.layer_norm(qh.view(-1, d), qn_w, qn_b, block_eps).view(bp * q, width)
            qn_w = qn_b = None
        a = kern.attention_ref(qh, k, v, qn_w, qn_b, block_eps, q,
                               backend=_sdpa_backend(opts.attn))
    del qh                                                                  # a: [B·q, W]
    if all_triton:
        x = lin(a, w.proj_w, w.proj_b, kern.EPI_RESIDUAL, e)
        del a, e
        _, h = kern.add_layer_norm(x, None, w.ln3_w, w.ln3_b, block_eps, use_triton=glue)
    else:
        p = F.linear(a, w.proj_w, w.proj_b)
        del a
        x, h = kern.add_layer_norm(e, p, w.ln3_w, w.ln3_b, block_eps, use_triton=glue)
        del p, e
    m = lin(h, w.fc_w, w.fc_b, kern.EPI_GELU, use=gelu_triton)
    del h
    lnw = w.lnp_w if has_ln_post else None
    lnb = w.lnp_b if has_ln_post else None
    if all_triton:
        x = lin(m, w.fc2_w, w.fc2_b, kern.EPI_RESIDUAL, x)
        del m
        out = kern.add_ln_dot(x, None, lnw, lnb, post_eps, w.out_w, w.out_b, use_triton=glue)
    else:
        y = F.linear(m, w.fc2_w, w.fc2_b)
        del m
        out = kern.add_ln_dot(x, y, lnw, lnb, post_eps, w.out_w, w.out_b, use_triton=glue)
    return out.view(b, q)


_COMPILED: dict[str, Any] = {}

#: torch.compile modes as inductor options (a mode and options cannot be combined).
_MODE_OPTIONS = {
    None: {}, "default": {},
    "max-autotune-no-cudagraphs": {"max_autotune": True, "triton.cudagraphs": False},
}


def _compiled_decode_chunk(mode: str | None):
    """``_decode_chunk`` through torch.compile (dynamic query count), keeping every official
    rounding step (inductor's ``emulate_precision_casts``: without it, fused bf16 chains skip
    intermediate roundings and ~half the logits move by an ulp)."""
    key = mode or "default"
    fn = _COMPILED.get(key)
    if fn is None:
        if mode not in _MODE_OPTIONS:
            raise ValueError(f"compile mode must be one of {sorted(k for k in _MODE_OPTIONS if k)}")
        opts = dict(_MODE_OPTIONS[mode], emulate_precision_casts=True)
        fn = torch.compile(_decode_chunk, dynamic=None, options=opts)
        _COMPILED[key] = fn
    return fn


class GeometryDecoder(nn.Module):
    """Official ``CrossAttentionDecoder`` (spec xpart §3.4); ``forward`` = ``query_geometry``."""

    #: Width of the Fourier operand of query_proj after zero padding (aligned GEMM).
    PAD = 8

    def __init__(self, fourier: FourierEmbedder, *, width: int, heads: int,
                 mlp_expand_ratio: int, downsample_ratio: int, enable_ln_post: bool,
                 qkv_bias: bool, qk_norm: bool, out_channels: int = 1):
        super().__init__()
        self.fourier_embedder = fourier
        self.downsample_ratio = downsample_ratio
        self.enable_ln_post = enable_ln_post
        self.width = width
        self.heads = heads
        self.query_proj = nn.Linear(fourier.out_dim, width)
        if downsample_ratio != 1:
            self.latents_proj = nn.Linear(width * downsample_ratio, width)
        if not enable_ln_post:  # official: no ln_post also switches the qk-norm off
            qk_norm = False
        self.qk_norm = qk_norm
        self.cross_attn_decoder = ResidualCrossAttentionBlock(
            width, heads, qkv_bias, qk_norm, mlp_expand_ratio=mlp_expand_ratio)
        if enable_ln_post:
            self.ln_post = nn.LayerNorm(width)  # eps 1e-5
        self.output_proj = nn.Linear(width, out_channels)
        #: torch.compile the per-chunk function (CUDA; falls back to eager on failure).
        self.compile: bool = False
        self.compile_mode: str | None = None
        #: Optional SDPA backends for the query attention (torch.nn.attention.SDPBackend list).
        self.sdpa_backends: list | None = None
        #: Query path: None reads ``TURBOPART_DECODER`` (default "auto"); or one of
        #: :data:`DECODER_MODES`.  :meth:`prepare` sets it from the numerics.
        self.kernel: str | None = None
        #: Fused-path choices; None reads them from the environment (:class:`FusedOptions`).
        self.fused_options: FusedOptions | None = None
        #: Paths that failed in this process (never retried; the eager path runs instead).
        self.failed_modes: set[str] = set()
        #: Separable-front tables of recent grid axes (:meth:`_grid_rows`).
        self._grid_tables: dict = {}

    # ---------------------------------------------------------------- official forward

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Official ``geo_decoder(queries, latents)``: logits [B, Q, out_channels]."""
        cdt = compute_dtype(latents.device, self.query_proj.weight)
        # official: Fourier features cast to the latents' dtype, then query_proj
        e = linear(self.fourier_embedder(queries, out_dtype=latents.dtype), self.query_proj, cdt)
        if self.downsample_ratio != 1:
            latents = linear(latents, self.latents_proj, cdt)
        x = self.cross_attn_decoder(e, latents, cdt)
        if self.enable_ln_post:
            x = layer_norm(x, self.ln_post)
        return linear(x, self.output_proj, cdt)

    # ---------------------------------------------------------------- fast query API

    def weights(self, cdt: torch.dtype, feat_dtype: torch.dtype | None = None
                ) -> DecoderWeights:
        """The decoder weights rounded to ``cdt`` once (what autocast would do per call)."""
        def mm(t):
            return None if t is None else t.to(cdt)

        def fp(t):
            return None if t is None else t.float()
        blk = self.cross_attn_decoder
        qp = self.query_proj
        pad = -qp.weight.shape[1] % self.PAD
        qw = F.pad(qp.weight.to(cdt), (0, pad))
        ln_q = blk.attn.attention.q_norm
        has_q = isinstance(ln_q, nn.LayerNorm)
        lnp = self.ln_post if self.enable_ln_post else None
        return DecoderWeights(
            feat_dtype=feat_dtype or cdt, frequencies=self.fourier_embedder.frequencies,
            query_w=qw, query_b=mm(qp.bias),
            ln1_w=fp(blk.ln_1.weight), ln1_b=fp(blk.ln_1.bias),
            cq_w=mm(blk.attn.c_q.weight), cq_b=mm(blk.attn.c_q.bias),
            qn_w=fp(ln_q.weight) if has_q else None, qn_b=fp(ln_q.bias) if has_q else None,
            proj_w=mm(blk.attn.c_proj.weight), proj_b=mm(blk.attn.c_proj.bias),
            ln3_w=fp(blk.ln_3.weight), ln3_b=fp(blk.ln_3.bias),
            fc_w=mm(blk.mlp.c_fc.weight), fc_b=mm(blk.mlp.c_fc.bias),
            fc2_w=mm(blk.mlp.c_proj.weight), fc2_b=mm(blk.mlp.c_proj.bias),
            lnp_w=fp(lnp.weight) if lnp is not None else None,
            lnp_b=fp(lnp.bias) if lnp is not None else None,
            out_w=mm(self.output_proj.weight), out_b=mm(self.output_proj.bias))

    @torch.no_grad()
    def precompute_kv(self, latents: torch.Tensor) -> DecoderKV:
        """Keys/values of decoded latents [B, T, W], once per part batch (spec §8.7 item 13:
        the official code recomputes c_kv for every 400 k-query chunk)."""
        cdt = compute_dtype(latents.device, self.query_proj.weight)
        lat = latents
        if self.downsample_ratio != 1:
            lat = linear(lat, self.latents_proj, cdt)
        kv = self.cross_attn_decoder.kv(lat, cdt)
        return DecoderKV(kv.k, kv.v, self.weights(cdt, latents.dtype))

    #: Upper bound of query rows (part × point) per chunk: 2^17 rows keep an H100 busy for
    #: ~7 ms per chunk (launch overhead hidden); more rows only add activation memory.
    MAX_ROWS = 1 << 17
    #: Lower bound on CUDA: below ~16 k rows the GEMMs lose efficiency and launches show, so
    #: a tight budget is overdrawn by at most this many rows of activations (~0.4–0.6 GB).
    MIN_ROWS_CUDA = 1 << 14

    def prepare(self, numerics) -> "GeometryDecoder":
        """Pick the query path for ``numerics``: ``exact`` keeps the official op sequence
        (eager), ``fast`` the fused kernels; ``TURBOPART_DECODER`` still overrides."""
        from ..runtime.precision import Numerics
        self.kernel = "fused" if Numerics.parse(numerics) is Numerics.FAST else "eager"
        return self

    def query_mode(self, device: torch.device | str) -> str:
        """The path :meth:`query` takes on ``device``: "eager", "fused" or "compile"."""
        device = torch.device(device)
        env = os.environ.get("TURBOPART_DECODER")
        mode = (env or self.kernel or "auto").lower()
        if mode not in DECODER_MODES:
            raise ValueError(f"TURBOPART_DECODER must be one of {DECODER_MODES}, got {mode!r}")
        if mode == "auto":
            if self.compile and device.type == "cuda":
                return "compile"
            fast_weights = self.query_proj.weight.dtype in (torch.bfloat16, torch.float16)
            if device.type == "cuda" and _have_triton() and fast_weights:
                return "fused"
            return "eager"
        if mode == "compile" and device.type != "cuda":
            return "eager"
        return "eager" if mode in self.failed_modes else mode

    def bytes_per_row(self, mode: str) -> int:
        """Activation bytes per query row at the chunk's peak (fused: ~20·W, eager ~40·W)."""
        return (24 if mode == "fused" else 40) * self.width

    def rows_per_chunk(self, device: torch.device | str, max_rows: int | None = None) -> int:
        """Query rows (part × point) per chunk from the memory budget, at least
        :data:`MIN_ROWS_CUDA` on CUDA (1024 elsewhere), at most ``max_rows`` / MAX_ROWS."""
        device = torch.device(device)
        cap = max_rows or self.MAX_ROWS
        floor = min(cap, self.MIN_ROWS_CUDA if device.type == "cuda" else 1024)
        return memory.items_that_fit(self.bytes_per_row(self.query_mode(device)), device,
                                     minimum=floor, maximum=cap)

    def _chunk_fn(self, mode: str, opts: FusedOptions | None):
        if mode == "compile":
            return _compiled_decode_chunk(self.compile_mode)
        if mode == "fused":
            return lambda *a: _decode_chunk_fused(*a, opts)
        return _decode_chunk

    #: Grid axes whose separable-front tables are kept (the levels of one decode).
    GRID_TABLES_KEPT = 4

    def _grid_rows(self, grid: GridQuery, w: DecoderWeights) -> GridRows:
        """The chunk's rows with the tables of its axis (built once per axis and weights)."""
        from ..nn.kernels.grid_front import grid_tables
        ax = grid.axis
        key = (ax.data_ptr(), ax.shape[0], ax.dtype, ax.device, id(w))
        hit = self._grid_tables.get(key)
        if hit is None:
            tabs = grid_tables(ax, w.frequencies, self.fourier_embedder.include_input,
                               w.feat_dtype, w.query_w, w.query_b, w.ln1_w, w.ln1_b,
                               w.cq_w, w.cq_b, self.cross_attn_decoder.ln_1.eps)
            while len(self._grid_tables) >= self.GRID_TABLES_KEPT:
                self._grid_tables.pop(next(iter(self._grid_tables)))
            hit = self._grid_tables[key] = (ax, w, tabs)  # ax, w kept: their ids stay valid
        return GridRows(grid.lin, hit[2])

    def _run_chunk(self, pts, kv: DecoderKV) -> torch.Tensor:
        mode = self.query_mode(kv.k.device)
        opts = (self.fused_options or FusedOptions.from_env()) if mode == "fused" else None
        grid = pts if isinstance(pts, GridQuery) else None
        if grid is not None:  # grid rows for the fused separable front, else the points
            pts = (self._grid_rows(grid, kv.weights) if opts is not None and opts.front == "grid"
                   else grid.points().unsqueeze(0))
        args = (pts, kv.k, kv.v, kv.weights, self.heads, self.fourier_embedder.include_input,
                self.enable_ln_post, self.qk_norm, self.cross_attn_decoder.ln_1.eps,
                self.ln_post.eps if self.enable_ln_post else 1e-5)
        fn = self._chunk_fn(mode, opts)
        ctx = None
        if self.sdpa_backends:
            from torch.nn.attention import sdpa_kernel
            ctx = sdpa_kernel(self.sdpa_backends)
        try:
            if ctx is not None:
                with ctx:
                    return fn(*args)
            return fn(*args)
        except Exception as exc:  # compiled / fused path failed: warn once, fall back to eager
            if fn is _decode_chunk or memory.is_oom(exc):
                raise
            warnings.warn(f"geometry decoder path {mode!r} failed ({type(exc).__name__}: "
                          f"{exc}); using the eager path from now on", RuntimeWarning)
            self.failed_modes.add(mode)
            if grid is not None:
                args = (grid.points().unsqueeze(0),) + args[1:]
            return _decode_chunk(*args)

    @torch.no_grad()
    def query(self, points: torch.Tensor | GridQuery, kv: DecoderKV, *,
              max_rows: int | None = None) -> torch.Tensor:
        """Logits [B, Q] (positive inside; matmul dtype) of ``points`` [B, Q, 3] against the
        cached ``kv`` of B parts.  ``points`` may be [1, Q, 3]: one query set shared by all
        parts (the coarse grid) — its projection and queries are computed once — or a
        :class:`~turbopart.xpart.decoding.GridQuery` (grid vertices shared by all parts).
        The points' dtype sets the Fourier precision, as officially: fp16 coordinates are
        embedded in fp32, fp64 coordinates in fp64 (spec §3.5)."""
        grid = isinstance(points, GridQuery)
        bp, nq = (1, len(points)) if grid else points.shape[:2]
        b = kv.batch
        if bp not in (1, b):
            raise ValueError(f"{bp} query sets for {b} cached parts")
        out = torch.empty(b, nq, dtype=kv.dtype, device=kv.k.device)
        if nq == 0:
            return out

        def rows_of(i, s, e):  # query sets i (all when None), points s:e
            if grid:
                return points.sliced(s, e)
            return points[:, s:e] if i is None else points[i:i + 1, s:e]
        rows = self.rows_per_chunk(kv.k.device, max_rows)
        if bp == 1 and b > 1:  # shared queries: chunk the query axis, all parts at once
            step = max(1, rows // b)
            for s in range(0, nq, step):
                out[:, s:s + step] = self._run_chunk(rows_of(None, s, s + step), kv)
            return out
        if nq >= rows:
            for i in range(b):
                kvi = kv.select(i, i + 1)
                for s in range(0, nq, rows):
                    out[i:i + 1, s:s + rows] = self._run_chunk(rows_of(i, s, s + rows), kvi)
            return out
        parts = max(1, rows // nq)
        for i in range(0, b, parts):
            pts = points if grid else points[i:i + parts]
            out[i:i + parts] = self._run_chunk(pts, kv.select(i, i + parts))
        return out

    @torch.no_grad()
    def query_packed(self, points: torch.Tensor, counts, kv: DecoderKV, *,
                     max_rows: int | None = None) -> torch.Tensor:
        """Logits [M] of ``points`` [M, 3] packed part after part: part i owns ``counts[i]``
        consecutive rows (host integers; the hierarchical decoder's per-part query lists)."""
        counts = [int(c) for c in counts]
        if len(counts) != kv.batch or sum(counts) != points.shape[0]:
            raise ValueError("counts must give one row count per cached part, summing to M")
        out = torch.empty(points.shape[0], dtype=kv.dtype, device=kv.k.device)
        rows = self.rows_per_chunk(kv.k.device, max_rows)
        start = 0
        for i, c in enumerate(counts):
            kvi = kv.select(i, i + 1)
            for s in range(start, start + c, rows):
                e = min(s + rows, start + c)
                out[s:e] = self._run_chunk(points[None, s:e], kvi)[0]
            start += c
        return out


# --------------------------------------------------------------------------- the VAE

class Posterior(NamedTuple):
    """Diagonal Gaussian of ``pre_kl`` moments (logvar clamped to [−30, 20])."""
    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * eps.to(self.mean.dtype)


class ShapeVAE(nn.Module):
    """Official ``VolumeDecoderShapeVAE`` layout: ``encoder``, ``pre_kl``, ``post_kl``,
    ``transformer``, ``geo_decoder`` (one shared Fourier embedder, no state-dict key).

    ``with_encoder`` / ``with_pre_kl`` / ``with_decoder`` leave out parts a user never reads
    (X-Part: the decoder only; the conditioner: the encoder only)."""

    def __init__(self, params: Mapping[str, Any], *, with_encoder: bool = True,
                 with_pre_kl: bool = True, with_decoder: bool = True):
        super().__init__()
        p = params_of(params)
        self.params = p
        self.num_latents = int(p["num_latents"])
        self.embed_dim = int(p["embed_dim"])
        self.width = int(p["width"])
        self.heads = int(p["heads"])
        self.scale_factor = p["scale_factor"]
        width, heads = self.width, self.heads
        self.fourier_embedder = FourierEmbedder(num_freqs=p["num_freqs"],
                                                include_pi=p["include_pi"])
        if with_encoder:
            self.encoder = PointEncoder(
                self.fourier_embedder, num_latents=self.num_latents,
                downsample_ratio=int(p["downsample_ratio"]), pc_size=int(p["pc_size"]),
                pc_sharpedge_size=int(p["pc_sharpedge_size"]),
                point_feats=int(p["point_feats"]), width=width, heads=heads,
                layers=int(p["num_encoder_layers"]), qkv_bias=bool(p["qkv_bias"]),
                qk_norm=bool(p["qk_norm"]), use_ln_post=bool(p["use_ln_post"]))
        if with_pre_kl:
            self.pre_kl = nn.Linear(width, 2 * self.embed_dim)
        if with_decoder:
            self.post_kl = nn.Linear(self.embed_dim, width)
            self.transformer = Transformer(width, int(p["num_decoder_layers"]), heads,
                                           bool(p["qkv_bias"]), bool(p["qk_norm"]))
            r = int(p["geo_decoder_downsample_ratio"])
            self.geo_decoder = GeometryDecoder(
                self.fourier_embedder, width=width // r, heads=heads // r,
                mlp_expand_ratio=int(p["geo_decoder_mlp_expand_ratio"]), downsample_ratio=r,
                enable_ln_post=bool(p["geo_decoder_ln_post"]), qkv_bias=bool(p["qkv_bias"]),
                qk_norm=bool(p["qk_norm"]))

    def _cdt(self, device) -> torch.dtype:
        return compute_dtype(device, next(self.parameters()))

    def prepare(self, numerics) -> "ShapeVAE":
        """Numerics-dependent choices (the geometry decoder's query path, see
        :meth:`GeometryDecoder.prepare`); weights are not touched."""
        geo = getattr(self, "geo_decoder", None)
        if geo is not None:
            geo.prepare(numerics)
        return self

    # ---------------------------------------------------------------- encoding

    @torch.no_grad()
    def encode_shape(self, surface: torch.Tensor, randperm: torch.Tensor | None = None,
                     fps_start: torch.Tensor | None = None, *,
                     generator: torch.Generator | None = None, return_points: bool = False,
                     query_idx: torch.Tensor | None = None):
        """Official ``encode_shape``: encoder latents [B, L, W] (after ln_post, before pre_kl).

        ``surface`` [B, pc_size, 3 + point_feats] (xyz, normal, sharp label).
        ``randperm``: the official ``randperm(pc_size)`` (only the first n rows are used);
        ``fps_start`` [B]: FPS start rows within the subset.  Missing draws are made with
        ``generator`` in the official order (:meth:`PointEncoder.draw`).  ``query_idx``
        [B, L]: recorded FPS picks (rows of the subset) to use instead of running FPS.
        With ``return_points`` also returns ``(query_pc [B, L, 3], input_pc [B, n, 3],
        sampled)``."""
        enc = self.encoder
        enc._check_surface(surface)
        if randperm is None or fps_start is None:
            p, s = enc.draw(surface.shape[0], surface.device, generator)
            randperm = p if randperm is None else randperm
            fps_start = s if fps_start is None else fps_start
        sampled = enc.sample(surface[..., :3], randperm, fps_start, query_idx)
        lat = enc(surface, sampled, self._cdt(surface.device))
        if not return_points:
            return lat
        input_pc = surface[:, sampled.input_idx, :3]
        if input_pc.shape[0] == 1 and sampled.query_idx.shape[0] > 1:
            input_pc = input_pc.expand(sampled.query_idx.shape[0], -1, -1)
        query_pc = torch.gather(input_pc, 1, sampled.query_idx[..., None].expand(-1, -1, 3))
        return lat, (query_pc, input_pc, sampled)

    @torch.no_grad()
    def posterior(self, latents: torch.Tensor) -> tuple[Posterior, torch.Tensor]:
        """(posterior, moments) of encoder latents: pre_kl → mean | clamp(logvar, −30, 20)."""
        moments = linear(latents, self.pre_kl, self._cdt(latents.device))
        mean, logvar = moments.chunk(2, dim=-1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0)), moments

    @torch.no_grad()
    def encode(self, surface: torch.Tensor, sample_posterior: bool = True,
               eps: torch.Tensor | None = None, *, randperm: torch.Tensor | None = None,
               fps_start: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Official ``encode``: the posterior mean, or ``mean + std·eps`` when sampling
        (``eps`` drawn with ``generator`` after the encoder's draws when not given)."""
        lat = self.encode_shape(surface, randperm, fps_start, generator=generator)
        post, _ = self.posterior(lat)
        if not sample_posterior:
            return post.mean
        if eps is None:
            eps = torch.randn(post.mean.shape, device=post.mean.device, generator=generator)
        return post.sample(eps)

    # ---------------------------------------------------------------- decoding

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """post_kl → transformer (no final norm), [B, T, W] in the matmul dtype.  The
        pipeline divides by ``scale_factor`` first (spec §3.3)."""
        cdt = self._cdt(latents.device)
        return self.transformer(linear(latents, self.post_kl, cdt), cdt)

    forward = decode

    @torch.no_grad()
    def query_geometry(self, queries: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """Official ``query_geometry``: logits [B, Q] (positive inside)."""
        return self.geo_decoder(queries, decoded)[..., 0]


def build(config: dict | None = None, *, skip_unused: bool = False) -> ShapeVAE:
    """The ShapeVAE of a shapevae ``config.json`` (None: full size).  ``skip_unused`` omits
    the encoder and pre_kl (X-Part decodes only; the loader still validates them)."""
    return ShapeVAE(params_of(config), with_encoder=not skip_unused,
                    with_pre_kl=not skip_unused)
