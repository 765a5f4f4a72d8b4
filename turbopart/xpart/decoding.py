"""Volume decoding of X-Part part latents: the official coarse-to-fine hierarchy, batched.

Reproduces ``extract_geometry_fast`` as ``latent2mesh_2`` calls it (spec xpart §3.5), for
many parts at once and on the device:

1. **Ladder**: halve ``octree_resolution`` while it is ≥ 95, then reverse: ``[128, 256, 512]``
   for 512.  (Official quirk kept: the minimum is 95, not Hunyuan3D-2's 63.)  The official
   code asserts ``octree_resolution >= 256``; we do not: below 190 the ladder has a single
   level and the grid is decoded densely (``[64]`` for 64, ``[128]`` for 128), the same rule
   the official function applies once the assert is removed.
2. **Coarse level**: ``numpy.linspace(-1.01, 1.01, R0 + 1)`` in float32, ``'ij'`` grid,
   coordinates rounded to **float16** before the network (official quirk), logits stored as
   float16.  Every part evaluates the same points, so the coarse level runs all parts of a
   group in one batched call per chunk.
3. **Finer levels** R (cell 2.02 / R): near-surface mark on the previous fp16 grid G (sign of
   ``fp16(G + level)`` differs from a valid 6-neighbour, replicate border, values ≤ −9000
   invalid; OR ``|G| < min(0.95, 0.95·512/R)``), one 3×3×3 dilation of the mark only when
   R ≤ 510, fine vertex ``2·i`` set and one 3×3×3 dilation, queries at
   ``index · (2.02/R) − 1.01`` in **float64**, new grid filled with −10000 (intermediate) or
   NaN (last level) and written as float16.
4. The last level's dilated fine index is the marching-cubes mask.

One saving over the official code, same grids and masks: a level of twice the previous fine
level's resolution does not query its all-even vertices whose twin the previous level
evaluated (same float64 coordinates, so the same value; ``reuse``, :class:`_Level`).

The official dilations are all-ones fp16 ``Conv3d`` + ``> 0``; on binary masks that is a
3×3×3 box dilation, which we compute separably with boolean slices (identical sets).  The
fine index "set 2·i then dilate" is computed directly as a separable up-sampling (an even
fine index sees coarse ``a/2``, an odd one sees ``(a±1)/2``), again the identical set.

Keys/values of the latents are computed once per part by the caller's ``query_fn``; query
chunks are sized from free memory; per level and part there is one host synchronisation
(the per-plane counts that size every chunk), none inside the chunk loop.

:func:`iter_volumes` runs the coarse level for all parts at once (one shared query set, so
the decoder's query projection runs once for every part) and then the finer levels group
after group (a part alone by default; parts of a group query the union of their fine
vertices as one shared set where that pays), yielding each part's grid and mask before the
next group starts: only one group's 513³ buffers are alive at a time, and a consumer can
mesh each part as it arrives.
:func:`decode_volumes` collects the same results into ``[B, …]`` tensors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..runtime.switches import switch

#: Official constants of ``latent2mesh_2`` / ``extract_geometry_fast`` (spec §3.5).
BOUNDS = 1.01
MC_LEVEL = -1.0 / 512.0
MIN_RESOLUTION = 95
BAND = 0.95
INVALID = -10000.0
INVALID_TEST = -9000.0
DILATE_MAX_RESOLUTION = 510

#: ``query_fn(points [P, Q, 3], parts: list[int]) -> logits [len(parts), Q]`` (any float
#: dtype); ``P`` is ``len(parts)`` or 1 (one query set shared by every listed part).  A
#: query function with a true ``accepts_grid`` attribute is passed a :class:`GridQuery`
#: (one set shared by the parts) instead of the points of a grid level.
QueryFn = Callable[[torch.Tensor, list], torch.Tensor]


@dataclass(frozen=True, eq=False)  # tensors inside: identity, not element-wise equality
class GridQuery:
    """Query points given as vertices of a regular grid: flat indices ``lin`` [Q] (int64,
    row-major over ``size``³) and the level's coordinate per index, ``axis`` [size], the
    same on the three axes.  Point ``p = (axis[i], axis[j], axis[k])``; :meth:`points`
    gives exactly the coordinates the level's queries have (the decoder's fast path uses
    the grid structure instead: :mod:`turbopart.nn.kernels.grid_front`)."""

    lin: torch.Tensor
    size: int
    axis: torch.Tensor

    def __len__(self) -> int:
        return self.lin.shape[0]

    def sliced(self, start: int, stop: int) -> "GridQuery":
        return GridQuery(self.lin[start:stop], self.size, self.axis)

    def points(self) -> torch.Tensor:
        """The points [Q, 3] in the axis' dtype."""
        s = self.size
        lin = self.lin
        return torch.stack((self.axis[lin // (s * s)], self.axis[(lin // s) % s],
                            self.axis[lin % s]), dim=-1)


def _ask(query_fn: QueryFn, q: GridQuery, parts: list) -> torch.Tensor:
    """``query_fn`` on grid vertices ``q`` shared by ``parts``: as a :class:`GridQuery`
    when the function takes one, else as points [1, Q, 3]."""
    if getattr(query_fn, "accepts_grid", False):
        return query_fn(q, parts)
    return query_fn(q.points().unsqueeze(0), parts)


def reuse_from_env() -> bool:
    """``TURBOPART_DECODE_REUSE=0`` queries the vertices a level shares with the level
    before again, as the official decoder does (same grids; for A/B checks)."""
    return switch("TURBOPART_DECODE_REUSE")


def _extent(bounds: float) -> np.float64:
    """The official ``bbox_max - bbox_min`` in float64 NumPy arithmetic (2.02)."""
    return np.float64(bounds) - np.float64(-bounds)


def resolution_ladder(octree_resolution: int, min_resolution: int = MIN_RESOLUTION) -> list[int]:
    """Official ladder: halve while ≥ ``min_resolution``, reversed (``[128, 256, 512]``)."""
    r = int(octree_resolution)
    if r < 1:
        raise ValueError(f"octree resolution must be positive, got {octree_resolution}")
    out = []
    if r < min_resolution:
        out.append(r)
    while r >= min_resolution:
        out.append(r)
        r //= 2
    return out[::-1]


def coarse_axis(resolution: int, bounds: float = BOUNDS) -> np.ndarray:
    """``numpy.linspace(-b, b, R + 1)`` in float32: the official dense-grid axis."""
    return np.linspace(-bounds, bounds, int(resolution) + 1, dtype=np.float32)


def dense_axis(resolution: int, bounds: float = BOUNDS, *, fp16: bool = False,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The dense grid's axis (:func:`coarse_axis`) as float32, rounded to float16 first
    when ``fp16`` (the hierarchical decoder's coarse level)."""
    ax = torch.from_numpy(coarse_axis(resolution, bounds)).to(device)
    return ax.half().float() if fp16 else ax


def fine_axis(resolution: int, bounds: float = BOUNDS, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A finer level's axis: ``index · (2b / R) − b`` in float64 (the official int64 ×
    float64 tensor arithmetic: two float64 roundings), cast to ``dtype``."""
    step = float(_extent(bounds) / int(resolution))  # official: numpy (max - min) / R
    idx = torch.arange(int(resolution) + 1, dtype=torch.float64, device=device)
    ax = idx * step + float(-bounds)  # Python floats are double scalars, as officially
    return ax if dtype == torch.float64 else ax.to(dtype)


def dense_grid_points(resolution: int, bounds: float = BOUNDS, *, fp16: bool = False,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """All (R+1)³ grid points, ``'ij'`` indexing, flattened row-major, float32.

    ``fp16=True`` rounds them to float16 first (the hierarchical decoder's coarse level);
    ``False`` keeps float32 (``VanillaVolumeDecoder`` / ``generate_dense_grid_points``).
    """
    ax = dense_axis(resolution, bounds, fp16=fp16, device=device)
    n = ax.numel()
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1)
    return g.reshape(n * n * n, 3)


# --------------------------------------------------------------------------- masks

def near_surface_mark(grid: torch.Tensor, resolution: int, level: float = MC_LEVEL
                      ) -> torch.Tensor:
    """Official near-surface mark on fp16 grids ``[B, D, D, D]`` for the next level R.

    Vertex p is marked if it is valid and a valid 6-neighbour has a different sign of
    ``fp16(G + level)`` (signs compared in fp32; replicate padding and invalid neighbours
    (≤ −9000) compare as p itself, so they never mark), or if ``|G| < min(0.95, 0.95·512/R)``
    (on G itself, without the level).
    """
    # fp16 + python scalar: fp32 arithmetic, fp16 result (what the official op computes).
    val = (grid.float() + level).to(torch.float16)
    valid = val > INVALID_TEST
    sign = torch.sign(val.float())
    mark = torch.zeros_like(valid)
    for dim in (1, 2, 3):
        n = grid.shape[dim]
        a_s, b_s = sign.narrow(dim, 0, n - 1), sign.narrow(dim, 1, n - 1)
        a_v, b_v = valid.narrow(dim, 0, n - 1), valid.narrow(dim, 1, n - 1)
        edge = a_v & b_v & (a_s != b_s)  # symmetric: both ends see a differing neighbour
        mark.narrow(dim, 0, n - 1).logical_or_(edge)
        mark.narrow(dim, 1, n - 1).logical_or_(edge)
        del edge
    band = min(BAND, BAND * 128 * 4 / resolution)
    mark |= grid.float().abs() < band
    return mark


def dilate3(mask: torch.Tensor) -> torch.Tensor:
    """3×3×3 box dilation (zero padding) of boolean ``[B, D, D, D]``, done separably."""
    out = mask
    for dim in (1, 2, 3):
        n = out.shape[dim]
        nxt = out.clone()
        nxt.narrow(dim, 1, n - 1).logical_or_(out.narrow(dim, 0, n - 1))
        nxt.narrow(dim, 0, n - 1).logical_or_(out.narrow(dim, 1, n - 1))
        out = nxt
    return out


def _upsample_axis(m: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    coarse = m.shape[dim]
    shape = list(m.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=torch.bool, device=m.device)
    mm = m.movedim(dim, 0)
    oo = out.movedim(dim, 0)
    ne = min(coarse, (size + 1) // 2)          # even fine indices 2i < size
    oo[0:2 * ne:2] = mm[:ne]
    no = size // 2                              # odd fine indices 2i+1 < size
    nl = min(no, coarse)                        # left coarse neighbour i
    oo[1:2 * nl:2] |= mm[:nl]
    nr = min(no, coarse - 1)                    # right coarse neighbour i+1
    if nr > 0:
        oo[1:2 * nr:2] |= mm[1:1 + nr]
    return out


def fine_index(mark: torch.Tensor, fine_size: int) -> torch.Tensor:
    """Fine vertices to evaluate: set ``2·i`` for every marked coarse i, then one 3×3×3
    dilation; returned as boolean ``[B, F, F, F]`` (``F = fine_size``)."""
    out = mark
    for dim in (1, 2, 3):
        out = _upsample_axis(out, dim, fine_size)
    return out


# --------------------------------------------------------------------------- decoding

@dataclass
class DecodedVolumes:
    """Hierarchical decoding result for a group of parts.

    ``grid``: ``[B, R+1, R+1, R+1]`` float16 logits (NaN where not evaluated at the last level
    of a multi-level ladder); ``mask``: boolean ``[B, R+1, R+1, R+1]`` marching-cubes mask (the
    final dilated fine index) or ``None`` for a single (dense) level; ``queries[level][b]``:
    geometry-decoder queries per level per part; ``reused[level][b]``: vertices whose value
    came from the previous level (:class:`_Level`); ``ladder``: the resolutions.
    """

    resolution: int
    ladder: list[int]
    grid: torch.Tensor
    mask: torch.Tensor | None
    queries: list[list[int]] = field(default_factory=list)
    parts: list[int] = field(default_factory=list)
    reused: list[list[int]] = field(default_factory=list)

    @property
    def queries_per_part(self) -> list[int]:
        return [sum(level[b] for level in self.queries) for b in range(len(self.parts))]


def _plan_slabs(plane_counts: Sequence[int], plane_size: int, chunk: int
                ) -> list[tuple[int, int, int]]:
    """Group consecutive planes into slabs of at most ``chunk`` queries (≥ 1 plane each)."""
    slabs = []
    start, acc = 0, 0
    for p, c in enumerate(plane_counts):
        if p > start and acc + c > chunk:
            if acc:
                slabs.append((start, p, acc))
            start, acc = p, 0
        acc += c
    if acc:
        slabs.append((start, len(plane_counts), acc))
    return slabs


def _nonzero_flat(m: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` set entries of ``m`` (known size: no host sync)."""
    flat = m.reshape(-1)
    if hasattr(torch, "nonzero_static"):
        try:
            return torch.nonzero_static(flat, size=count).squeeze(1)
        except (NotImplementedError, RuntimeError):  # backend without nonzero_static
            pass
    return torch.nonzero(flat).squeeze(1)


@dataclass
class PartVolume:
    """One part's hierarchical decoding (:func:`iter_volumes`): ``grid`` [R+1]³ float16
    logits (NaN where not evaluated at the last level of a multi-level ladder), ``mask`` the
    marching-cubes mask (final dilated fine index; None for a single dense level),
    ``queries`` the decoder queries per level, ``reused`` per level the vertices whose
    value was taken from the previous level instead of being queried (``queries +
    reused`` is the official query count), ``part`` the id passed in, ``index`` its
    position in ``parts``."""

    part: int
    index: int
    resolution: int
    ladder: list[int]
    grid: torch.Tensor
    mask: torch.Tensor | None
    queries: list[int]
    reused: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


class _HostCopy:
    """A device tensor copied to pinned host memory behind the work queued before it;
    :meth:`get` waits for that work only, not for work queued afterwards."""

    def __init__(self, t: torch.Tensor):
        self._event = None
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            t = host
        self._t = t
        self._value: list | None = None

    def get(self) -> list:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = self._t.tolist()
        return self._value


class _Timer:
    """Synchronised phase times (seconds) accumulated into ``stats`` when one is given."""

    def __init__(self, stats: dict | None, device: torch.device):
        self.stats = stats
        self.device = device
        self.t = 0.0
        if stats is not None:
            self._sync()
            self.t = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str) -> None:
        if self.stats is None:
            return
        self._sync()
        now = time.perf_counter()
        self.stats[name] = self.stats.get(name, 0.0) + now - self.t
        self.t = now


def _coarse_level(query_fn: QueryFn, parts: list, r0: int, *, device, chunk: int,
                  bounds: float, on_queries) -> torch.Tensor:
    """The fp16-rounded dense (R0+1)³ grid of every part, one shared query set per call
    (query_proj / c_q computed once for all parts): ``[B, d, d, d]`` float16."""
    b = len(parts)
    d0 = r0 + 1
    n0 = d0 ** 3
    grid = GridQuery(torch.arange(n0, device=device), d0,
                     dense_axis(r0, bounds, fp16=True, device=device))
    per_call = max(1, chunk // max(b, 1))
    out = torch.empty(b, n0, dtype=torch.float16, device=device)
    for s in range(0, n0, per_call):
        q = grid.sliced(s, s + per_call)
        logits = _ask(query_fn, q, parts)  # one shared query set for all parts
        out[:, s:s + len(q)] = logits.reshape(b, -1).to(torch.float16)
        if on_queries is not None:
            on_queries(b * len(q))
    return out.view(b, d0, d0, d0)


class _Level:
    """One part's queries at one finer level: the boolean index of the fine vertices to
    evaluate and its set count per first-axis plane (host integers once known).

    ``prev``: the previous level's grid when that level was itself a fine level of half
    the resolution (``R = 2·R_prev``).  Its vertex ``i`` then has the very coordinates of
    this level's vertex ``2·i`` (``2i · (E / 2R_prev)`` and ``i · (E / R_prev)`` are the same
    float64 number: halving the step is exact), so the decoder's value there is already
    known: every all-even fine vertex whose previous vertex was evaluated is taken from
    ``prev`` instead of being queried again.  The grid and the marching-cubes mask are the
    same as when it is queried; only the decoder work shrinks (≈ 1/8 of the level).
    """

    def __init__(self, grid: torch.Tensor, r: int, last: bool, level: float, dilate: bool,
                 prev: torch.Tensor | None = None):
        from .refine_triton import refine_index  # Triton is imported on first use
        self.r, self.last = r, last
        self.fine, planes = refine_index(grid, r, level, dilate)
        self.plane_counts: list[int] | None = None
        self.reused = 0
        self._prev = self._taken = None
        reused_planes = torch.zeros_like(planes)
        if prev is not None:
            # fine[2i] is set iff the (dilated) mark of i is; a dilated mark can reach a
            # vertex the previous level did not evaluate (INVALID there): query those
            even = self.fine[::2, ::2, ::2]
            taken = even & (prev > INVALID_TEST)
            even &= ~taken                              # the query index, in place
            reused_planes[::2] = taken.sum(dim=(1, 2))
            planes = planes - reused_planes
            self._prev, self._taken = prev, taken
        # the counts go to the host behind the queued work
        self._planes = _HostCopy(torch.stack((planes, reused_planes)))

    def counts(self) -> list[int]:
        """The per-plane query counts (waits for the marks, not for work queued after
        them)."""
        if self.plane_counts is None:
            self.plane_counts, reused = self._planes.get()
            self.reused = int(sum(reused))
        return self.plane_counts

    def new_grid(self) -> torch.Tensor:
        """The level's grid before any query: NaN (last level) or INVALID, float16."""
        size = self.r + 1
        return torch.full((size, size, size), float("nan") if self.last else INVALID,
                          dtype=torch.float16, device=self.fine.device)

    def take_reused(self, new: torch.Tensor) -> None:
        """After the queries: the reused vertices' values into ``new``, and ``fine`` the
        whole index again (queried and reused: the marching-cubes mask at the last
        level)."""
        if self._taken is not None:
            even = new[::2, ::2, ::2]
            even.copy_(torch.where(self._taken, self._prev, even))
            self.fine[::2, ::2, ::2] |= self._taken
            self._prev = self._taken = None

    def run(self, query_fn: QueryFn, part, *, chunk: int, bounds: float,
            fine_dtype: torch.dtype, on_queries, axes: dict | None = None
            ) -> tuple[torch.Tensor, int]:
        """Queue the level's queries: its grid ``[R+1]³`` float16 (NaN / INVALID where not
        evaluated) and the number of queries."""
        (new,) = _query_levels(query_fn, [self], self.fine, self.counts(), [part],
                               chunk=chunk, bounds=bounds, fine_dtype=fine_dtype,
                               on_queries=on_queries, axes=axes)
        return new, sum(self.counts())


def _query_levels(query_fn: QueryFn, levels: list[_Level], index: torch.Tensor,
                  plane_counts: list[int], parts: list, *, chunk: int, bounds: float,
                  fine_dtype: torch.dtype, on_queries, axes: dict | None = None
                  ) -> list[torch.Tensor]:
    """Queue the queries of the fine vertices ``index`` (boolean ``[R+1]³``, ``plane_counts``
    set per first-axis plane: one level's own index, or the union of several parts' at one
    resolution) for the parts of ``levels`` as one shared point set, in slabs of at most
    ``chunk`` rows; each part's new grid takes only the values of its own vertices.
    ``axes``: the level axes made so far, by resolution (one tensor per level of a decode,
    so a query function keeps what it derives from an axis).
    Returns the grids (reused vertices filled in, :meth:`_Level.take_reused`)."""
    g = len(levels)
    r = levels[0].r
    size, plane = r + 1, (r + 1) ** 2
    axes = {} if axes is None else axes
    axis = axes.get(r)
    if axis is None:
        axis = axes[r] = fine_axis(r, bounds, fine_dtype, device=index.device)
    news = [lv.new_grid() for lv in levels]
    flats = [n.view(-1) for n in news]
    for a, e, n in _plan_slabs(plane_counts, plane, max(1, chunk // g)):
        lin = _nonzero_flat(index[a:e], n) + a * plane
        logits = _ask(query_fn, GridQuery(lin, size, axis), parts)
        logits = logits.reshape(g, -1).to(torch.float16)
        for lv, flat, row in zip(levels, flats, logits):
            if g > 1:  # a union: the other parts' vertices keep this part's fill
                row = torch.where(lv.fine.view(-1).index_select(0, lin), row,
                                  flat.index_select(0, lin))
            flat.index_copy_(0, lin, row)
        if on_queries is not None:
            on_queries(g * n)
    for lv, new in zip(levels, news):
        lv.take_reused(new)
    return news


#: Share of a decoder query's cost that does not depend on the part (Fourier features,
#: query_proj, ln_1, c_q): parts querying one point set compute it once.  Measured ≈ 13 %
#: (fast, H100: 8 parts × 1 M shared points at 21.56 M q/s against 19.03 M q/s apart).
SHARED_FRONT = 0.13


class _SharedLevel:
    """Several parts' :class:`_Level` at one resolution queried as one point set: the union
    of their query indices, each point's part-independent projection computed once for all
    of them (``query_fn`` with one shared point set).  Each part's grid takes only its own
    vertices (the others keep their fill), so grids, masks and counts are those of the
    parts' own runs; the union's extra rows are wasted work, which :meth:`pays` weighs."""

    def __init__(self, levels: list[_Level]):
        self.levels = levels
        union = levels[0].fine.clone()
        for lv in levels[1:]:
            union |= lv.fine
        self.union: torch.Tensor | None = union
        self._planes = _HostCopy(union.sum(dim=(1, 2)))

    def counts(self) -> list[int]:
        return self._planes.get()

    def pays(self) -> bool:
        """Whether one pass over the union costs less than each part's own pass."""
        g, union = len(self.levels), sum(self.counts())
        own = sum(sum(lv.counts()) for lv in self.levels)
        return union > 0 and union * (SHARED_FRONT + g * (1.0 - SHARED_FRONT)) < own

    def run(self, query_fn: QueryFn, parts: list, *, chunk: int, bounds: float,
            fine_dtype: torch.dtype, on_queries, axes: dict | None = None
            ) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """As :meth:`_Level.run` for every part: grids, own query counts, rows evaluated
        (the union's size) per part."""
        news = _query_levels(query_fn, self.levels, self.union, self.counts(), parts,
                             chunk=chunk, bounds=bounds, fine_dtype=fine_dtype,
                             on_queries=on_queries, axes=axes)
        self.union = None
        rows = sum(self.counts())
        return news, [sum(lv.counts()) for lv in self.levels], [rows] * len(self.levels)


def _run_group(query_fn: QueryFn, levels: list[_Level], shared: _SharedLevel | None,
               parts: list, run: dict) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """One level of a group of parts: shared when that pays, else part after part."""
    if shared is not None and shared.pays():
        return shared.run(query_fn, parts, **run)
    out = [lv.run(query_fn, p, **run) for lv, p in zip(levels, parts)]
    return [o[0] for o in out], [o[1] for o in out], [o[1] for o in out]


def share_groups(n: int, share: int, tail: int = 2) -> list[list[int]]:
    """Positions ``0 … n−1`` in groups of up to ``share`` consecutive parts for
    :func:`iter_volumes`, the last ``tail`` parts alone: parts of a group are yielded
    together, so work a consumer does per part (clean-up, export) can hide only behind
    later decoding; the single parts at the end give the last group's that cover."""
    share = max(int(share), 1)
    head = max(n - tail, 0) if share > 1 else n
    groups = [list(range(s, min(s + share, head))) for s in range(0, head, share)]
    return groups + [[i] for i in range(head, n)]


def iter_volumes(query_fn: QueryFn, parts: Sequence[int], octree_resolution: int = 512, *,
                 device: torch.device | str = "cpu", chunk: int = 400_000,
                 bounds: float = BOUNDS, level: float = MC_LEVEL,
                 fine_dtype: torch.dtype = torch.float64,
                 min_resolution: int = MIN_RESOLUTION,
                 dilate_max_resolution: int = DILATE_MAX_RESOLUTION,
                 on_queries: Callable[[int], None] | None = None,
                 stats: dict | None = None, reuse: bool = True,
                 groups: Sequence[Sequence[int]] | None = None) -> Iterator[PartVolume]:
    """Hierarchical decoding of ``parts``, one :class:`PartVolume` at a time.

    The coarse level runs for all parts together (one shared query set; ``[B, 129³]`` fp16
    is all it keeps), then each group's finer levels run and its parts are yielded before
    the next group starts its last levels, so only one group's fine grids (per part fp16
    513³ + bool mask, ~0.4 GB at 512) and the next group's first refined level are alive at
    a time: a consumer that meshes each part as it arrives needs no more.  ``groups``:
    positions into ``parts`` (default: each part alone; :func:`share_groups`); the parts of
    a group query the union of their fine vertices as one shared point set at a level when
    that costs less than their own passes (:class:`_SharedLevel`: same grids and masks).
    The host waits only for the per-plane query counts of each level: the first refined
    level's counts of all parts are read at once, and the next group's first refined level
    is queued before the host waits for a group's deeper counts, so the GPU does not idle
    across that wait.  Same query sets, grids and masks as :func:`decode_volumes`.
    ``reuse``: a level whose resolution is twice the previous fine level's takes the
    values of the vertices they share from it instead of querying them again (same grids
    and masks; see :class:`_Level`; the 512 level of the default ladder, ≈ 1/8 of its
    queries).  ``stats``: when given, synchronised seconds per phase are added to it
    ("coarse", "marks", "queries R"; the waits then synchronise too, so the overlap is
    lost while measuring).
    """
    device = torch.device(device)
    parts = list(parts)
    ladder = resolution_ladder(octree_resolution, min_resolution)
    chunk = max(int(chunk), 1)
    groups = [list(g) for g in groups] if groups is not None else \
        [[i] for i in range(len(parts))]
    if sorted(i for g in groups for i in g) != list(range(len(parts))) or \
            any(not g for g in groups):
        raise ValueError(f"groups {groups} do not partition {len(parts)} parts")
    timer = _Timer(stats, device)
    if not parts:
        return
    grids = _coarse_level(query_fn, parts, ladder[0], device=device, chunk=chunk,
                          bounds=bounds, on_queries=on_queries)
    timer("coarse")
    n0 = (ladder[0] + 1) ** 3
    if len(ladder) == 1:
        for bi, part in enumerate(parts):
            yield PartVolume(part, bi, ladder[-1], ladder, grids[bi], None, [n0], [0], [n0])
        return
    run = dict(chunk=chunk, bounds=bounds, fine_dtype=fine_dtype, on_queries=on_queries,
               axes={})  # one axis tensor per level for the whole decode

    def refine(grid, li):
        r = ladder[li]
        # the previous level's coordinates are this one's at even indices (fp16-rounded
        # coarse coordinates are not)
        prev = grid if reuse and li >= 2 and r == 2 * ladder[li - 1] else None
        return _Level(grid, r, li == len(ladder) - 1, level, r <= dilate_max_resolution,
                      prev)

    def shared(levels):
        return _SharedLevel(levels) if len(levels) > 1 else None

    def first(gi):  # the group's first refined level, queued
        g = groups[gi]
        return _run_group(query_fn, [firsts[bi] for bi in g], shared1[gi],
                          [parts[bi] for bi in g], run)
    firsts = [refine(grids[bi], 1) for bi in range(len(parts))]
    shared1 = [shared([firsts[bi] for bi in g]) for g in groups]
    del grids
    for lv in firsts:
        lv.counts()
    for sh in shared1:
        if sh is not None:
            sh.counts()
    timer("marks")
    queued = None  # the next group's first level, run ahead
    for gi, g in enumerate(groups):
        lvs = [firsts[bi] for bi in g]  # the group's levels last run
        gs, ns, rows = queued or first(gi)
        queued = None
        for bi in g:
            firsts[bi] = None
        shared1[gi] = None
        counts = [[n] for n in ns]
        rowss = [[r] for r in rows]
        reused = [[0] for _ in g]
        for li in range(2, len(ladder)):
            lvs = [refine(gs[j], li) for j in range(len(g))]
            del gs  # freed before the level's grids are allocated (unless lvs reuse them)
            sh = shared(lvs)
            if li == 2 and gi + 1 < len(groups):  # keeps the GPU busy over lvs' wait
                queued = first(gi + 1)
            gs, ns, rows = _run_group(query_fn, lvs, sh, [parts[bi] for bi in g], run)
            del sh
            for j, lv in enumerate(lvs):
                counts[j].append(ns[j])
                rowss[j].append(rows[j])
                reused[j].append(lv.reused)
        timer(f"queries {ladder[-1]}")
        for j, bi in enumerate(g):
            mask = lvs[j].fine if lvs[j].last else None
            pv = PartVolume(parts[bi], bi, ladder[-1], ladder, gs[j], mask, [n0] + counts[j],
                            [0] + reused[j], [n0] + rowss[j])
            gs[j] = lvs[j] = None  # the consumer's references are the last ones
            yield pv
            del pv, mask


def decode_volumes(query_fn: QueryFn, parts: Sequence[int], octree_resolution: int = 512, *,
                   device: torch.device | str = "cpu", chunk: int = 400_000,
                   bounds: float = BOUNDS, level: float = MC_LEVEL,
                   fine_dtype: torch.dtype = torch.float64,
                   min_resolution: int = MIN_RESOLUTION,
                   dilate_max_resolution: int = DILATE_MAX_RESOLUTION,
                   on_queries: Callable[[int], None] | None = None,
                   stats: dict | None = None, reuse: bool = True) -> DecodedVolumes:
    """Decode the logit volumes of ``parts`` (indices passed through to ``query_fn``).

    ``chunk``: maximum queries per ``query_fn`` call (size it from free memory);
    ``fine_dtype``: float64 reproduces the official fine-level coordinates (``exact``);
    ``min_resolution`` / ``dilate_max_resolution``: the official 95 / 510 (parameters only so
    tests can run the whole hierarchy on small grids);
    ``on_queries(n)``: progress callback after every call; ``reuse``: see
    :func:`iter_volumes`.
    All parts' dense grids and masks are returned together; :func:`iter_volumes` yields
    them one part at a time instead (far less memory at 512).
    """
    device = torch.device(device)
    parts = list(parts)
    b = len(parts)
    ladder = resolution_ladder(octree_resolution, min_resolution)
    d = ladder[-1] + 1
    grid = mask = None
    counts: list[list[int]] = [[0] * b for _ in ladder]
    reused: list[list[int]] = [[0] * b for _ in ladder]
    for pv in iter_volumes(query_fn, parts, octree_resolution, device=device, chunk=chunk,
                           bounds=bounds, level=level, fine_dtype=fine_dtype,
                           min_resolution=min_resolution,
                           dilate_max_resolution=dilate_max_resolution,
                           on_queries=on_queries, stats=stats, reuse=reuse):
        if grid is None:
            grid = torch.empty((b, d, d, d), dtype=torch.float16, device=device)
            if pv.mask is not None:
                mask = torch.empty((b, d, d, d), dtype=torch.bool, device=device)
        grid[pv.index] = pv.grid
        if mask is not None:
            mask[pv.index] = pv.mask
        for li, (n, r) in enumerate(zip(pv.queries, pv.reused)):
            counts[li][pv.index] = n
            reused[li][pv.index] = r
        del pv
    if grid is None:
        grid = torch.empty((0, d, d, d), dtype=torch.float16, device=device)
    return DecodedVolumes(ladder[-1], ladder, grid, mask, counts, parts, reused)


def decode_dense(query_fn: QueryFn, parts: Sequence[int], resolution: int, *,
                 device: torch.device | str = "cpu", chunk: int = 400_000,
                 bounds: float = BOUNDS) -> torch.Tensor:
    """``VanillaVolumeDecoder`` semantics: the dense (R+1)³ grid over [−b, b]³, ``'ij'``
    indexing, float32 coordinates (no fp16 rounding); logits ``[B, R+1, R+1, R+1]`` in the
    dtype ``query_fn`` returns."""
    device = torch.device(device)
    parts = list(parts)
    b = len(parts)
    pts = dense_grid_points(resolution, bounds, fp16=False, device=device)
    per_call = max(1, chunk // max(b, 1))
    outs = []
    for s in range(0, pts.shape[0], per_call):
        q = pts[s:s + per_call]
        outs.append(query_fn(q.unsqueeze(0), parts).reshape(b, -1))
    d = resolution + 1
    return torch.cat(outs, dim=1).view(b, d, d, d)


# --------------------------------------------------------------------------- memory

def bytes_per_part(octree_resolution: int) -> int:
    """Device bytes one part's hierarchical decoding holds at its peak (grids + masks)."""
    d = int(octree_resolution) + 1
    # last-level fp16 grid + final mask + up-sampling temporaries (bool) + previous level
    return int(d ** 3 * (2 + 1 + 2) + (d // 2 + 1) ** 3 * 8)
