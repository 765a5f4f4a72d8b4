"""X-Part inputs from a mesh and boxes, as the official pipeline prepares them (spec xpart §6).

* :func:`normalization`: the pipeline's ``normalize_mesh`` (centre = bbox centre, scale =
  longest extent / 2 / 0.8; the longest side spans [−0.8, 0.8]).
* :func:`sample_mesh` / :func:`object_surface`: ``SampleMesh`` + ``load_surface_points``
  (§6.3–6.4), quirks kept: the **last face is left out** of the main mesh and sampled as a
  separate "fill" mesh, 249 856 samples, a ``default_rng(seed)`` permutation, **float16**
  storage, then 81 920 rows chosen with a fresh ``default_rng(seed)``, normals re-normalised,
  sharp label 0.  The official ``SampleMesh`` also samples a sharp-edge cloud whose result is
  discarded (``pc_sharpedge_size = 0``); it only advances NumPy's *global* generator (and
  raises on meshes without sharp vertices), so we skip it: no output depends on it.
* :func:`part_surfaces`: ``sample_bbox_points_from_trimesh`` (§6.6): a face belongs to box k
  if **any** of its vertices lies in the closed box (float64 comparison), boxes without faces
  are dropped, every part is sampled with ``sample_surface(part, 81920, seed)`` with the
  **same seed**.  Because every part uses a fresh ``default_rng(seed)``, all parts share the
  same uniform draws; we draw them once and sample all parts with one vectorised gather
  (bit-identical to building trimesh sub-meshes, checked in the tests).
* :func:`normalize_boxes`: user boxes go through the official float32 arithmetic
  ``(aabb.float() - center.float()) / scale``; boxes that P3-SAM found on the mesh are
  normalised in float64, which equals the official boxes computed on the normalised mesh
  (min/max commute with the monotone normalisation).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _lazy_import

trimesh = _lazy_import("trimesh")  # imported on first use (start-up time)

log = logging.getLogger(__name__)

#: Official constants (spec xpart §6).
HALF_EXTENT = 0.8
SAMPLE_NUM = 499712 // 2  # 249 856
SURFACE_POINTS = 81920


# --------------------------------------------------------------------------- normalisation

def normalization(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """``(center, scale)`` of the pipeline's ``normalize_mesh`` (float64)."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError("mesh has no vertices")
    lo, hi = v.min(axis=0), v.max(axis=0)
    center = (lo + hi) / 2.0
    scale = np.max(hi - lo) / 2 / HALF_EXTENT
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("mesh has zero extent (all vertices at one point)")
    return center, float(scale)


def normalize_vertices(vertices: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    return (np.asarray(vertices, dtype=np.float64) - center) / scale


def normalize_mesh(mesh: trimesh.Trimesh, center: np.ndarray | None = None,
                   scale: float | None = None) -> tuple[trimesh.Trimesh, np.ndarray, float]:
    """A normalised copy of ``mesh`` (faces untouched, no processing) + center and scale."""
    if center is None or scale is None:
        center, scale = normalization(mesh.vertices)
    out = trimesh.Trimesh(vertices=normalize_vertices(mesh.vertices, center, scale),
                          faces=np.asarray(mesh.faces), process=False)
    return out, center, scale


def normalize_boxes(boxes, center: np.ndarray, scale: float, *,
                    official_float32: bool = True) -> np.ndarray:
    """Input-frame boxes ``[K, 2, 3]`` → the normalised frame (float64 array).

    ``official_float32``: the official user-box path (float32 tensors on the CPU);
    ``False``: exact float64 (for boxes computed on this very mesh, e.g. by P3-SAM).
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 3 or b.shape[1:] != (2, 3):
        raise ValueError(f"boxes must have shape [K, 2, 3], got {list(b.shape)}")
    if official_float32:
        t = torch.from_numpy(b).float()
        t = (t - torch.from_numpy(np.asarray(center, dtype=np.float64)).float()) / scale
        return t.double().numpy()
    return (b - center) / scale


def denormalize(vertices: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """The pipeline's final ``v * scale + center`` (float64)."""
    return np.asarray(vertices, dtype=np.float64) * scale + center


# --------------------------------------------------------------------------- object surface

def _fold_into_triangle(lengths: np.ndarray) -> np.ndarray:
    """trimesh's triangle point picking: two U[0,1) edge weights ``[n, 2, 1]`` whose sum
    exceeds 1 are reflected (``-1``, then ``abs``) into the triangle."""
    flip = lengths.sum(axis=1).reshape(-1) > 1.0
    lengths[flip] -= 1.0
    return np.abs(lengths)


def _triangle_frames(vertices: np.ndarray, faces: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(origin ``[F, 3]``, the two edge vectors ``[F, 2, 3]``) of triangles, as trimesh."""
    origins = vertices[faces[:, 0]]
    return origins, vertices[faces[:, 1:]] - np.tile(origins, (1, 2)).reshape((-1, 2, 3))


def _random_sample_rows(mesh: trimesh.Trimesh, num: int, seed: int, rows: np.ndarray
                        ) -> np.ndarray:
    """Rows ``rows`` of ``random_sample_pointcloud`` as float16 ``[len(rows), 6]`` (xyz,
    face normal): ``trimesh.sample.sample_surface(mesh, num, seed)``, the face normals,
    then a ``default_rng(seed).choice(num, num, replace=False)`` permutation.

    Every draw is made as trimesh makes it, but the arithmetic after the draws (face
    search, barycentric point) is element-wise, so it runs only for the requested rows:
    bit-identical to sampling all ``num`` points and selecting (checked in the tests)."""
    rng = np.random.default_rng(seed)              # trimesh's random_generator(seed)
    cum = np.cumsum(mesh.area_faces)
    pick = rng.random(num)
    lengths = rng.random((num, 2, 1))
    perm = np.random.default_rng(seed=seed).choice(num, num, replace=False)
    s = perm[np.asarray(rows)]
    face = np.searchsorted(cum, pick[s] * cum[-1])
    lengths = _fold_into_triangle(lengths[s])
    origins, vectors = _triangle_frames(mesh.vertices, mesh.faces[face])
    points = (vectors * lengths).sum(axis=1) + origins
    return np.concatenate((points, mesh.face_normals[face]), axis=1).astype(np.float16)


def _sample_meshes(vertices: np.ndarray, faces: np.ndarray
                   ) -> list[tuple[trimesh.Trimesh, int]]:
    """``SampleMesh``'s two meshes and their sample counts: the mesh without its last face,
    and the last face alone as a "fill" mesh (official quirk: origin_num = -1 slices
    F[:-1] / F[-1:]; the fill almost always gets 0 of the samples)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if len(f) < 2:
        raise ValueError("mesh needs at least two faces")
    main = trimesh.Trimesh(vertices=v, faces=f[:-1])
    fill = trimesh.Trimesh(vertices=v, faces=f[-1:])
    area, area_fill = main.area, fill.area
    num_fill = int(SAMPLE_NUM * (area_fill / (area + area_fill)))
    return [(main, SAMPLE_NUM - num_fill), (fill, num_fill)]


def _sample_mesh_rows(vertices: np.ndarray, faces: np.ndarray, seed: int, rows: np.ndarray
                      ) -> np.ndarray:
    """Rows ``rows`` of :func:`sample_mesh` (only those are computed)."""
    rows = np.asarray(rows)
    out = np.empty((len(rows), 6), dtype=np.float16)
    start = 0
    for mesh, num in _sample_meshes(vertices, faces):
        sel = (rows >= start) & (rows < start + num)
        if num > 0 and sel.any():
            out[sel] = _random_sample_rows(mesh, num, seed, rows[sel] - start)
        start += num
    return out


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, seed: int = 42) -> np.ndarray:
    """``SampleMesh(V, F, -1, seed)["random_surface"]``: float16 ``[249856, 6]``
    (xyz, face normal).  The discarded sharp-edge cloud is not computed (module doc)."""
    return _sample_mesh_rows(vertices, faces, seed, np.arange(SAMPLE_NUM))


def _surface_rows(seed: int, n_points: int, total: int = SAMPLE_NUM) -> np.ndarray:
    """The rows ``load_surface_points`` keeps: ``default_rng(seed).choice(total, n)``."""
    return np.random.default_rng(seed=seed).choice(total, n_points, replace=False)


def _surface_tensor(rows: np.ndarray) -> torch.Tensor:
    """float16 rows ``[n, 6]`` → float32 ``[n, 7]``: xyz, L2-normalised normal, label 0."""
    sel = np.concatenate((rows, np.zeros((rows.shape[0], 1))), axis=1)
    t = torch.from_numpy(sel).float()
    normal = torch.nn.functional.normalize(t[:, 3:6], p=2, dim=1)
    return torch.cat([t[:, 0:3], normal, t[:, 6:7]], dim=-1)


def surface_points(random_surface: np.ndarray, seed: int = 42,
                   n_points: int = SURFACE_POINTS) -> torch.Tensor:
    """``load_surface_points(default_rng(seed), ..., pc_size=n, pc_sharpedge_size=0)``:
    float32 ``[n, 7]`` = xyz, L2-normalised normal, sharp label 0."""
    ind = _surface_rows(seed, n_points, random_surface.shape[0])
    return _surface_tensor(random_surface[ind])


def object_surface(vertices: np.ndarray, faces: np.ndarray, seed: int = 42,
                   n_points: int = SURFACE_POINTS) -> torch.Tensor:
    """The object point cloud the conditioner reads: ``[n, 7]`` float32 (CPU);
    ``surface_points(sample_mesh(...))`` with only the kept rows sampled."""
    rows = _surface_rows(seed, n_points)
    return _surface_tensor(_sample_mesh_rows(vertices, faces, seed, rows))


# --------------------------------------------------------------------------- part surfaces

def box_face_membership(vertices: np.ndarray, faces: np.ndarray, boxes: np.ndarray
                        ) -> np.ndarray:
    """``[K, F]`` bool: face f has at least one vertex inside the closed box k (float64)."""
    v = np.asarray(vertices, dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64)
    inside = np.all((v[None] >= b[:, None, 0]) & (v[None] <= b[:, None, 1]), axis=-1)  # [K, V]
    return inside[:, np.asarray(faces)].any(axis=-1)


def part_surfaces(mesh: trimesh.Trimesh, boxes: np.ndarray, seed: int = 42,
                  n_points: int = SURFACE_POINTS, device: torch.device | str = "cpu",
                  backend: str = "auto") -> tuple[torch.Tensor, np.ndarray]:
    """``sample_bbox_points_from_trimesh``: float64 ``[K', n, 7]`` (on ``device``) for the K'
    boxes that contain faces, and the ``[K]`` validity mask.

    Bit-identical to ``trimesh.sample.sample_surface(submesh_k, n, seed)`` per part: the
    cumulative areas are NumPy's sequential ``cumsum`` (as trimesh), everything after it
    (``u · total``, ``searchsorted``, the barycentric arithmetic) is element-wise float64,
    done for all parts at once on the device (``backend="torch"``, the default on CUDA) or
    part by part in NumPy (``"numpy"``, the default on the CPU, where it is faster).
    """
    faces = np.asarray(mesh.faces)
    member = box_face_membership(mesh.vertices, faces, boxes)
    valid = member.any(axis=1)
    k_valid = int(valid.sum())
    dev = torch.device(device)
    if k_valid == 0:
        return torch.zeros(0, n_points, 7, dtype=torch.float64, device=dev), valid
    # trimesh.sample.sample_surface with a fresh default_rng(seed): the same draws per part.
    rng = np.random.default_rng(seed)
    u = rng.random(n_points)
    lengths = _fold_into_triangle(rng.random((n_points, 2, 1)))

    area = mesh.area_faces
    fidx = [np.flatnonzero(member[k]) for k in np.flatnonzero(valid)]
    width = max(len(f) for f in fidx)
    cum = np.full((k_valid, width), np.inf)
    idx = np.zeros((k_valid, width), dtype=np.int64)
    for j, f in enumerate(fidx):  # loop over parts (≤ 50), not faces
        cum[j, :len(f)] = np.cumsum(area[f])
        idx[j, :len(f)] = f
    total = np.array([cum[j, len(f) - 1] for j, f in enumerate(fidx)])

    if backend == "auto":
        backend = "torch" if dev.type == "cuda" else "numpy"
    origins, vectors = _triangle_frames(np.asarray(mesh.vertices, dtype=np.float64), faces)
    normals_all = np.array(mesh.face_normals, dtype=np.float64)  # writable copy
    if backend == "numpy":  # one part at a time (CPU: faster than torch's gathers)
        out_np = np.zeros((k_valid, n_points, 7), dtype=np.float64)
        for j, f in enumerate(fidx):
            local = np.searchsorted(cum[j, :len(f)], u * total[j])
            gj = f[np.minimum(local, len(f) - 1)]
            out_np[j, :, 0:3] = (vectors[gj] * lengths).sum(axis=1) + origins[gj]
            out_np[j, :, 3:6] = normals_all[gj]
        return torch.from_numpy(out_np).to(dev), valid
    count = torch.tensor([len(f) for f in fidx], device=dev)
    cum_t = torch.from_numpy(cum).to(dev)
    pick = torch.from_numpy(u).to(dev)[None] * torch.from_numpy(total).to(dev)[:, None]
    local = torch.searchsorted(cum_t, pick)                       # [K', n], left side
    local = torch.minimum(local, (count - 1)[:, None])
    g = torch.gather(torch.from_numpy(idx).to(dev), 1, local)     # face index per sample
    lens = torch.from_numpy(lengths).to(dev)                      # [n, 2, 1]
    pts = (torch.from_numpy(vectors).to(dev)[g] * lens).sum(dim=2) \
        + torch.from_numpy(origins).to(dev)[g]
    normals = torch.from_numpy(normals_all).to(dev)[g]
    out = torch.cat([pts, normals, torch.zeros_like(pts[..., :1])], dim=-1)
    return out, valid


# --------------------------------------------------------------------------- all inputs

@dataclass
class PreparedInputs:
    """Everything X-Part needs, in the normalised frame."""

    object_surface: torch.Tensor        # [N, 7] float32
    part_surface: torch.Tensor          # [K, N, 7] float64 on the device (→ float32)
    boxes: np.ndarray                   # [K, 2, 3] normalised, valid boxes only
    valid: np.ndarray                   # [K_in] bool
    center: np.ndarray
    scale: float
    mesh: trimesh.Trimesh               # normalised mesh the object surface came from
    box_index: list[int] = field(default_factory=list)  # input index of every kept box

    @property
    def num_parts(self) -> int:
        return int(self.boxes.shape[0])

    def boxes_world(self) -> np.ndarray:
        return denormalize(self.boxes.reshape(-1, 3), self.center, self.scale).reshape(-1, 2, 3)


@dataclass
class ObjectInputs:
    """The box-independent half of :func:`prepare` (can run while P3-SAM segments)."""

    center: np.ndarray
    scale: float
    mesh: trimesh.Trimesh               # normalised
    surface: torch.Tensor               # [N, 7] float32 (CPU)
    seed: int
    n_points: int


def object_inputs(mesh: trimesh.Trimesh, seed: int = 42, n_points: int = SURFACE_POINTS
                  ) -> ObjectInputs:
    """Normalisation and the object surface of ``mesh``."""
    norm_mesh, center, scale = normalize_mesh(mesh)
    obj = object_surface(norm_mesh.vertices, norm_mesh.faces, seed, n_points)
    return ObjectInputs(center, scale, norm_mesh, obj, seed, n_points)


def prepare(mesh: trimesh.Trimesh, boxes, *, seed: int = 42, n_points: int = SURFACE_POINTS,
            boxes_normalized: bool = False, official_float32_boxes: bool = True,
            part_mesh: trimesh.Trimesh | None = None, device: torch.device | str = "cpu",
            obj: ObjectInputs | None = None) -> PreparedInputs:
    """Normalise ``mesh`` and ``boxes`` (input frame unless ``boxes_normalized``), sample the
    object surface and every box's part surface; boxes without faces are dropped (warned).

    ``part_mesh``: the mesh the part surfaces are sampled from, in the input frame (the
    official pipeline samples parts from P3-SAM's cleaned mesh when P3-SAM ran); default
    ``mesh``.  ``device``: where the part surfaces are sampled (and returned).  ``obj``: the
    result of :func:`object_inputs` for this mesh, seed and size, if already computed;
    otherwise the object surface is sampled on a worker thread while the part surfaces
    are (NumPy and the device work release the GIL; the generators are per call, so the
    draws are the same).
    """
    pool = surface = None
    if obj is not None and obj.seed == seed and obj.n_points == n_points:
        center, scale, norm_mesh, surface = obj.center, obj.scale, obj.mesh, obj.surface
    else:  # the object surface is sampled on a thread while the parts are sampled here
        norm_mesh, center, scale = normalize_mesh(mesh)
        pool = ThreadPoolExecutor(1, thread_name_prefix="turbopart-object-surface")
        pending = pool.submit(object_surface, norm_mesh.vertices, norm_mesh.faces, seed,
                              n_points)
    try:
        if boxes_normalized:
            b = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 3)
        else:
            b = normalize_boxes(boxes, center, scale, official_float32=official_float32_boxes)
        pm = norm_mesh if part_mesh is None else normalize_mesh(part_mesh, center, scale)[0]
        parts, valid = part_surfaces(pm, b, seed, n_points, device)
        if pool is not None:
            surface = pending.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not valid.all():
        dropped = np.flatnonzero(~valid).tolist()
        log.warning("dropping %d box(es) with no faces inside: %s", len(dropped), dropped)
    return PreparedInputs(surface, parts, b[valid], valid, center, scale, norm_mesh,
                          np.flatnonzero(valid).tolist())


def grid_boxes(bounds: np.ndarray, divisions: tuple[int, int, int], inflate: float = 1e-4
               ) -> np.ndarray:
    """A deterministic grid of ``nx·ny·nz`` boxes over ``bounds`` ([2, 3]), each inflated by
    ``inflate`` × the longest side (the official baseline's benchmark boxes)."""
    lo, hi = np.asarray(bounds, dtype=np.float64)
    pad = inflate * float(np.max(hi - lo))
    edges = [np.linspace(lo[a], hi[a], divisions[a] + 1) for a in range(3)]
    out = []
    for i in range(divisions[0]):
        for j in range(divisions[1]):
            for k in range(divisions[2]):
                mn = np.array([edges[0][i], edges[1][j], edges[2][k]]) - pad
                mx = np.array([edges[0][i + 1], edges[1][j + 1], edges[2][k + 1]]) + pad
                out.append(np.stack([mn, mx]))
    return np.stack(out)

