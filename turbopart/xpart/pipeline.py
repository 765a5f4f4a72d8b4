"""X-Part generation: a mesh and part boxes → one mesh per part (spec xpart §3.3–3.6, §5, §6).

:class:`XPartPipeline` keeps the DiT, the ShapeVAE, the conditioner and the scheduler loaded
and runs, for all K parts together:

1. preprocessing (:mod:`turbopart.xpart.preprocess`): normalisation to ±0.8, the object
   surface (``SampleMesh`` quirks), the part surfaces (a face belongs to a box if any vertex
   is inside; empty boxes dropped; the same seed for every part);
2. the conditioner (one call for the K parts);
3. the flow-matching loop over all K parts (K ≤ 50), the DiT's cross-attention keys/values
   computed once for the whole loop;
4. the VAE decoder on ``latents · (1 / scale_factor)`` (the official expression), all parts
   in one batch, and the geometry decoder's keys/values once per part;
5. hierarchical volume decoding (:mod:`turbopart.xpart.decoding`), parts in memory-sized
   groups;
6. marching cubes on the device (level −1/512, the decoder's mask), the official clean-up
   (faces reversed, non-finite vertices dropped, long edges, floaters), denormalisation.

Random draws (spec §7) are explicit.  One device generator seeded with ``noise_seed`` gives,
in the official order, the initial noise ``randn(K, 1024, 64)`` and the conditioner's
randperm/FPS starts (the official code draws all of them from the global CUDA generator,
so seeding it with the same value reproduces them); a CPU generator gives the part-embedding
permutation ``randperm(50)`` of every step and the Sonata voxel choice / curve shuffles
(official: the global CPU torch and NumPy generators, whose state depends on model
construction, so they cannot be reproduced by seeding).  Part colours come from a fixed
palette (official: ``np.random.randint``).

Low resolutions: the official decoder asserts ``octree_resolution >= 256``; we accept any
resolution ≥ 16 (below 190 the grid is decoded densely, see :mod:`decoding`), and scale the
clean-up's long-edge threshold (official 8/512 in normalised units) to ``max(8/512, 8/R)``
so coarse grids do not lose their triangles.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..mesh import GlbMesh
from ..runtime import memory
from ..runtime.precision import Numerics
from ..runtime.profiling import Profile
from ..runtime.switches import switch
from . import decoding
from . import preprocess as pp
from .. import _lazy_import

trimesh = _lazy_import("trimesh")  # imported on first use (start-up time)

log = logging.getLogger(__name__)

#: Official defaults (``PartFormerPipeline.__call__`` / demo).
DEFAULT_STEPS = 50
DEFAULT_OCTREE = 512
DEFAULT_SEED = 42
MAX_PARTS = 50  # official valid_num: rows of part_embed

#: Presets: quality = the official defaults; balanced / fast = ours (fewer Euler steps and a
#: coarser final grid; cost scales with steps and with the surface band of the grid).
PRESETS: dict[str, dict[str, int]] = {
    "quality": {"steps": 50, "octree_resolution": 512},
    "balanced": {"steps": 30, "octree_resolution": 384},
    "fast": {"steps": 20, "octree_resolution": 256},
}

#: Official clean-up thresholds (spec §3.6).
EDGE_FACTOR = 8.0          # long-edge threshold 8/512 at octree 512
FLOATER_RATIO = 0.005


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def edge_threshold(octree_resolution: int) -> float:
    """Long-edge threshold of the clean-up: official 8/512, or 8/R below 512 (ours)."""
    return max(EDGE_FACTOR / 512.0, EDGE_FACTOR / float(octree_resolution))


# --------------------------------------------------------------------------- results

@dataclass
class PartResult:
    """One generated part (``mesh`` None when it produced no surface)."""

    index: int                      # position among the generated parts (0..K-1)
    box_index: int                  # index of its box in the caller's box list
    box: np.ndarray                 # [2, 3] in the input frame
    mesh: trimesh.Trimesh | None    # input frame, coloured
    queries: list[int] = field(default_factory=list)   # decoder queries per level
    raw_faces: int = 0              # marching-cubes faces before clean-up
    color: np.ndarray | None = None
    area: float | None = None       # surface area in the input frame (None: from the mesh)
    reused: list[int] = field(default_factory=list)    # per level: values from the level before
    center: np.ndarray | None = None  # mean vertex (explode offsets); None: from the mesh

    def __post_init__(self):
        if self.center is None and self.mesh is not None and len(self.mesh.vertices):
            # here, where the part is finished (a worker thread beside the decoding), not
            # when the exploded scene is written after the last part
            self.center = np.asarray(self.mesh.vertices).mean(axis=0)

    @property
    def name(self) -> str:
        return f"part_{self.index:03d}"

    @property
    def ok(self) -> bool:
        return self.mesh is not None and len(self.mesh.faces) > 0

    def info(self) -> dict[str, Any]:
        m = self.mesh
        return {"id": self.index, "name": self.name, "box_index": self.box_index,
                "box": np.asarray(self.box, dtype=float).tolist(),
                "faces": int(len(m.faces)) if m is not None else 0,
                "vertices": int(len(m.vertices)) if m is not None else 0,
                "area": (self.area if self.area is not None else float(m.area))
                if m is not None else 0.0,
                "raw_faces": int(self.raw_faces), "queries": list(self.queries),
                "reused": list(self.reused),
                "color": None if self.color is None else [int(c) for c in self.color]}


@dataclass
class GenerationResult:
    parts: list[PartResult]
    center: np.ndarray
    scale: float
    latents: torch.Tensor | None = None          # [K, T, C] final latents (device)
    timings: dict[str, float] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    dropped_boxes: list[int] = field(default_factory=list)

    @property
    def meshes(self) -> list[trimesh.Trimesh]:
        return [p.mesh for p in self.parts if p.ok]

    def scene(self) -> trimesh.Scene:
        """One named, coloured node per generated part (input frame)."""
        return parts_scene(self.parts)

    def exploded(self, distance: float = 0.2) -> trimesh.Scene:
        return explode(self.parts, distance)

    def boxes_scene(self, mesh: trimesh.Trimesh) -> trimesh.Scene:
        return boxes_scene(mesh, [p.box for p in self.parts],
                           [p.color for p in self.parts])


# --------------------------------------------------------------------------- scenes

def _material(name: str, rgba) -> Any:
    from trimesh.visual.material import PBRMaterial
    return PBRMaterial(name=name, baseColorFactor=[int(c) for c in rgba], metallicFactor=0.0,
                       roughnessFactor=0.8, doubleSided=True)


def _colored(mesh: trimesh.Trimesh, name: str, rgba) -> trimesh.Trimesh:
    from trimesh.visual.texture import TextureVisuals
    m = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
    m.visual = TextureVisuals(material=_material(name, rgba))
    return m


def parts_scene(parts: Sequence[PartResult], transforms: dict[str, np.ndarray] | None = None
                ) -> trimesh.Scene:
    scene = trimesh.Scene()
    for p in parts:
        if not p.ok:
            continue
        rgba = p.color if p.color is not None else (200, 200, 200, 255)
        geom = _colored(p.mesh, p.name, rgba)
        tf = None if transforms is None else transforms.get(p.name)
        scene.add_geometry(geom, node_name=p.name, geom_name=p.name, transform=tf)
    return scene


def explode(parts: Sequence[PartResult], distance: float = 0.2) -> trimesh.Scene:
    """Official ``explode_mesh``: each part moves ``distance`` (absolute units) along the unit
    vector from the mean of the part centres to its centre (centre = mean of its vertices).
    Fallback for a part at the global centre: a deterministic direction (official: a random
    ``np.random.randn`` one).  With one part nothing moves."""
    tfs = {}
    for name, off in explode_offsets(parts, distance).items():
        tf = np.eye(4)
        tf[:3, 3] = off
        tfs[name] = tf
    return parts_scene(parts, tfs or None)


def glb_part(part: PartResult) -> GlbMesh:
    """The part as a node of a GLB file (:func:`turbopart.mesh.write_glb`): float32
    vertices, uint32 faces, its colour as the material's base colour."""
    rgba = part.color if part.color is not None else (200, 200, 200, 255)
    return GlbMesh.of(part.name, part.mesh.vertices, part.mesh.faces, rgba)


def explode_offsets(parts: Sequence[PartResult], distance: float = 0.2
                    ) -> dict[str, np.ndarray]:
    """Official ``explode_mesh`` translations (see :func:`explode`)."""
    ok = [p for p in parts if p.ok]
    if len(ok) <= 1:
        return {}
    centers = np.stack([p.center for p in ok])
    g = centers.mean(axis=0)
    out = {}
    for i, (p, c) in enumerate(zip(ok, centers)):
        d = c - g
        n = float(np.linalg.norm(d))
        if n > 1e-6:
            d = d / n
        else:  # deterministic fallback: golden-angle directions on the sphere
            z = 1.0 - 2.0 * ((i + 0.5) / len(ok))
            phi = i * math.pi * (3.0 - math.sqrt(5.0))
            r = math.sqrt(max(0.0, 1.0 - z * z))
            d = np.array([r * math.cos(phi), r * math.sin(phi), z])
        out[p.name] = d * distance
    return out


def box_outline(box: np.ndarray) -> trimesh.path.Path3D:
    """trimesh ``box_outline`` scaled to the box's extents and centred on it."""
    b = np.asarray(box, dtype=np.float64)
    path = trimesh.path.creation.box_outline()
    path.vertices = path.vertices * (b[1] - b[0]) + (b[0] + b[1]) / 2
    return path


def boxes_scene(mesh: trimesh.Trimesh, boxes: Sequence[np.ndarray],
                colors: Sequence[Any] | None = None) -> trimesh.Scene:
    """The input mesh (grey) plus one outline per box, in the input frame.  (The official
    "input bbox" preview shows the normalised frame; we keep the caller's frame.)"""
    scene = trimesh.Scene()
    scene.add_geometry(_colored(mesh, "input", (180, 180, 180, 255)), node_name="input",
                       geom_name="input")
    for i, b in enumerate(boxes):
        path = box_outline(b)
        if colors is not None and colors[i] is not None:
            path.colors = np.tile(np.asarray(colors[i], dtype=np.uint8)[None],
                                  (len(path.entities), 1))
        scene.add_geometry(path, node_name=f"box_{i:03d}", geom_name=f"box_{i:03d}")
    return scene


# --------------------------------------------------------------------------- pipeline

class XPartPipeline:
    """X-Part with its models loaded once; call it with a mesh and boxes."""

    def __init__(self, model, vae, conditioner, scheduler, *,
                 device: torch.device | str | None = None,
                 numerics: Numerics | str = Numerics.FAST):
        self.model = model
        self.vae = vae
        self.conditioner = conditioner
        self.scheduler = scheduler
        self.device = torch.device(device) if device is not None else default_device()
        self.numerics = Numerics.parse(numerics)
        self.load_timings: dict[str, float] = {}
        if hasattr(model, "prepare") and not getattr(model, "prepared", False):
            model.prepare(self.numerics)  # fused weights / MoE layout for these numerics
        if hasattr(vae, "prepare"):
            vae.prepare(self.numerics)  # geometry-decoder query path for these numerics

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, *,
                        device: torch.device | str | None = None,
                        numerics: Numerics | str = Numerics.FAST,
                        parallel: bool = True, warm_up: bool | None = None
                        ) -> "XPartPipeline":
        """Load model / shapevae / conditioner / scheduler from a checkpoint dir (None:
        ``turbopart.weights.resolve``: $TURBOPART_WEIGHTS, then the Hugging Face cache).

        ``warm_up`` (default: ``TURBOPART_WARMUP=1``, on CUDA with parallel loading): as soon
        as the conditioner is loaded, and while the 6.6 GB DiT still streams in, run it once
        on a synthetic sphere (:func:`warm_up_conditioner`), so that the first real call does
        not pay the first use of the GPU libraries and kernels (≈2.5 s of the conditioner's
        2.8 s in a fresh process).  Off by default until a GPU A/B shows it wins: it may
        also slow the concurrent load."""
        from ..runtime.loading import load_components, load_stream
        from ..weights import resolve
        path = resolve(weights)
        device = torch.device(device) if device is not None else default_device()
        if warm_up is None:
            warm_up = (device.type == "cuda" and parallel
                       and switch("TURBOPART_WARMUP", False))
        num = Numerics.parse(numerics)

        def on_loaded(name: str, module) -> None:
            if name == "conditioner":
                warm_up_conditioner(module, device, num)

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        comps = load_components(path, ("model", "shapevae", "conditioner", "scheduler"),
                                device=device, numerics=numerics, parallel=parallel,
                                timings=timings, on_loaded=on_loaded if warm_up else None)
        with load_stream(device):  # the weight fusions of prepare(), off the default stream
            pipe = cls(comps["model"], comps["shapevae"], comps["conditioner"],
                       comps["scheduler"], device=device, numerics=numerics)
        timings["total"] = time.perf_counter() - t0
        pipe.load_timings = timings
        return pipe

    @property
    def max_parts(self) -> int:
        pe = getattr(self.model, "part_embed", None)
        return int(pe.shape[0]) if isinstance(pe, torch.Tensor) else MAX_PARTS

    # ---------------------------------------------------------------- stages

    def prepare(self, mesh: trimesh.Trimesh, boxes, *, seed: int = DEFAULT_SEED,
                boxes_normalized: bool = False, official_float32_boxes: bool = True,
                part_mesh: trimesh.Trimesh | None = None,
                obj: pp.ObjectInputs | None = None) -> pp.PreparedInputs:
        n = self.surface_points
        return pp.prepare(mesh, boxes, seed=seed, n_points=n, boxes_normalized=boxes_normalized,
                          official_float32_boxes=official_float32_boxes, part_mesh=part_mesh,
                          device=self.device, obj=obj)

    def object_inputs(self, mesh: trimesh.Trimesh, seed: int = DEFAULT_SEED
                      ) -> pp.ObjectInputs:
        """The box-independent preprocessing (run it while P3-SAM segments, then pass it to
        the call as ``obj=``)."""
        return pp.object_inputs(mesh, seed, self.surface_points)

    @property
    def surface_points(self) -> int:
        """Rows of every surface cloud: the conditioner encoders' pc_size (81 920)."""
        c = self.conditioner
        for name in ("geo_vae", "obj_encoder"):
            enc = getattr(getattr(c, name, None), "encoder", None)
            if enc is not None and hasattr(enc, "pc_size"):
                return int(enc.pc_size)
        return pp.SURFACE_POINTS

    @property
    def latent_shape(self) -> tuple[int, int]:
        return int(self.vae.num_latents), int(self.vae.embed_dim)

    def encode_condition(self, part_surface: torch.Tensor, object_surface: torch.Tensor, *,
                         generator: torch.Generator | None,
                         sonata_generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return self.conditioner(part_surface, object_surface, generator=generator,
                                sonata_generator=sonata_generator, numerics=self.numerics)

    def denoise(self, cond: dict[str, torch.Tensor], noise: torch.Tensor, steps: int, *,
                part_generator: torch.Generator | None,
                callback: Callable[[int], None] | None = None) -> torch.Tensor:
        """The official flow-matching loop over all K parts (spec §5.2), on the DiT runner
        (cross-attention K/V cached once for the loop; the dt = 0 last step skipped in
        ``fast``); part-embedding permutations drawn from ``part_generator`` per step."""
        from .dit_runner import denoise
        cb = None if callback is None else (lambda i, t, x, v: callback(i))
        return denoise(self.model, noise, cond, scheduler=self.scheduler,
                       num_inference_steps=steps, generator=part_generator, callback=cb)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decoder on ``1 / scale_factor · latents`` (the official expression)."""
        return self.vae.decode(1.0 / self.vae.scale_factor * latents)

    @torch.no_grad()
    def volumes(self, latents: torch.Tensor, octree_resolution: int = DEFAULT_OCTREE,
                parts: Sequence[int] | None = None) -> decoding.DecodedVolumes:
        """The official hierarchical decoding of final latents [K, T, C]: per part the
        (R+1)³ fp16 logit grid (``extract_geometry_fast``'s ``grid_logits``, NaN where not
        evaluated) and the marching-cubes mask, for parity checks and custom meshing."""
        kv = self.vae.geo_decoder.precompute_kv(self.decode_latents(latents.to(self.device)))
        ids = list(range(latents.shape[0])) if parts is None else list(parts)
        fine = torch.float64 if self.numerics is Numerics.EXACT else torch.float32
        chunk = memory.items_that_fit(96, self.device, minimum=65536, maximum=1 << 23)
        return decoding.decode_volumes(self._query_fn(kv), ids, octree_resolution,
                                       device=self.device, chunk=chunk, fine_dtype=fine,
                                       reuse=decoding.reuse_from_env())

    # ---------------------------------------------------------------- the call

    @torch.no_grad()
    def __call__(self, mesh: trimesh.Trimesh, boxes, *, steps: int = DEFAULT_STEPS,
                 octree_resolution: int = DEFAULT_OCTREE, seed: int = DEFAULT_SEED,
                 noise_seed: int | None = None, boxes_normalized: bool = False,
                 official_float32_boxes: bool = True,
                 part_mesh: trimesh.Trimesh | None = None, progress: bool = False,
                 profile: Profile | None = None, keep_latents: bool = False,
                 colors: np.ndarray | None = None,
                 obj: pp.ObjectInputs | None = None,
                 on_part: Callable[[PartResult], None] | None = None) -> GenerationResult:
        """Generate one mesh per box.

        ``mesh``: the object (a trimesh or a path; input frame); ``boxes``: ``[K, 2, 3]``
        (min, max) in the input frame (or the normalised frame with ``boxes_normalized``).  ``seed`` drives the mesh
        samplers (official ``seed``, default 42); ``noise_seed`` (default ``seed``) the
        torch generators.  ``part_mesh``: sample the part surfaces from this mesh (P3-SAM's
        cleaned mesh, as the official pipeline does when P3-SAM ran).  ``obj``: this mesh's
        :meth:`object_inputs`, if computed already.  ``on_part``: called with each finished
        part, in order, from the thread that finishes the parts while the next one decodes
        (e.g. to write its files; :class:`PartFinisher`).
        """
        if not isinstance(mesh, trimesh.Trimesh):
            from ..mesh import as_mesh
            mesh = as_mesh(mesh)
        if octree_resolution < 16:
            raise ValueError(f"octree resolution must be at least 16, got {octree_resolution}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        dev = self.device
        prof = profile or Profile(device=str(dev))
        noise_seed = seed if noise_seed is None else noise_seed
        t_start = time.perf_counter()
        with prof.stage("preprocess"):
            prep = self.prepare(mesh, boxes, seed=seed, boxes_normalized=boxes_normalized,
                                official_float32_boxes=official_float32_boxes,
                                part_mesh=part_mesh, obj=obj)
        k = prep.num_parts
        if k == 0:
            raise ValueError("no box contains any face of the mesh")
        if k > self.max_parts:
            raise ValueError(f"{k} boxes: X-Part handles at most {self.max_parts} parts "
                             f"(use --max-parts or fewer boxes)")
        boxes_world = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 3)
        if boxes_normalized:
            boxes_world = pp.denormalize(boxes_world.reshape(-1, 3), prep.center,
                                         prep.scale).reshape(-1, 2, 3)
        kept_world = boxes_world[prep.valid]
        dropped = np.flatnonzero(~prep.valid).tolist()

        dev_gen = torch.Generator(device=dev).manual_seed(int(noise_seed))
        cpu_gen = torch.Generator().manual_seed(int(noise_seed))
        sonata_gen = torch.Generator().manual_seed(int(noise_seed) + 1)

        with prof.stage("condition"):
            obj = prep.object_surface.to(dev, torch.float32)
            parts = prep.part_surface.to(dev, torch.float32)
            t, c = self.latent_shape
            # official order on the CUDA generator: initial noise, then the conditioner
            noise = torch.randn((k, t, c), generator=dev_gen, device=dev, dtype=torch.float32)
            cond = self.encode_condition(parts, obj, generator=dev_gen,
                                         sonata_generator=sonata_gen)
            del parts, obj

        bar = _bar(progress, steps, "sampling", "step")
        with prof.stage("sampling"):
            latents = self.denoise(cond, noise, steps, part_generator=cpu_gen,
                                   callback=(lambda i: bar.update(1)) if bar else None)
        if bar:
            bar.close()
        del cond, noise

        with prof.stage("vae_decode"):
            decoded = self.decode_latents(latents)
            kv = self.vae.geo_decoder.precompute_kv(decoded)
            del decoded

        results, counters = self._decode_and_mesh(kv, prep, kept_world, octree_resolution,
                                                   prof, progress, colors, on_part)
        del kv
        counters["parts"] = k
        counters["dropped_boxes"] = dropped
        settings = {"steps": int(steps), "octree_resolution": int(octree_resolution),
                    "seed": int(seed), "noise_seed": int(noise_seed),
                    "numerics": self.numerics.value, "device": str(dev),
                    "ladder": decoding.resolution_ladder(octree_resolution)}
        prof.count("total_s", time.perf_counter() - t_start)
        return GenerationResult(results, prep.center, prep.scale,
                                latents if keep_latents else None, dict(prof.stages),
                                {**prof.counters, **counters}, settings, dropped)

    # ---------------------------------------------------------------- decoding + meshing

    def _query_fn(self, kv):
        geo = self.vae.geo_decoder

        def query(points: torch.Tensor, parts: list[int]) -> torch.Tensor:
            if parts == list(range(parts[0], parts[0] + len(parts))):
                sub = kv.select(parts[0], parts[0] + len(parts))
            else:
                idx = torch.as_tensor(parts, device=kv.k.device)
                sub = type(kv)(kv.k[idx], kv.v[idx], kv.weights)
            return geo.query(points, sub)
        query.accepts_grid = True  # grid levels come as decoding.GridQuery
        return query

    def _decode_and_mesh(self, kv, prep: pp.PreparedInputs, kept_world: np.ndarray,
                         octree_resolution: int, prof: Profile, progress: bool,
                         colors: np.ndarray | None,
                         on_part: Callable[[PartResult], None] | None = None):
        from ..geometry.marching_cubes import marching_cubes
        dev = self.device
        k = prep.num_parts
        exact = self.numerics is Numerics.EXACT
        fine_dtype = torch.float64 if exact else torch.float32
        chunk = memory.items_that_fit(96, dev, minimum=65536, maximum=1 << 23)
        if colors is None:
            from ..mesh import part_colors
            colors = part_colors(k)
        query = self._query_fn(kv)
        counters: dict[str, Any] = {"rows_per_level": []}
        bar = _bar(progress, k, "decoding", "part")

        def finish(pi, verts, faces, resolution, qs, reused):
            raw = int(faces.shape[0])
            with prof.stage("cleanup"):
                part_mesh, area = self._finish_part(verts, faces, resolution, prep)
            del verts, faces
            if part_mesh is None:  # official: "Failed to export part i", skipped
                log.warning("part %d (box %d) produced no surface; skipped", pi,
                            prep.box_index[pi])
            res = PartResult(pi, prep.box_index[pi], kept_world[pi], part_mesh, qs, raw,
                             np.asarray(colors[pi % len(colors)]), area, reused)
            if on_part is not None:
                with prof.stage("export"):
                    on_part(res)
            if bar:
                bar.update(1)
            return res

        # One coarse pass for all parts, then each group's fine levels; each part is meshed
        # as it arrives (only one group's fine grids are alive at a time) and finished
        # (clean-up, download, on_part) on another thread while the next part decodes.
        # A group holds its parts' fine grids together: as many as the working budget holds
        fit = memory.budget_bytes(dev) // decoding.bytes_per_part(octree_resolution)
        groups = decoding.share_groups(k, min(decode_share_from_env(), max(1, fit)))
        counters["decode_groups"] = groups
        parts = decoding.iter_volumes(query, list(range(k)), octree_resolution, device=dev,
                                      chunk=chunk, fine_dtype=fine_dtype,
                                      reuse=decoding.reuse_from_env(), groups=groups)
        with PartFinisher(dev) as finisher, finisher.foreground():
            while True:
                with prof.stage("volume_decode"):
                    vol = next(parts, None)
                if vol is None:
                    break
                with prof.stage("marching_cubes"):
                    verts, faces = marching_cubes(vol.grid, decoding.MC_LEVEL, mask=vol.mask)
                pi, resolution = vol.part, vol.resolution
                qs, reused = list(vol.queries), list(vol.reused)
                counters["rows_per_level"].append(list(vol.rows))
                del vol  # its grids are freed before the part is finished
                finisher.submit(finish, pi, verts, faces, resolution, qs, reused,
                                num_faces=int(faces.shape[0]))
                del verts, faces
            with prof.stage("finish_wait"):
                results = finisher.results()
        if bar:
            bar.close()
        counters["queries_per_level"] = [list(p.queries) for p in results]
        counters["reused_per_level"] = [list(p.reused) for p in results]
        counters["raw_faces"] = [p.raw_faces for p in results]
        counters["faces"] = [0 if p.mesh is None else int(len(p.mesh.faces)) for p in results]
        counters["queries_total"] = int(sum(sum(q) for q in counters["queries_per_level"]))
        # rows the part-dependent decoder path evaluated (a shared union can hold more)
        counters["rows_total"] = int(sum(sum(r) for r in counters["rows_per_level"]))
        # the official decoder's query count (it queries the reused vertices again)
        counters["grid_values_total"] = counters["queries_total"] + int(
            sum(sum(r) for r in counters["reused_per_level"]))
        return results, counters

    def _finish_part(self, verts: torch.Tensor, faces: torch.Tensor, resolution: int,
                     prep: pp.PreparedInputs) -> tuple[trimesh.Trimesh | None, float]:
        """Index space → normalised → official clean-up → input frame; also the surface area
        in the input frame, summed on the device (trimesh's ``area`` takes seconds per ten
        million faces on the CPU)."""
        from ..geometry import cleanup
        from ..geometry.marching_cubes import grid_to_world
        if faces.shape[0] == 0:
            return None, 0.0
        v = grid_to_world(verts, resolution, decoding.BOUNDS)
        v, f = _cleanup(v, faces, edge_threshold(resolution))
        if f.shape[0] == 0:
            return None, 0.0
        area = cleanup.surface_area(v, f) * float(prep.scale) ** 2
        vw = pp.denormalize(v.cpu().numpy(), prep.center, prep.scale)
        return trimesh.Trimesh(vertices=vw, faces=f.cpu().numpy(), process=False), area


def warm_up_conditioner(conditioner, device: torch.device | str,
                        numerics: Numerics | str = Numerics.FAST) -> None:
    """One throw-away conditioner pass (one part) on a synthetic sphere of the encoder's
    ``pc_size`` points, with private generators (the caller's random streams are untouched).
    It loads the cuBLAS / attention / Triton kernels the first real call would otherwise
    load on its critical path."""
    device = torch.device(device)
    n = int(conditioner.geo_encoder.local_encoder.encoder.pc_size)
    g = torch.Generator(device=device).manual_seed(0)
    normal = torch.nn.functional.normalize(
        torch.randn(1, n, 3, generator=g, device=device), dim=-1)
    surface = torch.cat([0.5 * normal, normal, torch.zeros(1, n, 1, device=device)], -1)
    with torch.no_grad():
        conditioner(surface, surface, generator=g,
                    sonata_generator=torch.Generator().manual_seed(0), numerics=numerics)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cleanup(verts: torch.Tensor, faces: torch.Tensor, max_edge: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``export_to_trimesh`` + ``fix_mesh`` (faces reversed, trimesh processing,
    long-edge faces removed, floaters under 0.5 % of the largest component), in memory.
    Out of GPU memory it runs on the CPU (same arithmetic, same result) instead of failing."""
    from ..geometry import cleanup
    try:
        return cleanup.official_cleanup(verts, faces, reverse=True, max_edge=max_edge,
                                        ratio=FLOATER_RATIO)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not (verts.is_cuda and memory.is_oom(exc)):
            raise
    log.warning("clean-up of %d faces ran out of GPU memory; cleaning up on the CPU",
                faces.shape[0])
    torch.cuda.empty_cache()
    v, f = cleanup.official_cleanup(verts.cpu(), faces.cpu(), reverse=True, max_edge=max_edge,
                                    ratio=FLOATER_RATIO)
    return v.to(verts.device), f.to(verts.device)


#: Device bytes the clean-up of one marching-cubes face may take at its peak (sort keys,
#: orders and masks of its 3 edges): a part is finished beside the decoding only if this fits.
CLEANUP_BYTES_PER_FACE = 160
#: Parts of fewer marching-cubes faces are finished in the decoding thread: their clean-up
#: is a few dozen small kernels and host waits, which beside the decoding slowed it more
#: than they saved (realistic init, 0.55 M faces per part: X-Part call 7.46–7.62 s threaded
#: against 7.50–7.54 s inline); foam parts of 4–31 M faces save ≈ 5 s in 8 (plain init).
FINISH_THREAD_MIN_FACES = 2_000_000


def decode_share_from_env() -> int:
    """``TURBOPART_DECODE_SHARE`` (default 8): most parts whose fine levels are decoded as
    one group, querying the union of their fine vertices once where that pays
    (:func:`decoding.share_groups`, the last two parts alone; fewer when their grids do not
    fit the working budget); 1: every part alone.  Plain init, K = 8 (groups of 4 / 6):
    volume decoding 58.0 → 55.5 / 55.1 s, the run 2.9 / 3.3 s shorter."""
    return max(1, int(os.environ.get("TURBOPART_DECODE_SHARE", "8")))


def finish_threaded_from_env() -> bool:
    """``TURBOPART_FINISH_THREAD=0`` finishes each part in the decoding thread (for A/B)."""
    return switch("TURBOPART_FINISH_THREAD")


def foreground_priority_from_env() -> bool:
    """``TURBOPART_FOREGROUND_PRIORITY=0`` keeps the decoding on the default stream (A/B)."""
    return switch("TURBOPART_FOREGROUND_PRIORITY")


def raise_failed(futures) -> None:
    """Re-raise the error of the first of ``futures`` that has failed, without waiting for
    the ones still running."""
    for f in futures:
        if f.done() and f.exception() is not None:
            f.result()


class PartFinisher:
    """Runs each part's finishing work (clean-up, download, the caller's ``on_part``) on one
    worker thread, in submission order, while the submitting thread decodes the next part.

    On CUDA the worker has its own stream, which first waits for the work the submitter
    queued so far (the part's marching cubes); host waits inside the finishing (counts,
    downloads) then block only the worker, and its host work (NumPy, file writes) overlaps
    the decoding.  A part is finished in the submitting thread instead when it is small
    (``num_faces`` under :data:`FINISH_THREAD_MIN_FACES`) and the worker is idle (behind
    a busy worker it is queued: waiting there for the queue would stall the decoding),
    after the queue drains when its finishing needs more than half of the free device
    memory (``num_faces`` × :data:`CLEANUP_BYTES_PER_FACE`), and always with
    ``threaded=False`` (``TURBOPART_FINISH_THREAD=0``).
    """

    def __init__(self, device: torch.device | str, threaded: bool | None = None):
        from concurrent.futures import ThreadPoolExecutor
        self.device = torch.device(device)
        threaded = finish_threaded_from_env() if threaded is None else threaded
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="turbopart-finish")
                      if threaded else None)
        self._stream = (torch.cuda.Stream(self.device)
                        if threaded and self.device.type == "cuda" else None)
        self._futures: list = []

    def __enter__(self) -> "PartFinisher":
        return self

    @contextlib.contextmanager
    def foreground(self):
        """The submitting thread's work (the decoding) on a stream of the highest priority
        while parts may be finished beside it, so the finishing kernels take the SMs the
        decoding leaves rather than delaying it (``TURBOPART_FOREGROUND_PRIORITY=0``: off)."""
        if self._stream is None or not foreground_priority_from_env():
            yield
            return
        current = torch.cuda.current_stream(self.device)
        fg = torch.cuda.Stream(self.device, priority=-100)  # clamped to the highest
        fg.wait_stream(current)
        try:
            with torch.cuda.stream(fg):
                yield
        finally:
            current.wait_stream(fg)

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., PartResult], *args,
               num_faces: int = FINISH_THREAD_MIN_FACES) -> None:
        """Finish a part: ``fn(*args)``; ``num_faces``: its marching-cubes face count."""
        from concurrent.futures import Future
        raise_failed(self._futures)  # an error now rather than after the whole decode
        busy = any(not f.done() for f in self._futures)
        if (self._pool is None or (num_faces < FINISH_THREAD_MIN_FACES and not busy)
                or num_faces * CLEANUP_BYTES_PER_FACE > memory.free_bytes(self.device) // 2):
            for f in self._futures:  # keep the order: drain the queue, then run here
                f.result()
            done: Future = Future()
            done.set_result(fn(*args))
            self._futures.append(done)
            return
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record()
            for a in args:  # used on the worker's stream: freed only after its work there
                if isinstance(a, torch.Tensor) and a.is_cuda:
                    a.record_stream(self._stream)
        self._futures.append(self._pool.submit(self._run, event, fn, args))

    def _run(self, event, fn, args) -> PartResult:
        if self._stream is None:
            return fn(*args)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(event)
            out = fn(*args)
            self._stream.synchronize()
        return out

    def results(self) -> list[PartResult]:
        """Every submitted part's result, in order (waits; re-raises a job's error)."""
        return [f.result() for f in self._futures]


def _bar(enabled: bool, total: int, desc: str, unit: str):
    if not enabled:
        return None
    from tqdm import tqdm
    import sys
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def generate(mesh, boxes, *, weights: str | os.PathLike | None = None,
             device: torch.device | str | None = None,
             numerics: Numerics | str = Numerics.FAST, **kwargs) -> GenerationResult:
    """One-shot: load the pipeline and generate (``mesh`` a path or a trimesh)."""
    from ..mesh import as_mesh
    pipe = XPartPipeline.from_pretrained(weights, device=device, numerics=numerics)
    return pipe(as_mesh(mesh), boxes, **kwargs)
