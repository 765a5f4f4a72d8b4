"""The X-Part conditioner (official ``Conditioner``), with official state-dict keys.

Spec xpart §4.  Three branches, then two out-projections:

* ``geo_encoder.local_encoder``: a ShapeVAE encoder over each part's in-box surface
  ("latents_shape": encoder output after ln_post, before pre_kl) → [K, 4096, 1024];
* ``obj_encoder``: the same architecture over the object surface, once per part copy (the
  copies differ only by their FPS start) → [K, 4096, 1024];
* ``seg_feat_encoder``: Sonata + MLP (1232→512→512→512) on the object cloud, once →
  point features [N, 512];
* every query point takes the Sonata feature of its nearest object point; ``[latents |
  feature]`` (1536) → ``obj_out_proj`` / ``geo_out_proj`` (1536→1024).

Speed without approximation (spec §8.7 items 11–12):

* no [K, 4096, 81 920] cdist: part tokens use a chunked nearest-neighbour search with cdist's
  own arithmetic (:mod:`turbopart.xpart.nearest`); object tokens use the FPS source index
  directly (``obj_match="index"``; see :meth:`Conditioner.forward` for the duplicate-position
  nuance) or the same search (``obj_match="search"``);
* the object encoder's per-point work (Fourier, input_proj, ln_2, c_kv over all object
  points) runs once and is shared by the K copies; their K query sets attend to the shared
  keys as one sequence;
* both FPS runs (K parts + K object copies) are one batched device loop.

Numerics: ``exact`` = the official arithmetic (bf16 autocast emulation on CUDA for the VAE
encoders and out-projections; Sonata in fp32 with fp16 attention per its config); ``fast`` =
the same with bf16 weights (and Sonata's fast path).  On the CPU everything is fp32.

Random draws are explicit (:class:`ConditionerDraws`): geo randperm + per-part FPS starts, obj
randperm + per-copy FPS starts, Sonata voxel choice + curve-order perms.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..geometry.fps import farthest_point_sampling
from .graphed_fps import GRAPHED_FPS
from ..runtime.precision import Numerics
from ..sonata.config import SonataConfig
from ..sonata.features import point_features
from ..sonata.model import Sonata
from . import vae as vae_mod
from .nearest import nearest_neighbors
from .vae_blocks import compute_dtype, linear

OFFICIAL_TARGET = "partgen.models.conditioner.condioner_release.Conditioner"
PART_ENCODER_TARGET = "partgen.models.conditioner.part_encoders.PartEncoder"
SEG_FEAT_TARGET = "partgen.models.conditioner.sonata_extractor.SonataFeatureExtractor"

#: Width of the official seg-feature MLP (hard-coded 512 in SonataFeatureExtractor and in the
#: ``Linear(1024 + 512, output_dim)`` out-projections).
SEG_FEAT_DIM = 512


def _vae_params(num_latents: int, scale_factor) -> dict:
    p = vae_mod.default_params()
    p["num_latents"] = num_latents
    p["scale_factor"] = scale_factor
    return p


def default_params() -> dict:
    """``infer.yaml`` conditioner params (the official full-size config.json ``params``)."""
    return {
        "use_geo": True, "use_obj": True, "use_seg_feat": True,
        "geo_cfg": {
            "target": PART_ENCODER_TARGET, "output_dim": 1024,
            "params": {
                "use_local": True, "local_feat_type": "latents_shape", "num_tokens_cond": 4096,
                "local_geo_cfg": {"target": vae_mod.OFFICIAL_TARGET,
                                  "params": _vae_params(4096, 1.0039506158752403)},
            },
        },
        "obj_encoder_cfg": {"target": vae_mod.OFFICIAL_TARGET, "output_dim": 1024,
                            "params": _vae_params(4096, 1.0039506158752403)},
        "seg_feat_cfg": {"target": SEG_FEAT_TARGET},
    }


def tiny_config() -> dict:
    """The golden ``conditioner`` case's config (24/20 latents, width 32, K-independent) with
    its tiny Sonata and seg-feature width under ``"turbopart"`` (official dirs carry neither:
    full size = ``sonata.json`` and 512)."""
    vae = vae_mod.tiny_params()
    geo = dict(vae, num_latents=24)
    obj = dict(vae, num_latents=20)
    sonata = SonataConfig(enc_depths=(2, 2, 2, 2, 2), enc_channels=(8, 8, 16, 16, 24),
                          enc_num_head=(1, 1, 2, 2, 2), enc_patch_size=(64,) * 5,
                          enable_flash=False)
    return {
        "target": OFFICIAL_TARGET,
        "params": {
            "use_geo": True, "use_obj": True, "use_seg_feat": True,
            "geo_cfg": {"target": PART_ENCODER_TARGET, "output_dim": 48,
                        "params": {"use_local": True, "local_feat_type": "latents_shape",
                                   "num_tokens_cond": 24,
                                   "local_geo_cfg": {"target": vae_mod.OFFICIAL_TARGET,
                                                     "params": geo}}},
            "obj_encoder_cfg": {"target": vae_mod.OFFICIAL_TARGET, "output_dim": 40,
                                "params": obj},
            "seg_feat_cfg": {"target": SEG_FEAT_TARGET},
        },
        "turbopart": {"sonata": sonata.to_official(), "seg_feat_dim": 32},
    }


# --------------------------------------------------------------------------- modules

class SegFeatureExtractor(nn.Module):
    """Official ``SonataFeatureExtractor``: ``sonata`` (PTv3 encoder) and ``mlp`` =
    Linear(out_channels→hidden), GELU, Linear(hidden→hidden), GELU, Linear(hidden→dim)."""

    def __init__(self, sonata: SonataConfig, dim: int = SEG_FEAT_DIM, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.sonata = Sonata(sonata)
        self.mlp = nn.Sequential(nn.Linear(sonata.out_channels, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.dim = dim


class PartEncoder(nn.Module):
    """Official ``PartEncoder`` (use_local, "latents_shape"): ``local_encoder`` (a ShapeVAE)
    and, only if ``local_global_feat_dim`` is set, ``local_out_layer``."""

    def __init__(self, params: Mapping[str, Any], *, skip_unused: bool):
        super().__init__()
        if not params.get("use_local", False):
            raise NotImplementedError("PartEncoder with use_local=False has no features")
        self.local_feat_type = params.get("local_feat_type", "latents")
        if self.local_feat_type != "latents_shape":
            raise NotImplementedError(f"local_feat_type {self.local_feat_type!r} (X-Part uses "
                                      f"'latents_shape')")
        self.num_tokens_cond = params.get("num_tokens_cond")
        vae_params = vae_mod.params_of(params["local_geo_cfg"])
        self.local_encoder = _encoder_vae(vae_params, skip_unused)
        dim = params.get("local_global_feat_dim")
        if dim is not None:
            self.local_out_layer = nn.Linear(int(vae_params["width"]), int(dim))


def _encoder_vae(params: Mapping[str, Any], skip_unused: bool) -> vae_mod.ShapeVAE:
    """A conditioner ShapeVAE: only its encoder is used (spec §1.5)."""
    return vae_mod.ShapeVAE(params, with_encoder=True, with_pre_kl=not skip_unused,
                            with_decoder=not skip_unused)


@dataclass
class ConditionerDraws:
    """The conditioner's random draws, in the official order (spec xpart §7 rows 6–8).

    ``*_randperm``: permutation of the pc_size surface rows (first n used);
    ``*_fps_start`` [K]: FPS start row within each item's subset;
    ``*_fps_picks`` [K, L]: optional recorded FPS picks (rows of each subset; golden
    replays) used instead of running FPS from the starts;
    ``sonata_voxel_choice`` / ``sonata_perms``: see :func:`turbopart.sonata.features.point_features`
    (None: drawn there with ``sonata_generator``)."""
    geo_randperm: torch.Tensor | None = None
    geo_fps_start: torch.Tensor | None = None
    obj_randperm: torch.Tensor | None = None
    obj_fps_start: torch.Tensor | None = None
    sonata_voxel_choice: torch.Tensor | None = None
    sonata_perms: Sequence[torch.Tensor] | None = None
    geo_fps_picks: torch.Tensor | None = None
    obj_fps_picks: torch.Tensor | None = None

    @classmethod
    def from_rng(cls, rng: Mapping[str, torch.Tensor], conditioner: "Conditioner", parts: int,
                 *, picks: bool = False) -> "ConditionerDraws":
        """From recorded draws named as the golden cases do (``geo.randperm``,
        ``geo.fps_index`` (torch_cluster rows of the flattened [K·n] subsets; the first pick
        of each item is its start), ``obj.*``, ``sonata.gridsample_index``,
        ``sonata.shuffle_orders_perm.{i}``), i.e. ``case.prefixed("rng.")`` or
        ``case.prefixed("rng.cond.")``.  With ``picks`` the recorded FPS picks are replayed
        too (otherwise only their starts are used and FPS runs)."""
        def picks_of(name: str, n: int):
            if name not in rng:
                return None
            idx = rng[name].reshape(parts, -1)
            return idx - (torch.arange(parts, device=idx.device) * n)[:, None]

        d = cls()
        for tag, enc in (("geo", conditioner.geo_vae if conditioner.use_geo else None),
                         ("obj", conditioner.obj_encoder if conditioner.use_obj else None)):
            if enc is None:
                continue
            p = picks_of(f"{tag}.fps_index", enc.encoder.sizes.num_input)
            setattr(d, f"{tag}_randperm", rng.get(f"{tag}.randperm"))
            setattr(d, f"{tag}_fps_start", None if p is None else p[:, 0])
            if picks:
                setattr(d, f"{tag}_fps_picks", p)
        d.sonata_voxel_choice = rng.get("sonata.gridsample_index")
        perms = []
        while f"sonata.shuffle_orders_perm.{len(perms)}" in rng:
            perms.append(rng[f"sonata.shuffle_orders_perm.{len(perms)}"])
        d.sonata_perms = perms or None
        return d

    def complete(self, conditioner: "Conditioner", parts: int, device: torch.device,
                 generator: torch.Generator | None) -> "ConditionerDraws":
        """Fill missing encoder draws with ``generator`` in the official order: geo randperm,
        geo rand(K), obj randperm, obj rand(K) (all device draws in the official code)."""
        d = dataclasses.replace(self)
        for name, enc in (("geo", conditioner.geo_vae if conditioner.use_geo else None),
                          ("obj", conditioner.obj_encoder if conditioner.use_obj else None)):
            if enc is None:
                continue
            perm, start = getattr(d, f"{name}_randperm"), getattr(d, f"{name}_fps_start")
            if perm is None or start is None:
                p, s = enc.encoder.draw(parts, device, generator)
                setattr(d, f"{name}_randperm", p if perm is None else perm)
                setattr(d, f"{name}_fps_start", s if start is None else start)
        return d


class Conditioner(nn.Module):
    """Official ``Conditioner`` layout: ``geo_encoder``, ``geo_out_proj``, ``obj_encoder``,
    ``obj_out_proj``, ``seg_feat_encoder``.

    ``skip_unused`` leaves out what inference never reads (spec §1.5): pre_kl, post_kl,
    transformer and geo_decoder of both VAEs and Sonata's ``mask_token``."""

    def __init__(self, config: Mapping[str, Any] | None = None, *, skip_unused: bool = False):
        super().__init__()
        config = copy.deepcopy(dict(config)) if config is not None else \
            {"target": OFFICIAL_TARGET, "params": default_params()}
        params = config.get("params", config)
        extra = config.get("turbopart", {}) or {}
        self.use_geo = bool(params.get("use_geo", True))
        self.use_obj = bool(params.get("use_obj", True))
        self.use_seg_feat = bool(params.get("use_seg_feat", False))
        sonata_cfg = SonataConfig.from_official(extra.get("sonata"))
        if skip_unused:
            sonata_cfg = dataclasses.replace(sonata_cfg, mask_token=False)
        seg_dim = int(extra.get("seg_feat_dim", SEG_FEAT_DIM))
        seg_hidden = int(extra.get("seg_feat_hidden", seg_dim))
        geo_cfg = params.get("geo_cfg")
        obj_cfg = params.get("obj_encoder_cfg")
        seg_cfg = params.get("seg_feat_cfg")
        if self.use_geo and geo_cfg is not None:
            self.geo_encoder = PartEncoder(geo_cfg.get("params", {}), skip_unused=skip_unused)
            if "output_dim" in geo_cfg:
                self.geo_out_proj = nn.Linear(self.geo_vae.width + seg_dim,
                                              int(geo_cfg["output_dim"]))
        else:
            self.use_geo = False
        if self.use_obj and obj_cfg is not None:
            self.obj_encoder = _encoder_vae(vae_mod.params_of(obj_cfg), skip_unused)
            if "output_dim" in obj_cfg:
                self.obj_out_proj = nn.Linear(self.obj_encoder.width + seg_dim,
                                              int(obj_cfg["output_dim"]))
        else:
            self.use_obj = False
        if self.use_seg_feat and seg_cfg is not None:
            self.seg_feat_encoder = SegFeatureExtractor(sonata_cfg, seg_dim, seg_hidden)
            if "output_dim" in seg_cfg:  # official attribute, never used by forward
                self.seg_feat_outproj = nn.Linear(seg_dim, int(seg_cfg["output_dim"]))
        else:
            self.use_seg_feat = False
        #: Replay the FPS loop from a CUDA graph on repeated calls (bit-identical).
        self.graph_fps = True

    @property
    def geo_vae(self) -> vae_mod.ShapeVAE:
        return self.geo_encoder.local_encoder

    def _cdt(self, device) -> torch.dtype:
        ref = self.geo_vae if self.use_geo else self.obj_encoder
        return compute_dtype(device, ref.encoder.input_proj.weight)

    # ---------------------------------------------------------------- pieces

    def _sample(self, part_surface, obj_xyz, draws: ConditionerDraws):
        """Subsets and FPS queries of both encoders; one batched FPS loop when sizes agree."""
        jobs = []
        out = {}
        k = part_surface.shape[0]
        for name, enc, xyz in (("geo", self.geo_vae.encoder if self.use_geo else None,
                                part_surface[..., :3]),
                               ("obj", self.obj_encoder.encoder if self.use_obj else None,
                                obj_xyz[None])):
            if enc is None:
                continue
            enc._check_surface(xyz)
            idx = getattr(draws, f"{name}_randperm")[:enc.sizes.num_input].to(xyz.device)
            picks = getattr(draws, f"{name}_fps_picks")
            if picks is not None:  # recorded FPS picks (golden replay)
                out[name] = vae_mod.SampledPoints(idx, picks.to(xyz.device))
                continue
            sub = xyz[:, idx]
            if sub.shape[0] != k:
                sub = sub.expand(k, -1, -1)
            jobs.append((name, enc, idx, sub, getattr(draws, f"{name}_fps_start")))
        fps = GRAPHED_FPS if self.graph_fps else farthest_point_sampling
        same = len(jobs) == 2 and jobs[0][3].shape == jobs[1][3].shape and \
            jobs[0][1].sizes.num_query == jobs[1][1].sizes.num_query
        if same:
            pts = torch.cat([jobs[0][3], jobs[1][3]])
            start = torch.cat([torch.as_tensor(j[4], device=pts.device).reshape(-1)
                               for j in jobs])
            q = fps(pts, jobs[0][1].sizes.num_query, start, ties="first",
                    init_dist=vae_mod.FPS_INIT_DIST)
            k = jobs[0][3].shape[0]
            for (name, _, idx, _, _), qi in zip(jobs, (q[:k], q[k:])):
                out[name] = vae_mod.SampledPoints(idx, qi)
            return out
        for name, enc, idx, sub, start in jobs:
            q = fps(sub.contiguous(), enc.sizes.num_query,
                    torch.as_tensor(start, device=sub.device).reshape(-1),
                    ties="first", init_dist=vae_mod.FPS_INIT_DIST)
            out[name] = vae_mod.SampledPoints(idx, q)
        return out

    def _project(self, latents, point_feat, matches, proj: nn.Linear | None, cdt):
        """``proj([latents | point_feat[matches]])`` (official concat then out-projection;
        rounding each operand to the matmul dtype first is what the GEMM sees anyway)."""
        if point_feat is None:
            return latents
        feats = point_feat.index_select(0, matches.reshape(-1)).reshape(*matches.shape, -1)
        if proj is None:  # official: no output_dim -> the fp32 concat itself
            return torch.cat([latents.float(), feats.float()], dim=-1)
        x = torch.cat([latents.to(cdt), feats.to(cdt)], dim=-1)
        return linear(x, proj, cdt)

    # ---------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, part_surface: torch.Tensor, object_surface: torch.Tensor, *,
                draws: ConditionerDraws | None = None,
                generator: torch.Generator | None = None,
                sonata_generator: torch.Generator | None = None,
                numerics: Numerics | str = Numerics.FAST, obj_match: str = "index",
                cpu_numpy_aliasing: bool = False, return_intermediates: bool = False
                ) -> dict[str, torch.Tensor]:
        """``{"obj_cond": [K, L_obj, D_obj], "geo_cond": [K, L_geo, D_geo]}``.

        ``part_surface`` [K, N, 7]; ``object_surface`` [N, 7] — one copy (a [1, N, 7] or an
        expanded [K, N, 7] tensor is accepted; only its first row is read).
        ``draws``: explicit random draws (missing encoder draws come from ``generator``,
        missing Sonata draws from ``sonata_generator``).

        ``obj_match``: how object query tokens find their object point.  ``"index"`` (default)
        takes the FPS source row directly: the query *is* that object point, so cdist's
        argmin returns it, except (a) for an exact duplicate position at a lower row (the
        object cloud is fp16-quantised, so duplicates occur; argmin returns the first), which
        lies in the same Sonata voxel and therefore has the same feature, and (b) rare
        cases where cdist's fp32 matrix-multiplication formula (~1e-7 absolute error in the
        squared distance) ranks a distinct neighbour a few 1e-4 away (the fp16 spacing)
        ahead of the query point itself; the feature differs only if that neighbour lies in
        another 0.005 voxel.  ``"search"`` runs the cdist-equivalent search (bit-faithful to
        the official matches, a few ms more per call).

        ``cpu_numpy_aliasing``: reproduce the official CPU-only side effect (the Sonata
        transform's in-place CenterShift of the caller's object surface before the matches;
        golden ``output.cpu_numpy_aliasing.*``).  Real runs follow the CUDA behaviour.
        ``return_intermediates`` adds geo/obj latents, query points, Sonata point features
        and the matches.
        """
        numerics = Numerics.parse(numerics)
        fast = numerics is Numerics.FAST
        if obj_match not in ("index", "search"):
            raise ValueError("obj_match must be 'index' or 'search'")
        if object_surface.dim() == 3:
            object_surface = object_surface[0]
        k = part_surface.shape[0]
        dev = part_surface.device
        cdt = self._cdt(dev)
        draws = (draws or ConditionerDraws()).complete(self, k, dev, generator)
        obj_xyz = object_surface[:, :3]
        sampled = self._sample(part_surface, obj_xyz, draws)
        out: dict[str, torch.Tensor] = {}

        geo_lat = geo_q = obj_lat = obj_q = None
        if self.use_geo:
            s = sampled["geo"]
            geo_lat = self.geo_vae.encoder(part_surface, s, cdt)
            sub = part_surface[:, s.input_idx, :3]
            geo_q = torch.gather(sub, 1, s.query_idx[..., None].expand(-1, -1, 3))
            if hasattr(self.geo_encoder, "local_out_layer"):
                geo_lat = linear(geo_lat, self.geo_encoder.local_out_layer, cdt)
        if self.use_obj:
            s = sampled["obj"]
            obj_lat = self.obj_encoder.encoder(object_surface[None], s, cdt)
            obj_rows = s.input_idx[s.query_idx]                       # [K, L] object rows
            obj_q = obj_xyz[obj_rows]

        point_feat = None
        if self.use_seg_feat:
            seg = self.seg_feat_encoder
            sf = point_features(seg.sonata, obj_xyz.float(), object_surface[:, 3:6].float(),
                                head=seg.mlp, numerics=numerics,
                                voxel_choice=draws.sonata_voxel_choice,
                                perms=draws.sonata_perms, generator=sonata_generator)
            point_feat = sf.point_feat
            match_xyz = obj_xyz
            if cpu_numpy_aliasing:
                match_xyz = sf.shifted_points.to(obj_xyz.dtype)
                out["object_surface_after_call"] = torch.cat(
                    [match_xyz, object_surface[:, 3:]], dim=-1)[None]
            if self.use_obj:
                if obj_match == "index" and not cpu_numpy_aliasing:
                    gm = obj_rows
                else:
                    gm = nearest_neighbors(obj_q, match_xyz, fused=fast)
                out["obj_cond"] = self._project(obj_lat, point_feat, gm,
                                                getattr(self, "obj_out_proj", None), cdt)
                out["nearest_global_matches"] = gm
            if self.use_geo:
                lm = nearest_neighbors(geo_q, match_xyz, fused=fast)
                out["geo_cond"] = self._project(geo_lat, point_feat, lm,
                                                getattr(self, "geo_out_proj", None), cdt)
                out["nearest_local_matches"] = lm
        else:
            if self.use_obj:
                out["obj_cond"] = obj_lat
            if self.use_geo:
                out["geo_cond"] = geo_lat

        if not return_intermediates:
            return {key: out[key] for key in ("obj_cond", "geo_cond") if key in out}
        if geo_lat is not None:
            out["geo_latents"] = geo_lat
            out["geo_query_pc"] = geo_q
        if obj_lat is not None:
            out["obj_latents"] = obj_lat
            out["obj_query_pc"] = obj_q
        if point_feat is not None:
            out["sonata_point_feat"] = point_feat[None]
        return out


def build(config: dict | None = None, *, skip_unused: bool = False) -> Conditioner:
    """The conditioner of a conditioner ``config.json`` (None: full size)."""
    return Conditioner(config, skip_unused=skip_unused)
