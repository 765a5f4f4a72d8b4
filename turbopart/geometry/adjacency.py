"""Face adjacency of triangle meshes, vectorised (spec p3sam §2.2).

Two faces are adjacent when they share an edge that is used by **exactly two** faces
(trimesh ``Trimesh.face_adjacency`` semantics): boundary edges (one face) and non-manifold
edges (three or more faces) give no adjacency, and a pair made of one face twice
(a degenerate face repeating an edge) is dropped.  Pairs keep their multiplicity: two faces
sharing two such edges form two pairs, exactly like trimesh's list, so the official dense
table (one slot per pair) lists that neighbour twice and ``fix_label``'s vote counts it
twice.

The official code turns the pair list into a dense ``[F', max_degree]`` table with numba,
where ``F' = 1 + max face index in any pair``; faces at or beyond ``F'`` have no row.  We
keep all ``F`` rows (faces beyond ``F'`` simply have degree 0): every consumer treats a face
without a row exactly like a face with an empty row (see :mod:`turbopart.p3sam.labels`),
so results are identical and the "no adjacent pair at all" case (an official crash) works.

Everything runs on the device of ``faces`` (one sort of the ``3F`` edge keys).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def face_adjacency(faces: torch.Tensor) -> torch.Tensor:
    """Pairs ``[E, 2]`` (int64, smaller face first) of faces sharing a 2-face edge.

    Same pair multiset as trimesh's ``face_adjacency``; the row order is by edge key
    (trimesh's order among equal keys is unspecified anyway, and no consumer depends on it).
    """
    faces = torch.as_tensor(faces)
    dev = faces.device
    f = faces.to(torch.int64)
    nf = f.shape[0]
    if nf == 0:
        return torch.zeros(0, 2, dtype=torch.int64, device=dev)
    # edges (v0,v1), (v1,v2), (v2,v0) of every face, face-major like trimesh.faces_to_edges
    e = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    lo = torch.minimum(e[:, 0], e[:, 1])
    hi = torch.maximum(e[:, 0], e[:, 1])
    nv = int(f.max()) + 1 if f.numel() else 1
    key = lo * nv + hi
    face_of = torch.arange(nf, device=dev).repeat_interleave(3)
    key_s, order = torch.sort(key, stable=True)
    # run boundaries of equal keys; keep runs of length exactly 2
    n = key_s.numel()
    start = torch.ones(n, dtype=torch.bool, device=dev)
    start[1:] = key_s[1:] != key_s[:-1]
    starts = torch.nonzero(start).squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([n], device=dev))
    two = starts[lengths == 2]
    a = face_of[order[two]]
    b = face_of[order[two + 1]]
    keep = a != b
    a, b = a[keep], b[keep]
    return torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


@dataclass
class FaceGraph:
    """Face adjacency in the forms the automatic segmentation needs.

    ``pairs`` [E, 2] int64 (one row per shared 2-face edge, smaller face first),
    ``table`` [F, D] int64 neighbour table padded with -1 (D = max degree, 0 if no pairs),
    ``degree`` [F] int64, ``table_rows`` = official ``F'`` (1 + largest face in a pair, 0 if
    none).  NumPy arrays (host): the face-level algorithms run in vectorised NumPy/SciPy.
    """

    num_faces: int
    pairs: np.ndarray
    table: np.ndarray
    degree: np.ndarray
    table_rows: int

    @classmethod
    def from_pairs(cls, pairs, num_faces: int) -> "FaceGraph":
        p = _np(pairs).astype(np.int64, copy=False).reshape(-1, 2)
        u = np.concatenate([p[:, 0], p[:, 1]])
        v = np.concatenate([p[:, 1], p[:, 0]])
        degree = np.bincount(u, minlength=num_faces).astype(np.int64)
        width = int(degree.max()) if len(u) else 0
        table = np.full((num_faces, width), -1, dtype=np.int64)
        if len(u):
            order = np.argsort(u, kind="stable")
            us, vs = u[order], v[order]
            first = np.zeros(num_faces + 1, dtype=np.int64)
            np.cumsum(degree, out=first[1:])
            slot = np.arange(len(us)) - first[us]
            table[us, slot] = vs
        rows = int(p.max()) + 1 if len(p) else 0
        return cls(num_faces, p, table, degree, rows)

    @classmethod
    def from_faces(cls, faces, device: torch.device | str | None = None) -> "FaceGraph":
        f = torch.as_tensor(np.asarray(faces) if not isinstance(faces, torch.Tensor) else faces)
        if device is not None:
            f = f.to(device)
        return cls.from_pairs(face_adjacency(f), int(f.shape[0]))

    @property
    def edges_u(self) -> np.ndarray:
        return self.pairs[:, 0]

    @property
    def edges_v(self) -> np.ndarray:
        return self.pairs[:, 1]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
