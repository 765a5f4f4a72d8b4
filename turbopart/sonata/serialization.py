"""Space-filling-curve serialization of voxel grids (spec p3sam §2.6-2.7), on the device.

Four curves, as the official PTv3 encoder defines them:

* ``z``: Morton code, bit i of x/y/z at code bits 3i+2 / 3i+1 / 3i.
* ``z-trans``: the same with x and y swapped.
* ``hilbert``: Skilling's transpose algorithm over ``depth`` bits (invert/swap the lower bits
  of axis 0 per bit and axis, MSB first), bits interleaved level by level (x first), then a
  Gray decode (prefix XOR from the most significant bit).
* ``hilbert-trans``: hilbert with x and y swapped.

The batch index goes above bit 3·depth.

Speed: nothing here loops over bits per element.  The Morton code is a fixed bit-spread
(5 shift/mask steps).  The Hilbert code is a finite-state machine over the Morton code: the
lower-bit transform accumulated by Skilling's per-bit operations is always a signed axis
permutation, so it has a small number of states (48 reachable), and a table indexed by
(state, three levels of Morton bits) gives three levels of output bits and the next state at
once.  A depth-9 code is three table look-ups.  The Gray decode is a 6-step shift/xor
prefix.  All tables live on the device (built once per device).
"""
from __future__ import annotations

import functools

import torch

from .config import ORDERS

#: Levels of the Hilbert state machine consumed per table look-up.
LEVELS_PER_LOOKUP = 3
MAX_DEPTH = 16


# --------------------------------------------------------------------------- Morton

_SPREAD = ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
           (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249))


def spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Put bit i of ``v`` (int64, < 2^21) at bit 3i."""
    v = v & 0x1FFFFF
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def morton_code(grid_coord: torch.Tensor, trans: bool = False) -> torch.Tensor:
    """Official ``z`` (or ``z-trans``) code of int64 coords [n, 3]: x→3i+2, y→3i+1, z→3i."""
    s = spread_bits(grid_coord.long())
    a, b = (1, 0) if trans else (0, 1)
    return (s[:, a] << 2) | (s[:, b] << 1) | s[:, 2]


# --------------------------------------------------------------------------- Hilbert tables

def _apply(perm: tuple[int, ...], v: int) -> int:
    return perm[v]


def _level_ops(cur: int) -> tuple[int, ...]:
    """Skilling's operations decided at one level, as a map on 3-bit lower-level values.

    ``cur`` packs the (already transformed) bits of this level as x<<2 | y<<1 | z.  For each
    axis d = 0, 1, 2 in order: if its bit is set, invert the lower bits of axis 0; otherwise
    exchange the lower bits of axis 0 and axis d.
    """
    def op(v: int, d: int, bit: int) -> int:
        if bit:
            return v ^ 0b100
        if d == 0:
            return v
        p = 2 - d  # bit position of axis d in the packed triple (axis 0 at position 2)
        a, b = (v >> 2) & 1, (v >> p) & 1
        if a != b:
            v ^= (1 << 2) | (1 << p)
        return v

    out = []
    for v in range(8):
        w = v
        for d in range(3):
            w = op(w, d, (cur >> (2 - d)) & 1)
        out.append(w)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _state_machine() -> tuple[list[tuple[int, ...]], list[list[tuple[int, int]]]]:
    """States (maps on 3-bit values) and one-level transitions: [state][v] -> (out, next)."""
    ident = tuple(range(8))
    states = [ident]
    index = {ident: 0}
    trans: list[list[tuple[int, int]]] = []
    i = 0
    while i < len(states):
        t = states[i]
        row = []
        for v in range(8):
            cur = t[v]
            ops = _level_ops(cur)
            nxt = tuple(ops[t[u]] for u in range(8))
            if nxt not in index:
                index[nxt] = len(states)
                states.append(nxt)
            row.append((cur, index[nxt]))
        trans.append(row)
        i += 1
    return states, trans


@functools.lru_cache(maxsize=None)
def _hilbert_table_cpu(levels: int) -> torch.Tensor:
    """Table [n_states · 8^levels]: out bits | next_state << 16 for ``levels`` levels."""
    states, trans = _state_machine()
    width = 8 ** levels
    table = []
    for s in range(len(states)):
        for chunk in range(width):
            st, out = s, 0
            for lv in range(levels - 1, -1, -1):
                o, st = trans[st][(chunk >> (3 * lv)) & 7]
                out = (out << 3) | o
            table.append(out | (st << 16))
    return torch.tensor(table, dtype=torch.int64)


_DEVICE_TABLES: dict[tuple[str, int], torch.Tensor] = {}


def _hilbert_table(levels: int, device: torch.device) -> torch.Tensor:
    key = (str(device), levels)
    t = _DEVICE_TABLES.get(key)
    if t is None:
        t = _hilbert_table_cpu(levels).to(device)
        _DEVICE_TABLES[key] = t
    return t


def gray_decode(code: torch.Tensor) -> torch.Tensor:
    """Prefix XOR from the most significant bit (non-negative int64 codes below 2^63)."""
    for s in (1, 2, 4, 8, 16, 32):
        code = code ^ (code >> s)
    return code


def hilbert_from_morton(morton: torch.Tensor, depth: int) -> torch.Tensor:
    """Official ``hilbert`` code from the Morton code (same x/y/z bit packing) of depth bits."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"serialization depth must be in 1..{MAX_DEPTH}, got {depth}")
    dev = morton.device
    state = torch.zeros_like(morton)
    acc = torch.zeros_like(morton)
    first = depth % LEVELS_PER_LOOKUP or LEVELS_PER_LOOKUP
    lv_left = depth
    levels = first
    while lv_left > 0:
        lv_left -= levels
        width_bits = 3 * levels
        table = _hilbert_table(levels, dev)
        chunk = (morton >> (3 * lv_left)) & ((1 << width_bits) - 1)
        entry = table[(state << width_bits) | chunk]
        acc = (acc << width_bits) | (entry & 0xFFFF)
        state = entry >> 16
        levels = LEVELS_PER_LOOKUP
    return gray_decode(acc)


def hilbert_code(grid_coord: torch.Tensor, depth: int, trans: bool = False) -> torch.Tensor:
    """Official ``hilbert`` (or ``hilbert-trans``) code of int64 coords [n, 3]."""
    return hilbert_from_morton(morton_code(grid_coord, trans), depth)


# --------------------------------------------------------------------------- public API

def depth_for(max_coord: int) -> int:
    """Official depth: bit length of (max grid coordinate + 1)."""
    return int(max_coord + 1).bit_length()


def encode(grid_coord: torch.Tensor, depth: int, order: str = "z",
           batch: torch.Tensor | None = None) -> torch.Tensor:
    """Code of one curve (official ``serialization.encode``), batch above bit 3·depth."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"serialization depth must be in 1..{MAX_DEPTH}, got {depth}")
    trans = order.endswith("-trans")
    m = morton_code(grid_coord, trans)
    code = m if order.startswith("z") else hilbert_from_morton(m, depth)
    if batch is not None:
        code = code | (batch.long() << (3 * depth))
    return code


def encode_orders(grid_coord: torch.Tensor, depth: int, orders: tuple[str, ...] | list[str],
                  batch: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [len(orders), n] of several curves, sharing the Morton spread and Hilbert pass."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"serialization depth must be in 1..{MAX_DEPTH}, got {depth}")
    n = grid_coord.shape[0]
    mort = {}
    for trans in (False, True):
        if any(o.endswith("-trans") == trans for o in orders):
            mort[trans] = morton_code(grid_coord, trans)
    need_h = [t for t in (False, True) if any(o == ("hilbert-trans" if t else "hilbert")
                                               for o in orders)]
    hil = {}
    if need_h:
        h = hilbert_from_morton(torch.cat([mort[t] for t in need_h]), depth)
        for i, t in enumerate(need_h):
            hil[t] = h[i * n:(i + 1) * n]
    rows = []
    for o in orders:
        t = o.endswith("-trans")
        rows.append(mort[t] if o.startswith("z") else hil[t])
    code = torch.stack(rows)
    if batch is not None:
        code = code | (batch.long() << (3 * depth))[None]
    return code


def serialize(grid_coord: torch.Tensor, depth: int, orders, perm=None,
              batch: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code, order, inverse), each [k, n], rows permuted by ``perm`` (official shuffle).

    ``order[j] = argsort(code[j])`` (codes are unique within a stage, so the sort is
    deterministic) and ``inverse[j]`` is its inverse permutation.
    """
    orders = list(orders)
    if perm is not None:
        orders = [orders[int(i)] for i in perm]
    code = encode_orders(grid_coord, depth, tuple(orders), batch)
    order = torch.argsort(code, dim=1)
    inverse = torch.empty_like(order)
    ar = torch.arange(code.shape[1], device=code.device).expand_as(order)
    inverse.scatter_(1, order, ar)
    return code, order, inverse
