"""A bundled example object, built from trimesh primitives (no download, no data files).

``turbopart run`` with no MESH uses :func:`example_mesh` ("chair"): a seat, a backrest, two
armrests and four legs, about 3 000 triangles, in metres, Y up (glTF convention).
:func:`example_boxes` gives its parts' axis-aligned boxes, so ``turbopart generate`` can be
tried without segmentation too.
"""
from __future__ import annotations

import numpy as np
import trimesh

EXAMPLES = ("chair", "lamp")


def _chair_parts() -> list[tuple[str, trimesh.Trimesh]]:
    parts = []
    seat = trimesh.creation.box(extents=(0.50, 0.06, 0.48))
    seat.apply_translation((0.0, 0.45, 0.0))
    parts.append(("seat", seat))
    back = trimesh.creation.box(extents=(0.50, 0.52, 0.05))
    back.apply_transform(trimesh.transformations.rotation_matrix(-0.12, (1, 0, 0)))
    back.apply_translation((0.0, 0.76, -0.23))
    parts.append(("backrest", back))
    for side, x in (("left", -0.27), ("right", 0.27)):
        arm = trimesh.creation.box(extents=(0.05, 0.04, 0.42))
        arm.apply_translation((x, 0.66, 0.0))
        post = trimesh.creation.cylinder(radius=0.018, height=0.18, sections=20)
        post.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
        post.apply_translation((x, 0.56, 0.17))
        parts.append((f"armrest_{side}", trimesh.util.concatenate([arm, post])))
    for name, (x, z) in (("leg_front_left", (-0.22, 0.20)), ("leg_front_right", (0.22, 0.20)),
                         ("leg_back_left", (-0.22, -0.20)), ("leg_back_right", (0.22, -0.20))):
        leg = trimesh.creation.cylinder(radius=0.022, height=0.42, sections=24)
        leg.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
        leg.apply_translation((x, 0.21, z))
        parts.append((name, leg))
    return parts


def _lamp_parts() -> list[tuple[str, trimesh.Trimesh]]:
    up = trimesh.transformations.rotation_matrix(-np.pi / 2, (1, 0, 0))
    base = trimesh.creation.cylinder(radius=0.14, height=0.03, sections=48)
    base.apply_transform(up)
    base.apply_translation((0, 0.015, 0))
    stem = trimesh.creation.cylinder(radius=0.012, height=0.42, sections=24)
    stem.apply_transform(up)
    stem.apply_translation((0, 0.24, 0))
    shade = trimesh.creation.cone(radius=0.2, height=0.22, sections=48)
    shade.apply_transform(up)
    shade.apply_translation((0, 0.38, 0))
    bulb = trimesh.creation.icosphere(subdivisions=3, radius=0.05)
    bulb.apply_translation((0, 0.45, 0))
    return [("base", base), ("stem", stem), ("shade", shade), ("bulb", bulb)]


def example_parts(name: str = "chair") -> list[tuple[str, trimesh.Trimesh]]:
    """The named example's parts as ``[(part name, mesh)]``."""
    if name == "chair":
        return _chair_parts()
    if name == "lamp":
        return _lamp_parts()
    raise ValueError(f"unknown example {name!r}; choose one of {', '.join(EXAMPLES)}")


def example_mesh(name: str = "chair") -> trimesh.Trimesh:
    """The example as one mesh (all parts concatenated, vertices merged per part)."""
    parts = [m for _, m in example_parts(name)]
    mesh = trimesh.util.concatenate(parts)
    mesh.metadata["name"] = f"turbopart example: {name}"
    return mesh


def example_boxes(name: str = "chair", inflate: float = 1e-4) -> np.ndarray:
    """``[K, 2, 3]`` axis-aligned boxes (min, max) of the example's parts, grown by
    ``inflate`` × the longest side (so float32 copies of the mesh stay inside)."""
    parts = example_parts(name)
    boxes = np.stack([np.asarray(m.bounds, dtype=np.float64) for _, m in parts])
    ext = np.ptp(np.concatenate([m.vertices for _, m in parts]), axis=0).max()
    boxes[:, 0] -= inflate * ext
    boxes[:, 1] += inflate * ext
    return boxes


def write_example(path, name: str = "chair") -> None:
    """Write the example as a GLB file (for trying the command line)."""
    example_mesh(name).export(str(path))
