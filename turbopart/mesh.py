"""Meshes in and out: load, validate, clean, sample, normalise, export.

The pre-processing reproduces the official P3-SAM / X-Part code (spec p3sam §2.1–2.4):

* :func:`load_mesh` = ``trimesh.load(path, force="mesh")`` (trimesh's default processing:
  per-geometry NaN removal and vertex merge, then the scene is concatenated with node
  transforms applied), preceded by checks that turn unusable files into one clear
  :class:`MeshError` line.
* :func:`clean_mesh` = the official ``clean_mesh`` (``merge_vertices()`` then
  ``process(validate=True)``) followed by the re-wrap from vertices and faces, with
  ``process=True`` (``P3-SAM/demo/auto_mask.py``) or ``process=False`` (X-Part's
  ``auto_mask_api.py``).
* :func:`sample_surface` = ``trimesh.sample.sample_surface(mesh, n, seed=seed)``.
* :func:`normalize_points` = ``normalize_pc`` (§2.4); :func:`normalize_mesh` = the X-Part
  pipeline's ``normalize_mesh`` (longest bbox side spans [-0.8, 0.8]).

Export helpers write a part-coloured GLB scene with one named node per part.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .cli import UserError
from . import _lazy_import
from .runtime.switches import switch

trimesh = _lazy_import("trimesh")  # imported on first use (start-up time)

#: File types ``turbopart`` reads (trimesh loaders that give triangle meshes).
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


class MeshError(UserError):
    """A mesh file or mesh that cannot be used; the message is one line for the user."""


# --------------------------------------------------------------------------- loading

def check_mesh_file(path: str | os.PathLike) -> None:
    """The checks :func:`load_mesh` makes before parsing (exists, a file, a supported type,
    not empty), without importing trimesh: a :class:`MeshError` at once."""
    path = Path(path)
    if not path.exists():
        raise MeshError(f"{path}: no such file")
    if path.is_dir():
        raise MeshError(f"{path}: is a directory, not a mesh file")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise MeshError(f"{path}: unsupported file type '{path.suffix or '(none)'}' "
                        f"(supported: {' '.join(MESH_SUFFIXES)})")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MeshError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise MeshError(f"{path}: empty file")


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Load one triangle mesh exactly as the official ``trimesh.load(path, force="mesh")``.

    The raw geometry is read unprocessed first so that bad input is refused with a clear
    message (unreadable or truncated file, no triangles, non-finite vertices, face indices
    out of range) instead of being silently repaired; each geometry is then processed as
    trimesh's default (``process=True``) would, and the scene is concatenated with its node
    transforms (``Scene.to_mesh``).
    """
    path = Path(path)
    check_mesh_file(path)
    try:
        scene = trimesh.load_scene(str(path), process=False)
    except Exception as exc:  # every parser error becomes one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeshError(f"{path}: not a readable {path.suffix.lower()[1:]} mesh "
                        f"(truncated or corrupt?): {msg}") from None
    meshes = [g for g in scene.geometry.values() if isinstance(g, trimesh.Trimesh)]
    if not meshes or sum(len(g.faces) for g in meshes) == 0:
        raise MeshError(f"{path}: contains no triangle faces")
    for g in meshes:
        _validate_arrays(np.asarray(g.vertices), np.asarray(g.faces), str(path))
    for g in meshes:
        if not _merge_is_noop(g):
            g.process()  # what Trimesh(process=True) does in the loader
    try:
        mesh = scene.to_mesh()
    except Exception as exc:
        raise MeshError(f"{path}: cannot assemble the scene into one mesh ({exc})") from None
    validate_mesh(mesh, str(path))
    return mesh


def _validate_arrays(vertices: np.ndarray, faces: np.ndarray, where: str) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise MeshError(f"{where}: vertices must be an [N, 3] array")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError(f"{where}: faces must be triangles ([F, 3] indices)")
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices).all(axis=1)).sum())
        raise MeshError(f"{where}: {bad} vertices have NaN or infinite coordinates")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise MeshError(f"{where}: face indices out of range (0..{len(vertices) - 1})")


def validate_mesh(mesh: trimesh.Trimesh, where: str = "mesh") -> trimesh.Trimesh:
    """Refuse meshes the segmentation cannot use (no faces, non-finite vertices, no area)."""
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshError(f"{where}: expected a triangle mesh, got {type(mesh).__name__}")
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    if len(f) == 0:
        raise MeshError(f"{where}: contains no triangle faces")
    _validate_arrays(v, f, where)
    area = float(mesh.area)
    if not np.isfinite(area) or area <= 0.0:
        raise MeshError(f"{where}: surface area is zero (all faces degenerate)")
    return mesh


def as_mesh(mesh_or_path) -> trimesh.Trimesh:
    """A :class:`trimesh.Trimesh` from a path (loaded) or a mesh (validated, not copied)."""
    if isinstance(mesh_or_path, (str, os.PathLike)):
        return load_mesh(mesh_or_path)
    if isinstance(mesh_or_path, trimesh.Scene):
        return validate_mesh(mesh_or_path.to_mesh())
    return validate_mesh(mesh_or_path)


# --------------------------------------------------------------------------- cleaning

def clean_mesh(mesh: trimesh.Trimesh, rewrap_process: bool = True, *,
               inplace: bool = False) -> trimesh.Trimesh:
    """The official ``clean_mesh`` + re-wrap (spec p3sam §2.1).

    ``merge_vertices()`` (trimesh defaults: UV / cached-normal seams stay open), then
    ``process(validate=True)`` (duplicate/degenerate faces removed in order, ``fix_normals``,
    second merge), then ``Trimesh(vertices, faces, process=rewrap_process)``:
    ``True`` is ``P3-SAM/demo/auto_mask.py`` (welds seams by position), ``False`` is
    X-Part's ``auto_mask_api.py`` (seams stay open).

    Official quirk: the official function mutates the caller's mesh; we work on a copy
    unless ``inplace`` (the X-Part pipeline relies on the in-place version).

    Fast path (not ``inplace``; off with ``TURBOPART_FAST_CLEAN=0``): when O(F) NumPy checks
    prove that trimesh would merge no vertex and drop no face and that the winding is already
    consistent (:func:`_clean_fast`), only the orientation fix is left, computed here
    vectorised with trimesh's rules; the result is bit-identical (same vertices, same faces in
    the same order and winding), else trimesh runs as above.
    """
    if not inplace and switch("TURBOPART_FAST_CLEAN"):
        fast = _clean_fast(mesh)
        if fast is not None:
            return fast
    m = mesh if inplace else mesh.copy(include_cache=True)
    m.merge_vertices()
    m.process(validate=True)
    out = trimesh.Trimesh(vertices=m.vertices, faces=m.faces, process=rewrap_process)
    if len(out.faces) == 0:
        raise MeshError("mesh has no faces left after cleaning (all degenerate)")
    return out


def _merge_is_noop(mesh) -> bool:
    """Whether ``Trimesh.process()`` (finite values; ``merge_vertices``) would change nothing:
    finite vertices, all referenced, no two equal at trimesh's merge precision (then no UV or
    normal column can make a merge either)."""
    from trimesh import tol, util
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    if len(v) == 0 or len(f) == 0 or v.dtype != np.float64 or not np.isfinite(v).all():
        return False
    referenced = np.zeros(len(v), dtype=bool)
    referenced[f] = True
    if not referenced.all():
        return False
    scaled = v * (10 ** util.decimal_to_digits(tol.merge))
    return bool(np.abs(scaled).max() < 2.0 ** 62) and _rows_unique(
        scaled.round().astype(np.int64))


def _rows_unique(keys: np.ndarray) -> bool:
    """Whether the int64 rows of ``keys`` [n, c] are pairwise distinct (hash, then exact)."""
    if len(keys) < 2:
        return True
    h = np.zeros(len(keys), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, m in enumerate((0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)[
                :keys.shape[1]]):
            h = (h ^ keys[:, j].astype(np.uint64)) * np.uint64(m)
            h ^= h >> np.uint64(29)
    h.sort()
    if not np.any(h[1:] == h[:-1]):
        return True
    return np.unique(keys, axis=0).shape[0] == len(keys)  # a hash collision or a duplicate


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the runs of equal values of a sorted array."""
    n = sorted_keys.size
    start = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    return start, np.diff(np.append(start, n))


def _sign_or_none(total: np.ndarray, abs_total: np.ndarray, count: np.ndarray):
    """Signs of float sums that no summation order can change, or None if one could flip.

    The terms are computed exactly as trimesh computes them; trimesh sums them in another
    order, and any order's error is below count * 2^-52 * sum(|terms|)."""
    bound = 2.0 * (count + 16.0) * 2.0 ** -52 * abs_total
    if np.any(np.abs(total) <= bound):
        return None
    return total < 0.0


def _clean_fast(mesh) -> "trimesh.Trimesh | None":
    """``clean_mesh`` for meshes trimesh's cleaning would not reorder: None if not provable.

    Conditions (each the exact trimesh rule): every vertex referenced and no two vertices
    equal at the merge precision (so none of the three ``merge_vertices`` calls merges,
    whatever UVs/normals add to the key); no duplicate face (``unique_faces``), no
    degenerate face (``nondegenerate_faces``, trimesh's own function); every edge shared by
    exactly two faces runs in opposite directions (``is_winding_consistent``, so
    ``fix_winding`` does nothing).  ``fix_inversion`` is then evaluated here: with one body
    (``body_count``, vertex components) all faces flip if the mesh is watertight with
    negative volume; with several, every face-adjacency component of >= 4 faces that is
    watertight and consistently wound by itself flips if its volume is negative.  Volume
    signs use trimesh's per-face terms; a sum too close to 0 to be order-independent falls
    back to trimesh.
    """
    from trimesh import Trimesh, tol, triangles, util
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    nv, nf = len(v), len(f)
    if nv == 0 or nf == 0 or v.dtype != np.float64 or f.ndim != 2 or f.shape[1] != 3 \
            or v.ndim != 2 or v.shape[1] != 3:
        return None
    f = f.astype(np.int64, copy=False)
    if f.min() < 0 or f.max() >= nv or not np.isfinite(v).all():
        return None
    referenced = np.zeros(nv, dtype=bool)
    referenced[f] = True
    if not referenced.all():
        return None
    # 1. no vertex merge: positions rounded as trimesh.grouping.merge_vertices does
    digits = util.decimal_to_digits(tol.merge)
    scaled = v * (10 ** digits)
    if not np.abs(scaled).max() < 2.0 ** 62:
        return None
    if not _rows_unique(scaled.round().astype(np.int64)):
        return None
    # 2. no duplicate face
    sf = np.sort(f, axis=1)
    if not _rows_unique(sf):
        return None
    # 3. no degenerate face (trimesh's own test, on the arrays its properties would give)
    tri = v[f]
    crosses = triangles.cross(tri)
    areas = triangles.area(crosses=crosses)
    if not triangles.nondegenerate(tri, areas=areas, height=tol.merge).all():
        return None
    # 4. consistent winding: edges used by exactly two faces run in opposite directions
    edges = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    ekey = np.minimum(edges[:, 0], edges[:, 1]) * nv + np.maximum(edges[:, 0], edges[:, 1])
    order = np.argsort(ekey, kind="stable")
    start, length = _runs(ekey[order])
    two = start[length == 2]
    i, j = order[two], order[two + 1]
    if np.any(edges[i, 0] == edges[j, 0]):
        return None  # fix_winding would re-orient faces: trimesh decides
    watertight = bool(np.all(length == 2))
    # 5. fix_inversion
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    g = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                   shape=(nv, nv))
    bodies = connected_components(g, directed=False)[0]
    # trimesh.triangles.mass_properties' volume terms (its sum / 6 is the volume)
    term = crosses[:, 0] * (tri[:, 0, 0] + tri[:, 1, 0] + tri[:, 2, 0])
    out_f = f
    if bodies <= 1:
        if watertight:
            neg = _sign_or_none(np.array([term.sum()]), np.array([np.abs(term).sum()]),
                                np.array([float(nf)]))
            if neg is None:
                return None
            if neg[0]:
                out_f = np.ascontiguousarray(np.fliplr(f))
    else:
        # face-adjacency components (pairs of an edge used by exactly two faces)
        fa, fb = i // 3, j // 3
        keep = fa != fb
        fa, fb = fa[keep], fb[keep]
        adj = coo_matrix((np.ones(fa.size, dtype=np.int8), (fa, fb)), shape=(nf, nf))
        ncomp, comp = connected_components(adj, directed=False)
        size = np.bincount(comp, minlength=ncomp)
        # watertight + wound per component (graph.is_watertight on its faces' edges): an
        # edge of 2 faces lies inside one component (already checked wound); an edge of 1
        # face breaks its component; edges of >= 3 faces are counted per component
        ce = comp[order // 3]                       # component of each sorted edge
        bad = np.zeros(ncomp, dtype=bool)
        bad[ce[start[length == 1]]] = True
        many = length >= 3
        if many.any():
            idx = np.repeat(start[many], length[many]) + (
                np.arange(int(length[many].sum()))
                - np.repeat(np.cumsum(length[many]) - length[many], length[many]))
            sub = order[idx]
            cs, ks = comp[sub // 3], ekey[sub]
            o2 = np.lexsort((ks, cs))
            cs, ks, sub = cs[o2], ks[o2], sub[o2]
            s2 = np.flatnonzero(np.concatenate(([True], (cs[1:] != cs[:-1])
                                                | (ks[1:] != ks[:-1]))))
            l2 = np.diff(np.append(s2, cs.size))
            bad[cs[s2[l2 != 2]]] = True
            p2 = s2[l2 == 2]
            bad[cs[p2][edges[sub[p2], 0] == edges[sub[p2 + 1], 0]]] = True
        cand = (size >= 4) & ~bad
        if cand.any():
            tot = np.bincount(comp, weights=term, minlength=ncomp)[cand]
            atot = np.bincount(comp, weights=np.abs(term), minlength=ncomp)[cand]
            neg = _sign_or_none(tot, atot, size[cand].astype(np.float64))
            if neg is None:
                return None
            flip_comp = np.zeros(ncomp, dtype=bool)
            flip_comp[np.flatnonzero(cand)[neg]] = True
            flip = flip_comp[comp]
            if flip.any():
                out_f = f.copy()
                out_f[flip] = np.fliplr(f[flip])
    return Trimesh(vertices=v.copy(), faces=np.ascontiguousarray(out_f), process=False)


# --------------------------------------------------------------------------- sampling

def sample_surface(mesh: trimesh.Trimesh, count: int, seed: int | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted surface samples: (points float64 [count, 3], face index int64 [count]).

    Exactly ``trimesh.sample.sample_surface(mesh, count, seed=seed)`` (spec §2.3: a fresh
    PCG64 generator, ``searchsorted`` on the cumulative face areas, the reflected
    parallelogram rule), so the official sampled points are reproduced bit for bit.
    """
    points, face_index = trimesh.sample.sample_surface(mesh, int(count), seed=seed)
    return np.asarray(points, dtype=np.float64), np.asarray(face_index, dtype=np.int64)


def normalize_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``normalize_pc`` (spec §2.4): centre the bbox, longest half-extent 1 (float64).

    Returns (normalised points, centre [3], scale) with
    ``normalised = (points - centre) / (scale + 1e-10)``.
    """
    p = np.asarray(points, dtype=np.float64)
    mx, mn = p.max(axis=0), p.min(axis=0)
    center = (mx + mn) / 2
    scale = float(np.max(np.abs((mx - mn) / 2)))
    return (p - center) / (scale + 1e-10), center, scale


def normalize_mesh(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, np.ndarray, float]:
    """X-Part ``PartFormerPipeline.normalize_mesh``: a copy with the bbox centre at 0 and
    the longest bbox side spanning [-0.8, 0.8]; returns (mesh, centre, scale) with
    ``v_normalised = (v - centre) / scale``."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    mn, mx = v.min(axis=0), v.max(axis=0)
    center = (mn + mx) / 2.0
    scale = float(np.max(mx - mn) / 2 / 0.8)
    out = mesh.copy(include_cache=True)
    out.vertices = (v - center) / scale
    return out, center, scale


# --------------------------------------------------------------------------- export

def part_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated RGBA uint8 colours (golden-ratio hues, deterministic)."""
    out = np.empty((n, 4), dtype=np.uint8)
    phi = 0.618033988749895
    h = (seed * 0.1234567) % 1.0
    for i in range(n):
        h = (h + phi) % 1.0
        s = 0.55 + 0.35 * ((i * 7) % 3) / 2
        v = 0.95 - 0.25 * ((i * 5) % 2)
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out[i] = (round(r * 255), round(g * 255), round(b * 255), 255)
    return out


UNLABELED_COLOR = np.array([128, 128, 128, 255], dtype=np.uint8)


def split_by_label(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray
                   ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``[(label, part vertices, part faces)]`` in ascending label order (compact indices)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    ls = labels[order]
    cuts = np.flatnonzero(np.diff(ls)) + 1
    out = []
    for chunk in np.split(order, cuts):
        if len(chunk) == 0:
            continue
        f = faces[chunk]
        uniq, inv = np.unique(f.reshape(-1), return_inverse=True)
        out.append((int(labels[chunk[0]]), vertices[uniq], inv.reshape(-1, 3)))
    return out


def export_parts_glb(path: str | os.PathLike, mesh: trimesh.Trimesh, face_labels,
                     colors: np.ndarray | None = None, name_format: str = "part_{:03d}",
                     unlabeled_name: str = "unlabeled") -> Path:
    """Write a binary glTF scene with one named node (and a same-named coloured material) per
    part; returns the path.

    Part ``k`` (label ``k`` >= 0) becomes node/mesh/material ``name_format.format(k)``;
    faces with a negative label go to one grey ``unlabeled`` node (last).  The colour is the
    material's base colour, which Blender and web viewers show directly.
    """
    labels = np.asarray(face_labels).astype(np.int64)
    n_parts = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    if colors is None:
        colors = part_colors(n_parts)
    lab = np.where(labels < 0, -1, labels)
    groups = split_by_label(np.asarray(mesh.vertices), np.asarray(mesh.faces), lab)
    groups = [g for g in groups if g[0] >= 0] + [g for g in groups if g[0] < 0]
    return write_glb(path, [GlbMesh.of(unlabeled_name if label < 0 else name_format.format(label),
                                       pv, pf, UNLABELED_COLOR if label < 0 else colors[label])
                            for label, pv, pf in groups])


# --------------------------------------------------------------------------- GLB writer

#: GLB stores its total length in 32 bits.
GLB_MAX_BYTES = (1 << 32) - 1


class GlbTooLarge(ValueError):
    """The scene does not fit in one GLB file (4 GiB)."""


class GlbMesh(NamedTuple):
    """One node of a GLB scene: a coloured triangle mesh, optionally translated."""

    name: str
    vertices: np.ndarray            # [V, 3] float32, C-contiguous
    faces: np.ndarray               # [F, 3] uint32, C-contiguous
    rgba: tuple[int, int, int, int]
    bounds: tuple[list[float], list[float]]
    translation: tuple[float, float, float] | None = None

    @classmethod
    def of(cls, name: str, vertices, faces, rgba=(200, 200, 200, 255),
           translation=None) -> "GlbMesh":
        v = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
        f = np.ascontiguousarray(faces, dtype=np.uint32).reshape(-1, 3)
        lo, hi = (v.min(0).tolist(), v.max(0).tolist()) if len(v) else ([0.0] * 3, [0.0] * 3)
        t = None if translation is None else tuple(float(x) for x in translation)
        return cls(name, v, f, tuple(int(c) for c in rgba), (lo, hi), t)

    def moved(self, translation) -> "GlbMesh":
        """The same arrays under a node translation."""
        return self._replace(translation=tuple(float(x) for x in translation))


def _glb_document(meshes: Sequence[GlbMesh]) -> bytes:
    """The JSON chunk of a GLB scene of ``meshes`` (blobs in order: each mesh's vertices,
    then its faces), padded with spaces to 4 bytes."""
    import json

    views, accessors, gl_meshes, materials, nodes = [], [], [], [], []
    offset = 0
    for i, m in enumerate(meshes):
        for arr, target in ((m.vertices, 34962), (m.faces, 34963)):
            views.append({"buffer": 0, "byteOffset": offset, "byteLength": arr.nbytes,
                          "target": target})
            offset += arr.nbytes  # float32 / uint32: always 4-byte aligned
        accessors.append({"bufferView": 2 * i, "componentType": 5126, "count": len(m.vertices),
                          "type": "VEC3", "min": m.bounds[0], "max": m.bounds[1]})
        accessors.append({"bufferView": 2 * i + 1, "componentType": 5125,
                          "count": int(m.faces.size), "type": "SCALAR"})
        materials.append({"name": m.name, "doubleSided": True,
                          "pbrMetallicRoughness": {
                              "baseColorFactor": [c / 255.0 for c in m.rgba],
                              "metallicFactor": 0.0, "roughnessFactor": 0.8}})
        gl_meshes.append({"name": m.name, "primitives": [{
            "attributes": {"POSITION": 2 * i}, "indices": 2 * i + 1, "material": i,
            "mode": 4}]})
        node = {"name": m.name, "mesh": i}
        if m.translation is not None:
            node["translation"] = list(m.translation)
        nodes.append(node)
    doc = {"asset": {"version": "2.0", "generator": "turbopart"}, "scene": 0,
           "scenes": [{"nodes": list(range(len(nodes)))}], "nodes": nodes}
    if meshes:
        doc.update(meshes=gl_meshes, materials=materials, accessors=accessors,
                   bufferViews=views, buffers=[{"byteLength": offset}])
    head = json.dumps(doc, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 4)


class GlbWriter:
    """A binary glTF 2.0 scene written mesh by mesh (one named node, mesh and PBR material
    each; float32 positions, uint32 indices), the arrays straight from memory.

    The binary chunk follows a JSON chunk of ``reserve`` bytes left empty until
    :meth:`close` writes the document there, padded with spaces (JSON whitespace), so
    meshes can be appended as they are made and node translations set at the end.  A
    document longer than the reservation moves the binary chunk once (correct, slower).
    :meth:`add` raises :class:`GlbTooLarge` past the format's 4 GiB; the file is then
    removed and the writer unusable."""

    #: Reservation per mesh for streamed scenes (a node's JSON is ≈ 700 bytes).
    BYTES_PER_MESH = 1024

    def __init__(self, path: str | os.PathLike, reserve: int):
        self.path = Path(path)
        self.reserve = int(reserve) + (-int(reserve) % 4)
        self.meshes: list[GlbMesh] = []
        self.size = 0  # bytes of the binary chunk so far
        self._file = open(self.path, "wb")
        self._file.seek(self._bin_start)

    @classmethod
    def for_meshes(cls, path: str | os.PathLike, count: int) -> "GlbWriter":
        """A writer reserving JSON room for ``count`` meshes."""
        return cls(path, 512 + cls.BYTES_PER_MESH * max(int(count), 1))

    @property
    def _bin_start(self) -> int:
        return 12 + 8 + self.reserve + 8

    def add(self, mesh: GlbMesh) -> None:
        nbytes = mesh.vertices.nbytes + mesh.faces.nbytes
        total = self._bin_start + self.size + nbytes
        if total > GLB_MAX_BYTES:
            self.discard()
            raise GlbTooLarge(f"{self.path}: {total / 2**30:.1f} GiB does not fit in one GLB "
                              "file (4 GiB at most)")
        for arr in (mesh.vertices, mesh.faces):
            self._file.write(memoryview(arr).cast("B"))
        self.size += nbytes
        self.meshes.append(mesh)

    def close(self, translations: dict[str, Sequence[float]] | None = None) -> Path:
        """Write the document (``translations``: node name → offset, over the meshes' own)
        and close the file."""
        import struct
        meshes = self.meshes
        if translations:
            meshes = [m.moved(translations[m.name]) if m.name in translations else m
                      for m in meshes]
        head = _glb_document(meshes)
        f, self._file = self._file, None
        try:
            if len(head) > self.reserve:  # move the binary chunk behind a longer document
                f.close()
                old = self.path.with_name(self.path.name + ".part")
                os.replace(self.path, old)
                with open(old, "rb") as src:
                    src.seek(self._bin_start)
                    self.reserve = len(head)
                    f = open(self.path, "wb")
                    f.seek(self._bin_start)
                    import shutil
                    shutil.copyfileobj(src, f, 1 << 24)
                old.unlink()
            head += b" " * (self.reserve - len(head))
            total = 12 + 8 + len(head) + (8 + self.size if self.size else 0)
            f.seek(0)
            f.write(struct.pack("<4sII", b"glTF", 2, total))
            f.write(struct.pack("<I4s", len(head), b"JSON"))
            f.write(head)
            if self.size:
                f.write(struct.pack("<I4s", self.size, b"BIN\0"))
            else:
                f.truncate(total)
        finally:
            f.close()
        return self.path

    def discard(self) -> None:
        """Close and remove the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def write_glb(path: str | os.PathLike, meshes: Sequence[GlbMesh]) -> Path:
    """Write ``meshes`` as a binary glTF 2.0 scene (:class:`GlbWriter`, the document's room
    reserved exactly).  Raises :class:`GlbTooLarge` (nothing written) past the format's
    4 GiB."""
    w = GlbWriter(path, len(_glb_document(meshes)))
    try:
        for m in meshes:
            w.add(m)
    except BaseException:
        w.discard()
        raise
    return w.close()


def mesh_info(mesh: trimesh.Trimesh) -> dict:
    """Plain facts about a mesh for reports (counts, bounds, area)."""
    b = np.asarray(mesh.bounds, dtype=np.float64)
    return {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "bounds": b.tolist(), "extent": (b[1] - b[0]).tolist(),
            "area": float(mesh.area)}


def find_meshes(folder: str | os.PathLike, suffixes: Sequence[str] = MESH_SUFFIXES
                ) -> list[Path]:
    """Mesh files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes)
