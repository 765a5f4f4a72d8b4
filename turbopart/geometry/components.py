"""Connected components of graphs given as edge lists (faces, voxels, regions).

Components are numbered in the order of their smallest node index (the order the official
breadth-first searches produce when they scan nodes in index order).
"""
from __future__ import annotations

import numpy as np
import torch


def connected_components(num_nodes: int, u, v) -> np.ndarray:
    """Component id per node (int64, ids ordered by smallest member index).

    ``u``/``v``: endpoints of undirected edges (NumPy arrays or tensors, any device).
    Isolated nodes form singleton components.
    """
    u = _np(u).astype(np.int64, copy=False)
    v = _np(v).astype(np.int64, copy=False)
    if num_nodes == 0:
        return np.zeros(0, dtype=np.int64)
    import scipy.sparse as sp  # here, not at import (start-up time)
    from scipy.sparse.csgraph import connected_components as _cc
    g = sp.coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(num_nodes, num_nodes))
    _, lab = _cc(g, directed=False)
    # Renumber so that component ids follow the smallest node index of each component.
    first = np.full(lab.max() + 1, num_nodes, dtype=np.int64)
    np.minimum.at(first, lab, np.arange(num_nodes))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[lab]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
