"""Submanifold 3×3×3 sparse convolution in plain PyTorch (spconv ``SubMConv3d`` semantics).

Official layer: spconv 2.x ``SubMConv3d(C, C, 3, bias=True, indice_key="stage{s}")`` (spec
p3sam §1.5).  Weight layout "KRSC": [C_out, 3, 3, 3, C_in].  For an output site p and kernel
index (i, j, k) the input site is p + (i-1, j-1, k-1) (same batch), missing sites give
zero; the flattened kernel index is r = 9i + 3j + k.  Outputs exist exactly at the input
sites.  This is a cross-correlation with padding 1, like a dense ``Conv3d`` with weight
``W.permute(0, 4, 1, 2, 3)`` over spatial dims (x, y, z).

Formulation (GPU-first, bounded memory):

* :func:`build_neighbour_table` packs (batch, x+1, y+1, z+1) into one int64 key, sorts the
  keys once and finds all 27 neighbours of every site with one ``searchsorted``; an absent
  neighbour points at row M (a zero row appended to the features).  Built once per stage and
  shared by all blocks of the stage (the role of spconv's ``indice_key``).
* :func:`submanifold_conv`: gather [rows, 27·C_in] (one ``index_select``) and one GEMM with
  W viewed as [C_out, 27·C_in], chunked over rows within a memory budget
  (``runtime.memory``).  Stage 0 has only ~3 of 27 neighbours present, but the dense
  formulation is still a handful of large, tensor-core-friendly kernels per layer: the GPU
  path.
* On the CPU, where FLOPs rather than launches are the cost, :func:`neighbour_pairs` lists the
  present (output, input) pairs of every off-centre offset once per stage and the
  convolution does the centre GEMM plus one small GEMM + indexed add per offset
  (same result, 2-9x fewer multiply-adds at these occupancies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import memory
from ..runtime.precision import register_matmul_module

_BITS = 17  # per packed axis: coordinates + 1 + offset stay in [0, 2^17) for depth <= 16
_AXIS_MASK = (1 << _BITS) - 1


def kernel_offsets(device: torch.device | str | None = None) -> torch.Tensor:
    """[27, 3] offsets (i-1, j-1, k-1) in the order of the flattened kernel index r = 9i+3j+k."""
    r = torch.arange(27, device=device)
    return torch.stack([r // 9, (r // 3) % 3, r % 3], dim=1) - 1


def pack_coords(grid_coord: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
    """One int64 key per site: batch | x+1 | y+1 | z+1 (17 bits per axis)."""
    g = grid_coord.long() + 1
    key = (g[:, 0] << (2 * _BITS)) | (g[:, 1] << _BITS) | g[:, 2]
    if batch is not None:
        key = key | (batch.long() << (3 * _BITS))
    return key


def build_neighbour_table(grid_coord: torch.Tensor, batch: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """[M, 27] int64: row of the input site p + offset_r for every site p, M where absent.

    Coordinates must be non-negative and below 2^16 (the serialization limit).
    """
    m = grid_coord.shape[0]
    dev = grid_coord.device
    key = pack_coords(grid_coord, batch)
    skey, sidx = torch.sort(key)
    off = kernel_offsets(dev)
    # Fields never carry into each other: 0 <= coord + 1 + offset < 2^17.
    doff = (off[:, 0] << (2 * _BITS)) + (off[:, 1] << _BITS) + off[:, 2]
    q = key[:, None] + doff[None, :]
    pos = torch.searchsorted(skey, q).clamp_(max=max(m - 1, 0))
    hit = skey[pos] == q
    return torch.where(hit, sidx[pos], torch.full_like(pos, m))


def neighbour_pairs(table: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per off-centre offset r with any pair: (r, output rows, input rows) from the table."""
    m = table.shape[0]
    present = table < m
    present[:, 13] = False
    out_rows, offs = present.nonzero(as_tuple=True)
    order = torch.argsort(offs, stable=True)
    out_rows, offs = out_rows[order], offs[order]
    counts = torch.bincount(offs, minlength=27).tolist()
    in_rows = table[out_rows, offs]
    pairs, start = [], 0
    for r, c in enumerate(counts):
        if c:
            pairs.append((r, out_rows[start:start + c], in_rows[start:start + c]))
        start += c
    return pairs


def conv_rows_per_chunk(m: int, c_in: int, c_out: int, dtype: torch.dtype,
                        device: torch.device | str) -> int:
    """Rows of one gather-GEMM chunk that fit the working budget (at least 1024)."""
    elt = torch.empty((), dtype=dtype).element_size()
    per_row = (27 * c_in + c_out) * elt + 27 * 8
    return memory.items_that_fit(per_row, device, minimum=min(m, 1024), maximum=max(m, 1))


def submanifold_conv(x: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, *, rows_per_chunk: int | None = None,
                     pairs: list | None = None) -> torch.Tensor:
    """out[p] = bias + Σ_r W[:, r, :] · x[table[p, r]] (zero where absent).

    ``x``: [M, C_in]; ``table``: [M, 27] from :func:`build_neighbour_table`; ``weight``:
    [C_out, 3, 3, 3, C_in] (or already [C_out, 27·C_in]) in the dtype of ``x``.
    ``pairs`` (from :func:`neighbour_pairs`) selects the per-offset formulation (CPU).
    """
    m, c_in = x.shape
    w2 = weight.reshape(weight.shape[0], -1)
    if w2.shape[1] != 27 * c_in:
        raise ValueError(f"weight {tuple(weight.shape)} does not match {c_in} input channels")
    if pairs is not None:
        w3 = w2.view(w2.shape[0], 27, c_in)
        out = F.linear(x, w3[:, 13], bias)  # the centre tap: every site is its own neighbour
        for r, rows, src in pairs:
            # rows are distinct within one offset; index_put_(accumulate) is the fast CPU add
            out.index_put_((rows,), F.linear(x.index_select(0, src), w3[:, r]),
                           accumulate=True)
        return out
    x_pad = F.pad(x, (0, 0, 0, 1))  # row M is the zero row for absent neighbours
    if rows_per_chunk is None:
        rows_per_chunk = conv_rows_per_chunk(m, c_in, w2.shape[0], x.dtype, x.device)
    if rows_per_chunk >= m:
        g = x_pad.index_select(0, table.reshape(-1)).view(m, 27 * c_in)
        return F.linear(g, w2, bias)
    out = x.new_empty(m, w2.shape[0])
    for s in range(0, m, rows_per_chunk):
        e = min(m, s + rows_per_chunk)
        g = x_pad.index_select(0, table[s:e].reshape(-1)).view(e - s, 27 * c_in)
        if bias is None:
            torch.mm(g, w2.t(), out=out[s:e])
        else:
            torch.addmm(bias, g, w2.t(), out=out[s:e])
    return out


@register_matmul_module
class SubMConv3d(nn.Module):
    """Parameters of spconv's ``SubMConv3d``: weight [C_out, 3, 3, 3, C_in], bias [C_out]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 bias: bool = True):
        super().__init__()
        if kernel_size != 3:
            raise ValueError("only 3x3x3 submanifold convolutions are supported")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, x: torch.Tensor, table: torch.Tensor,
                rows_per_chunk: int | None = None) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return submanifold_conv(x, table, w, b, rows_per_chunk=rows_per_chunk)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=3, submanifold"
