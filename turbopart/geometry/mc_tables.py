"""Marching-cubes case tables, generated programmatically (no published table is copied).

How the tables are built
------------------------
A cell has 8 corners and 12 edges.  For every sign configuration (8 bits: corner ``c`` is
"above" when bit ``c`` is set) and every choice for the ambiguous faces (6 bits, one per cube
face), we

1. trace the iso-contour on each of the six faces: a face with two crossed edges gets one
   segment; a face with four crossed edges (diagonal pattern) gets two segments, paired
   according to the face bit (1: the two "above" corners are joined across the face, i.e. the
   segments cut off the two "below" corners; 0: the segments cut off the "above" corners);
2. orient every segment so that, seen from outside the cube, the "above" side lies on its
   left; every crossed edge is then the end of exactly one segment and the start of another;
3. chain the segments into closed loops and triangulate each loop with the shortest
   diagonals that never lie inside a cube face (a loop that cannot avoid it is fanned around
   an extra centre point; see :func:`triangles_for`).

The face decision depends only on the four values of that face (asymptotic decider, see
:func:`turbopart.geometry.marching_cubes`), so two cells sharing a face always trace the same
segments on it: the surface has no cracks and is a closed 2-manifold wherever the field's
iso-surface is closed.  With the loop orientation above, triangles have their normals
pointing toward the "above" side (larger values), which is the winding scikit-image returns
for ``gradient_direction="descent"``.  Mesh edges are either face segments (shared by the two
cells of that face) or inner diagonals/spokes (inside one cell), so every edge of a closed
surface is used by exactly two triangles.

Interior ambiguities (the tunnels of Chernyaev's MC33 / Lewiner's cases 4, 6, 7, 10, 12, 13)
are not resolved: every loop becomes its own disk.  Crack-freeness does not depend on it.

Conventions
-----------
* corner ``c`` (0..7) sits at offset ``(c & 1, c >> 1 & 1, c >> 2 & 1)`` along array axes
  (0, 1, 2);
* edge ``e = 4 * a + j`` runs along axis ``a`` from corner ``c0`` (bit ``a`` clear) to
  ``c0 | 1 << a``; ``j`` enumerates the offsets along the two other axes ``(b, d)`` (``b < d``)
  as ``j = ob + 2 * od``;
* face ``f = 2 * a + s`` is the cube face at offset ``s`` along axis ``a``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: Upper bound of triangles per cell (a 12-point loop fanned around its centre).
MAX_TRIS = 12
#: Edge id used in the triangle table for the centre point of a loop (see triangles_for).
CENTER = 12


def corner_offset(c: int) -> tuple[int, int, int]:
    return (c & 1, (c >> 1) & 1, (c >> 2) & 1)


def _other_axes(a: int) -> tuple[int, int]:
    b, d = [x for x in range(3) if x != a]
    return b, d


def _build_edges() -> tuple[np.ndarray, np.ndarray]:
    """EDGE_AXIS [12], EDGE_CORNERS [12, 2]."""
    axis = np.zeros(12, dtype=np.int64)
    corners = np.zeros((12, 2), dtype=np.int64)
    for a in range(3):
        b, d = _other_axes(a)
        for j in range(4):
            ob, od = j & 1, j >> 1
            c0 = (ob << b) | (od << d)
            e = 4 * a + j
            axis[e] = a
            corners[e] = (c0, c0 | (1 << a))
    return axis, corners


EDGE_AXIS, EDGE_CORNERS = _build_edges()


def _edge_of_corners() -> dict[tuple[int, int], int]:
    out = {}
    for e in range(12):
        c0, c1 = (int(x) for x in EDGE_CORNERS[e])
        out[(c0, c1)] = e
        out[(c1, c0)] = e
    return out


_EDGE_OF = _edge_of_corners()


def _build_faces() -> np.ndarray:
    """FACE_CORNERS [6, 4]: the corners of each face in cyclic order."""
    faces = np.zeros((6, 4), dtype=np.int64)
    for a in range(3):
        b, d = _other_axes(a)
        for s in range(2):
            cyc = [(0, 0), (1, 0), (1, 1), (0, 1)]
            faces[2 * a + s] = [(s << a) | (ob << b) | (od << d) for ob, od in cyc]
    return faces


FACE_CORNERS = _build_faces()


def _corner_pos(c: int) -> np.ndarray:
    return np.array(corner_offset(c), dtype=np.float64)


_EDGE_MID = np.array([0.5 * (_corner_pos(int(c0)) + _corner_pos(int(c1)))
                      for c0, c1 in EDGE_CORNERS])                       # [12, 3]
_CORNER_POS = np.array([corner_offset(c) for c in range(8)], dtype=np.float64)


def _edge_mid(e: int) -> np.ndarray:
    return _EDGE_MID[e]


def ambiguous_faces(case: int) -> int:
    """6-bit mask of the faces of ``case`` whose corners alternate (four crossed edges)."""
    m = 0
    for f in range(6):
        q = [(case >> int(c)) & 1 for c in FACE_CORNERS[f]]
        if q[0] == q[2] and q[1] == q[3] and q[0] != q[1]:
            m |= 1 << f
    return m


def _face_segments(case: int, f: int, joined_above: bool) -> list[tuple[int, int]]:
    """Oriented segments (edge_from, edge_to) of the iso-contour on face ``f``."""
    q = [int(c) for c in FACE_CORNERS[f]]
    above = [(case >> c) & 1 for c in q]
    # edge i of the face joins q[i] and q[i + 1]
    fedges = [_EDGE_OF[(q[i], q[(i + 1) % 4])] for i in range(4)]
    crossed = [i for i in range(4) if above[i] != above[(i + 1) % 4]]
    a, s = divmod(f, 2)
    normal = np.zeros(3)
    normal[a] = 1.0 if s else -1.0
    segs: list[tuple[int, tuple[int, int]]] = []  # (reference corner index in q, (ei, ej))
    if len(crossed) == 2:
        i, j = crossed
        ref = next(k for k in range(4) if above[k])
        segs.append((ref, (fedges[i], fedges[j])))
    elif len(crossed) == 4:
        # cut off the corners that are NOT joined across the face
        cut_value = 0 if joined_above else 1
        for k in range(4):
            if above[k] == cut_value:
                segs.append((k, (fedges[(k - 1) % 4], fedges[k])))
    out = []
    for ref, (ei, ej) in segs:
        p, r = _EDGE_MID[ei], _EDGE_MID[ej]
        # side of the reference corner w.r.t. the segment p→r, seen from outside the face:
        # sign of ((normal × (r − p)) · (corner − p)) = sign of det[normal, r − p, corner − p]
        side = float(np.linalg.det(np.stack([normal, r - p, _CORNER_POS[q[ref]] - p])))
        assert abs(side) > 1e-9
        # the reference corner must be on the left if it is above, on the right if below
        want_left = bool(above[ref])
        if (side > 0) != want_left:
            ei, ej = ej, ei
        out.append((ei, ej))
    return out


def loops_for(case: int, face_bits: int) -> list[list[int]]:
    """Closed, oriented contour loops (lists of edge ids) of one configuration."""
    nxt: dict[int, int] = {}
    for f in range(6):
        for ei, ej in _face_segments(case, f, bool((face_bits >> f) & 1)):
            assert ei not in nxt, (case, face_bits, f)
            nxt[ei] = ej
    assert sorted(nxt) == sorted(nxt.values())
    loops = []
    seen: set[int] = set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop = [start]
        seen.add(start)
        e = nxt[start]
        while e != start:
            loop.append(e)
            seen.add(e)
            e = nxt[e]
        loops.append(loop)
    return loops


def _edge_faces(e: int) -> set[int]:
    """The two cube faces that contain edge ``e``."""
    a = int(EDGE_AXIS[e])
    c0 = int(EDGE_CORNERS[e][0])
    return {2 * ax + ((c0 >> ax) & 1) for ax in range(3) if ax != a}


_EDGE_FACES = [_edge_faces(e) for e in range(12)]
_BAD = 1e6


def _diagonal_cost_uncached(u: int, v: int) -> float:
    if _EDGE_FACES[u] & _EDGE_FACES[v]:
        return _BAD
    return float(np.linalg.norm(_EDGE_MID[u] - _EDGE_MID[v]))


_DIAG = [[_diagonal_cost_uncached(u, v) for v in range(12)] for u in range(12)]


def _diagonal_cost(u: int, v: int) -> float:
    """Cost of an inner diagonal between edge points ``u`` and ``v``.

    A diagonal between two points of the same cube face would lie in that face, where the
    neighbouring cell may draw the same segment: that would give an edge shared by four
    triangles, so it is forbidden (cost ``_BAD``).  Otherwise: its length between edge
    midpoints (shorter diagonals, better shaped triangles).
    """
    return _DIAG[u][v]


def _triangulate_loop(loop: list[int]) -> tuple[list[tuple[int, int, int]], bool]:
    """Minimum-cost triangulation of a loop (interval DP); centre fan if none is allowed.

    Triangles keep the loop orientation.  Returns (triangles, uses_centre); the centre point
    has edge id ``CENTER`` (12).
    """
    n = len(loop)
    if n == 3:
        return [tuple(loop)], False
    cost = [[0.0] * n for _ in range(n)]
    split = [[-1] * n for _ in range(n)]
    for length in range(2, n):
        for i in range(0, n - length):
            j = i + length
            best, arg = None, -1
            for k in range(i + 1, j):
                c = cost[i][k] + cost[k][j]
                if k - i > 1:
                    c += _diagonal_cost(loop[i], loop[k])
                if j - k > 1:
                    c += _diagonal_cost(loop[k], loop[j])
                if best is None or c < best - 1e-12:
                    best, arg = c, k
            cost[i][j], split[i][j] = best, arg
    if cost[0][n - 1] >= _BAD:
        return [(CENTER, loop[i], loop[(i + 1) % n]) for i in range(n)], True
    tris: list[tuple[int, int, int]] = []

    def emit(i: int, j: int) -> None:
        if j - i < 2:
            return
        k = split[i][j]
        tris.append((loop[i], loop[k], loop[j]))
        emit(i, k)
        emit(k, j)

    emit(0, n - 1)
    return tris, False


def triangles_for(case: int, face_bits: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Triangles of one configuration and the loop that needs the centre point (or []).

    Every loop is triangulated without a diagonal inside a cube face (so the mesh stays
    edge-manifold); the few loops that cannot be (8, 9 or 12 points winding twice across one
    face; at most one per configuration) are fanned around a centre point placed at the mean
    of their points.  Normals point toward the "above" side.
    """
    tris: list[tuple[int, int, int]] = []
    centre: list[int] = []
    for loop in loops_for(case, face_bits):
        t, uses_centre = _triangulate_loop(loop)
        if uses_centre:
            assert not centre, "more than one centre loop"
            centre = list(loop)
        tris.extend(t)
    return tris, centre


@dataclass(frozen=True)
class Tables:
    """All lookup tables as NumPy arrays (moved to a device by the caller)."""

    #: [256] 12-bit mask of the crossed edges of each case
    crossed: np.ndarray
    #: [256, 12] position of edge e among the crossed edges of the case (-1 if not crossed)
    rank: np.ndarray
    #: [256] number of crossed edges
    ncrossed: np.ndarray
    #: [256] 6-bit mask of ambiguous faces
    ambiguous: np.ndarray
    #: [256 * 64] triangle count of configuration case * 64 + face_bits
    ntri: np.ndarray
    #: [256 * 64, MAX_TRIS, 3] edge ids of the triangles (-1 padded; CENTER = centre point)
    tris: np.ndarray
    #: [256 * 64, 12] edges whose points are averaged into the centre point
    centre: np.ndarray


@functools.lru_cache(maxsize=1)
def tables() -> Tables:
    crossed = np.zeros(256, dtype=np.int64)
    rank = np.full((256, 12), -1, dtype=np.int64)
    ncrossed = np.zeros(256, dtype=np.int64)
    ambiguous = np.zeros(256, dtype=np.int64)
    ntri = np.zeros(256 * 64, dtype=np.int64)
    tris = np.full((256 * 64, MAX_TRIS, 3), -1, dtype=np.int64)
    centre = np.zeros((256 * 64, 12), dtype=bool)
    for case in range(256):
        r = 0
        for e in range(12):
            c0, c1 = EDGE_CORNERS[e]
            if ((case >> int(c0)) & 1) != ((case >> int(c1)) & 1):
                crossed[case] |= 1 << e
                rank[case, e] = r
                r += 1
        ncrossed[case] = r
        amb = ambiguous_faces(case)
        ambiguous[case] = amb
        # enumerate only the face bits that matter; broadcast to all 64 combinations
        sub = [b for b in range(64) if b & ~amb == 0]
        for b in sub:
            t, cen = triangles_for(case, b) if 0 < case < 255 else ([], [])
            assert len(t) <= MAX_TRIS
            arr = np.array(t, dtype=np.int64).reshape(-1, 3)
            rows = [case * 64 + full for full in range(64) if full & amb == b]
            ntri[rows] = len(t)
            tris[rows, : len(t)] = arr
            centre[np.ix_(rows, cen)] = True
    return Tables(crossed, rank, ncrossed, ambiguous, ntri, tris, centre)
