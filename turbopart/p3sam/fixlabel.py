"""The official ``fix_label`` (spec p3sam §5.3), exactly, without a per-face Python loop.

Official semantics (sequential, Gauss–Seidel): the work list is the faces with a negative
label in increasing index order.  A pass visits the list in order; a face whose neighbours
(adjacency-table slots, duplicates counted) include labels >= 0 takes their mode (ties to the
smallest label) *immediately*, so faces later in the same pass already see it; a face with
no labelled neighbour waits for the next pass.  Passes repeat while something changed, at
most ``max_passes`` (50) times.

Exact reformulation used here (two compiled / vectorised steps):

1. **Pass numbers.**  A negative face ``i`` is filled in pass

   ``p(i) = min(1 if a neighbour is labelled at the start,
   min over negative neighbours j < i of p(j),  min over negative neighbours j > i of p(j)+1)``

   (a lower neighbour filled in pass k is visible in pass k, a higher one only in pass k+1).
   That is a shortest path with 0/1 edge weights from a virtual source; we solve it with one
   SciPy Dijkstra (weights scaled so that "0" = 1 step and "1" = ``big`` steps, which keeps
   every weight positive and every distance an exact float64 integer).  Faces with
   ``p > max_passes`` (or unreachable) keep their negative label.
2. **Values.**  Face ``i`` sees exactly the neighbours that are labelled at the start, plus
   the negative neighbours ``j`` with ``(p(j), j) < (p(i), i)``.  Values are therefore
   computed in waves over that dependency DAG (Kahn's algorithm, one vectorised NumPy step
   per wave over the faces whose inputs are all known).  Chains of faces that each see a
   single unknown neighbour are collapsed first by pointer jumping, so the number of waves
   is the number of *merges* along the longest dependency chain, not its length.  Every
   neighbour slot is resolved once to the face it reads (itself, or the root of its copy
   chain; invisible slots read a sentinel equal to nothing), so a wave is one gather and,
   for triangle meshes (<= 3 slots), a branch-free 3-way mode.

The result is bit-identical to the sequential pass (tests compare with a literal port of
the official loop on random meshes and on the golden cases).
"""
from __future__ import annotations

import numpy as np

from ..geometry.adjacency import FaceGraph


def fix_label(labels: np.ndarray, graph: FaceGraph, max_passes: int = 50) -> np.ndarray:
    """The official ``fix_label(face_ids, adjacent_faces)`` (``use_aabb=False``); returns a
    new array (the official function works in place and returns the same array)."""
    lab = np.array(labels, dtype=np.int64, copy=True)
    neg = lab < 0
    if not neg.any() or graph.table.shape[1] == 0 or max_passes <= 0:
        return lab
    passes = pass_numbers(neg, graph, max_passes)
    filled = passes > 0
    if not filled.any():
        return lab
    _fill_values(lab, neg, passes, graph)
    return lab


def pass_numbers(neg: np.ndarray, graph: FaceGraph, max_passes: int = 50) -> np.ndarray:
    """Pass in which every negative face gets its label (0: never, or not negative)."""
    f = graph.num_faces
    u, v = graph.pairs[:, 0], graph.pairs[:, 1]
    big = float(1 << int(f + 2).bit_length())  # > any count of same-pass steps
    both = neg[u] & neg[v]
    bu, bv = u[both], v[both]  # bu < bv
    src = f  # virtual source
    nu, nv_ = neg[u], neg[v]
    is_seed = np.zeros(f, dtype=bool)  # negative faces with a labelled neighbour
    is_seed[v[nv_ & ~nu]] = True
    is_seed[u[nu & ~nv_]] = True
    seeds = np.flatnonzero(is_seed)
    if seeds.size == 0:
        return np.zeros(f, dtype=np.int64)
    import scipy.sparse as sp  # here, not at import (start-up time)
    from scipy.sparse.csgraph import dijkstra
    rows = np.concatenate([bu, bv, np.full(seeds.size, src)])
    cols = np.concatenate([bv, bu, seeds])
    g = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(f + 1, f + 1))
    g.sum_duplicates()  # duplicate pairs are one edge
    # weight by direction: to a higher face = same pass (1 step), to a lower face or from
    # the source = next pass (``big`` steps)
    row_of = np.repeat(np.arange(f + 1), np.diff(g.indptr))
    g.data = np.where(row_of < g.indices, 1.0, big)
    dist = dijkstra(g, directed=True, indices=src, limit=(max_passes + 1) * big)
    dist = dist[:f]
    out = np.zeros(f, dtype=np.int64)
    ok = np.isfinite(dist) & neg
    p = np.floor(dist[ok] / big).astype(np.int64)
    p[p > max_passes] = 0
    out[ok] = p
    return out


def _fill_values(lab: np.ndarray, neg: np.ndarray, passes: np.ndarray, graph: FaceGraph
                 ) -> None:
    """Assign every face with ``passes > 0`` its value, in (pass, index) order (in place)."""
    f = graph.num_faces
    table = graph.table
    d = table.shape[1]
    todo = np.flatnonzero(passes > 0)
    key = np.full(f, np.iinfo(np.int64).max, dtype=np.int64)
    key[todo] = passes[todo] * f + todo
    nb = table[todo]                                   # [T, D]
    valid = nb >= 0
    nbc = np.where(valid, nb, 0)
    known = valid & ~neg[nbc]                          # labelled from the start
    dep = valid & neg[nbc] & (key[nbc] < key[todo][:, None])   # filled earlier
    visible = known | dep
    row_of = np.full(f, -1, dtype=np.int64)
    row_of[todo] = np.arange(todo.size)

    # --- pointer jumping over "copy" faces: a face that sees exactly one neighbour takes
    # that neighbour's value; resolve such chains to their first non-copy ancestor.
    nvis = visible.sum(axis=1)
    single = nvis == 1
    src_slot = np.argmax(visible, axis=1)
    parent = np.where(single, nbc[np.arange(todo.size), src_slot], -1)  # face id
    copy_of = np.arange(todo.size)  # row -> row whose value it copies (itself if not a copy)
    par_row = np.where(single & dep[np.arange(todo.size), src_slot],
                       row_of[np.maximum(parent, 0)], -1)
    # rows that copy a face labelled from the start get the value directly
    direct = single & known[np.arange(todo.size), src_slot]
    lab[todo[direct]] = lab[parent[direct]]
    is_copy = par_row >= 0
    jump = np.where(is_copy, par_row, np.arange(todo.size))
    while True:
        nxt = jump[jump]
        if np.array_equal(nxt, jump):
            break
        jump = nxt
    copy_of = jump  # root row (a non-copy row, or a direct row)

    # --- Kahn waves over the non-copy rows (copies are filled from their roots at the end)
    # A non-copy row depends on the roots of its dependencies.
    root_needed = ~is_copy & ~direct
    done_root = direct
    # pending counts only over non-copy dependencies, expressed through roots
    dep_rows = np.where(dep, row_of[nbc], -1)          # [T, D] rows of dependencies
    dep_root = np.where(dep_rows >= 0, copy_of[np.maximum(dep_rows, 0)], -1)
    need = root_needed[:, None] & (dep_root >= 0) & ~done_root[np.maximum(dep_root, 0)]
    pend = need.sum(axis=1)
    ready = np.flatnonzero(root_needed & (pend == 0))
    # reverse edges: root -> dependent rows (only the 'need' slots)
    r_dep, r_slot = np.nonzero(need)
    r_src = dep_root[r_dep, r_slot]
    order = np.argsort(r_src, kind="stable")
    r_dep = r_dep[order]
    starts = np.searchsorted(r_src[order], np.arange(todo.size + 1))
    # where every slot reads its value: the neighbour itself (labelled from the start), the
    # face of its root row (filled earlier; a copy row is written only at the end), or a
    # per-slot sentinel that equals nothing (invisible slot)
    width = max(d, 3)
    ext = np.empty(f + width, dtype=np.int64)
    ext[:f] = lab
    ext[f:] = _SENTINEL + np.arange(width)
    src = np.where(known, nbc, np.where(dep, todo[np.maximum(dep_root, 0)],
                                        f + np.arange(d)[None, :]))
    if d < 3:  # pad to 3 slots with sentinels: the 3-way mode below
        src = np.concatenate([src, np.broadcast_to(f + np.arange(d, 3), (src.shape[0], 3 - d))],
                             axis=1)
    while ready.size:
        vals = ext[src[ready]]
        ext[todo[ready]] = _mode3(vals) if width == 3 else mode_rows(vals, vals < _SENTINEL)
        # dependents of the rows just computed
        tgt = r_dep[_ranges(starts[ready], starts[ready + 1])]
        if tgt.size == 0:
            break
        cand, cnt = np.unique(tgt, return_counts=True)
        pend[cand] -= cnt
        ready = cand[pend[cand] == 0]
    lab[:] = ext[:f]
    # copies take their root's value
    cp = is_copy
    lab[todo[cp]] = lab[todo[copy_of[cp]]]


#: Values of invisible neighbour slots (distinct per slot, above every label).
_SENTINEL = np.int64(1) << np.int64(62)


def _mode3(vals: np.ndarray) -> np.ndarray:
    """Row-wise mode of 3 values, ties to the smallest (sentinels never repeat)."""
    a, b, c = vals[:, 0], vals[:, 1], vals[:, 2]
    return np.where((a == b) | (a == c), a, np.where(b == c, b, np.minimum(np.minimum(a, b), c)))


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[k], hi[k])`` over k (vectorised)."""
    cnt = hi - lo
    total = int(cnt.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.repeat(lo - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt)
    return offs + np.arange(total)


def mode_rows(vals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise mode of ``vals`` over ``mask`` (ties: smallest value); rows need one entry."""
    big = np.iinfo(np.int64).max
    v = np.where(mask, vals, big)
    eq = (v[:, :, None] == v[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    count = eq.sum(axis=2)
    count = np.where(mask, count, -1)
    best = count.max(axis=1, keepdims=True)
    cand = np.where(count == best, v, big)
    return cand.min(axis=1)


def fix_label_reference(labels, table: np.ndarray, max_passes: int = 50) -> np.ndarray:
    """A literal port of the official loop (slow; for tests only)."""
    lab = np.array(labels, dtype=np.int64, copy=True)
    todo = [int(i) for i in np.flatnonzero(lab < 0)]
    rows = table.shape[0]
    changed, n = True, 1
    while changed and n <= max_passes:
        changed = False
        keep = []
        for i in todo:
            if not (0 <= i < rows):
                continue
            got = [int(lab[j]) for j in table[i] if j != -1 and lab[j] >= 0]
            if not got:
                keep.append(i)
                continue
            lab[i] = int(np.argmax(np.bincount(got)))
            changed = True
        todo = keep
        n += 1
    return lab
