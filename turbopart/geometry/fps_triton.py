"""Farthest-point sampling as one persistent Triton kernel (CUDA only).

The plain loop in :mod:`turbopart.geometry.fps` launches a few kernels per pick: 4096 picks
over 16 clouds of 81 920 points cost ~275 ms of launch latency on an H100.  Here every cloud
is split over ``P`` programs that each own a contiguous slice of its points; per pick each
program updates the running distances of its slice (held in registers for all picks when
the slice is small enough, else re-read from L2), reduces its local (max, index),
publishes it, and all ``P`` programs of the cloud meet at a barrier (an atomic
counter) before reading the ``P`` partial results and agreeing on the next pick.  The
kernel launches once for all picks.

Deadlock-free by construction: the grid never exceeds the number of SMs, so all programs
of a cloud are resident together.  Same arithmetic and tie rules as the PyTorch loop:
squared distances ``dx*dx + dy*dy + dz*dz`` in fp32 without FMA contraction, running
minimum, ties to the first or last index.
"""
from __future__ import annotations

import torch

from ..runtime.switches import switch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _arg_at(vals, idx, best, n, LAST: tl.constexpr):
        """The index of ``best`` among ``vals`` by the tie rule: the last (largest) or the
        first (smallest, ``n`` where absent) of the indices ``idx`` holding it."""
        if LAST:
            out = tl.max(tl.where(vals == best, idx, -1), axis=0)
        else:
            out = tl.min(tl.where(vals == best, idx, n), axis=0)
        return out

    @triton.jit
    def _pick(x_ptr, y_ptr, z_ptr, out_ptr, base, b, p, i, cur, n_samples):
        """Record pick ``i`` (program 0 of the cloud) and load its coordinates."""
        if p == 0:
            tl.store(out_ptr + b.to(tl.int64) * n_samples + i, cur)
        return (tl.load(x_ptr + base + cur), tl.load(y_ptr + base + cur),
                tl.load(z_ptr + base + cur))

    @triton.jit
    def _agree(part_v_ptr, part_i_ptr, count_ptr, b, p, i, mv, mi, n, P: tl.constexpr,
               LAST: tl.constexpr):
        """Pick ``i + 1`` of cloud ``b``: every one of its ``P`` programs publishes its local
        (max, index) in a double-buffered slot, meets the others at an atomic counter and
        reduces the ``P`` results the same way."""
        cur = mi
        if P > 1:
            slot = (b * 2 + (i % 2)) * P + p
            tl.store(part_v_ptr + slot, mv)
            tl.store(part_i_ptr + slot, mi)
            target = (i + 1) * P
            c = tl.atomic_add(count_ptr + b, 1, sem="acq_rel") + 1
            while c < target:
                c = tl.atomic_add(count_ptr + b, 0, sem="acquire")
            row = (b * 2 + (i % 2)) * P + tl.arange(0, P)
            vals = tl.load(part_v_ptr + row, volatile=True)
            idxs = tl.load(part_i_ptr + row, volatile=True)
            cur = _arg_at(vals, idxs, tl.max(vals, axis=0), n, LAST)
        return cur

    @triton.jit
    def _fps_kernel(x_ptr, y_ptr, z_ptr, dist_ptr, start_ptr, out_ptr, part_v_ptr, part_i_ptr,
                    count_ptr, n, slice_len, n_samples,
                    P: tl.constexpr, BLOCK: tl.constexpr, LAST: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // P
        p = pid % P
        lo = p * slice_len
        hi = tl.minimum(lo + slice_len, n)
        base = b.to(tl.int64) * n
        cur = tl.load(start_ptr + b)
        lane = tl.arange(0, BLOCK)
        for i in range(n_samples):
            cx, cy, cz = _pick(x_ptr, y_ptr, z_ptr, out_ptr, base, b, p, i, cur, n_samples)
            best_v = tl.full([BLOCK], -float("inf"), tl.float32)
            best_i = tl.full([BLOCK], 0, tl.int64)
            for t in range(lo, hi, BLOCK):
                offs = t + lane
                m = offs < hi
                x = tl.load(x_ptr + base + offs, mask=m, other=0.0)
                y = tl.load(y_ptr + base + offs, mask=m, other=0.0)
                z = tl.load(z_ptr + base + offs, mask=m, other=0.0)
                dist = tl.load(dist_ptr + base + offs, mask=m, other=0.0)
                dx = x - cx
                dy = y - cy
                dz = z - cz
                d = dx * dx + dy * dy
                d = d + dz * dz
                dist = tl.minimum(dist, d)
                tl.store(dist_ptr + base + offs, dist, mask=m)
                dist = tl.where(m, dist, -float("inf"))
                if LAST:
                    take = dist >= best_v
                else:
                    take = dist > best_v
                best_v = tl.where(take, dist, best_v)
                best_i = tl.where(take, offs.to(tl.int64), best_i)
            mv = tl.max(best_v, axis=0)
            mi = _arg_at(best_v, best_i, mv, n, LAST)
            cur = _agree(part_v_ptr, part_i_ptr, count_ptr, b, p, i, mv, mi, n, P, LAST)

    @triton.jit
    def _fps_resident_kernel(x_ptr, y_ptr, z_ptr, start_ptr, out_ptr, part_v_ptr, part_i_ptr,
                             count_ptr, n, slice_len, n_samples, init_dist,
                             P: tl.constexpr, SLICE: tl.constexpr, LAST: tl.constexpr):
        """:func:`_fps_kernel` with each program's whole slice (≤ SLICE points) and its
        running distances held in registers for all picks: per pick only the picked
        point is read from memory, no slice re-read from L2."""
        pid = tl.program_id(0)
        b = pid // P
        p = pid % P
        lo = p * slice_len
        base = b.to(tl.int64) * n
        offs = lo + tl.arange(0, SLICE)
        m = offs < tl.minimum(lo + slice_len, n)
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0)
        y = tl.load(y_ptr + base + offs, mask=m, other=0.0)
        z = tl.load(z_ptr + base + offs, mask=m, other=0.0)
        dist = tl.where(m, tl.full([SLICE], init_dist, tl.float32), -float("inf"))
        cur = tl.load(start_ptr + b)
        for i in range(n_samples):
            cx, cy, cz = _pick(x_ptr, y_ptr, z_ptr, out_ptr, base, b, p, i, cur, n_samples)
            dx = x - cx
            dy = y - cy
            dz = z - cz
            d = dx * dx + dy * dy
            d = d + dz * dz
            dist = tl.where(m, tl.minimum(dist, d), -float("inf"))
            mv = tl.max(dist, axis=0)
            mi = _arg_at(dist, offs, mv, n, LAST).to(tl.int64)
            cur = _agree(part_v_ptr, part_i_ptr, count_ptr, b, p, i, mv, mi, n, P, LAST)


#: Largest per-program slice kept in registers (:func:`_fps_resident_kernel`, 16 warps of
#: 32 points per thread); larger slices stream from L2 (:func:`_fps_kernel`).  16 clouds of
#: 81 920 points, 4096 picks on an H100: 15.3 ms against 52.8 ms streamed (BENCHMARKS.md).
RESIDENT_SLICE = 16384


def available(points: torch.Tensor) -> bool:
    return triton is not None and points.is_cuda


def fps_triton(points: torch.Tensor, n_samples: int, start: torch.Tensor, *, ties: str,
               init_dist: float, resident: bool | None = None) -> torch.Tensor:
    """[B, n_samples] picks; ``points`` [B, N, 3] on CUDA, ``start`` [B] int64.

    ``resident``: keep every program's slice in registers where it has at most
    :data:`RESIDENT_SLICE` points (:func:`_fps_resident_kernel`; default unless
    ``TURBOPART_FPS_RESIDENT=0``), or stream it from L2 (:func:`_fps_kernel`).  Both give
    the same picks."""
    b, n, _ = points.shape
    pts = points.float()
    xyz = [pts[..., a].contiguous() for a in range(3)]
    dev = pts.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    per_cloud = max(1, min(sms // max(b, 1), n // 2048))
    p = 1 << (per_cloud.bit_length() - 1)  # a power of two (tl.arange)
    slice_len = -(-n // p)
    out = torch.empty(b, n_samples, dtype=torch.int64, device=dev)
    part_v = torch.empty(b * 2 * p, dtype=torch.float32, device=dev)
    part_i = torch.empty(b * 2 * p, dtype=torch.int64, device=dev)
    count = torch.zeros(b, dtype=torch.int32, device=dev)
    start = start.to(dev, torch.int64).contiguous()
    if resident is None:
        resident = switch("TURBOPART_FPS_RESIDENT")
    if resident and slice_len <= RESIDENT_SLICE:
        sl = max(1024, triton.next_power_of_2(slice_len))
        _fps_resident_kernel[(b * p,)](
            xyz[0], xyz[1], xyz[2], start, out, part_v, part_i, count, n, slice_len,
            n_samples, float(init_dist), P=p, SLICE=sl, LAST=(ties == "last"),
            num_warps=min(16, max(4, sl // 1024)), enable_fp_fusion=False)
        return out
    dist = torch.full((b, n), init_dist, dtype=torch.float32, device=dev)
    _fps_kernel[(b * p,)](xyz[0], xyz[1], xyz[2], dist, start, out, part_v, part_i, count, n,
                          slice_len, n_samples, P=p, BLOCK=1024, LAST=(ties == "last"),
                          num_warps=4, enable_fp_fusion=False)
    return out
