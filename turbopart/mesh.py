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
from typing import Sequence

import numpy as np
import trimesh

from .cli import UserError

#: File types ``turbopart`` reads (trimesh loaders that give triangle meshes).
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


class MeshError(UserError):
    """A mesh file or mesh that cannot be used; the message is one line for the user."""


# --------------------------------------------------------------------------- loading

def _check_file(path: Path) -> None:
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
    _check_file(path)
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
    """
    m = mesh if inplace else mesh.copy(include_cache=True)
    m.merge_vertices()
    m.process(validate=True)
    out = trimesh.Trimesh(vertices=m.vertices, faces=m.faces, process=rewrap_process)
    if len(out.faces) == 0:
        raise MeshError("mesh has no faces left after cleaning (all degenerate)")
    return out


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


def parts_scene(mesh: trimesh.Trimesh, face_labels: np.ndarray,
                colors: np.ndarray | None = None, name_format: str = "part_{:03d}",
                unlabeled_name: str = "unlabeled") -> trimesh.Scene:
    """A scene with one named node (and a same-named coloured material) per part.

    Part ``k`` (label ``k`` >= 0) becomes node/mesh/material ``name_format.format(k)``;
    faces with a negative label go to one grey ``unlabeled`` node (last).  The colour is the
    material's base colour, which Blender and web viewers show directly.
    """
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    labels = np.asarray(face_labels).astype(np.int64)
    n_parts = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    if colors is None:
        colors = part_colors(n_parts)
    scene = trimesh.Scene()
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    lab = np.where(labels < 0, -1, labels)
    groups = split_by_label(v, f, lab)
    groups = [g for g in groups if g[0] >= 0] + [g for g in groups if g[0] < 0]
    for label, pv, pf in groups:
        name = unlabeled_name if label < 0 else name_format.format(label)
        rgba = UNLABELED_COLOR if label < 0 else colors[label]
        part = trimesh.Trimesh(vertices=pv, faces=pf, process=False)
        mat = PBRMaterial(name=name, baseColorFactor=[int(c) for c in rgba],
                          metallicFactor=0.0, roughnessFactor=0.8, doubleSided=True)
        part.visual = TextureVisuals(material=mat)
        scene.add_geometry(part, node_name=name, geom_name=name)
    return scene


def export_parts_glb(path: str | os.PathLike, mesh: trimesh.Trimesh, face_labels,
                     colors: np.ndarray | None = None) -> Path:
    """Write :func:`parts_scene` as a binary glTF file; returns the path."""
    path = Path(path)
    data = parts_scene(mesh, face_labels, colors).export(file_type="glb")
    path.write_bytes(data)
    return path


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
