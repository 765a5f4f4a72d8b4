"""``bf16(GELU_erf(bf16(x Wᵀ + b)))`` on Hopper in Gluon (Triton's low-level dialect): the
geometry decoder's c_fc layer with its exact GELU, at cuBLAS's GEMM speed with most of the
GELU hidden behind the tensor cores.

Same rounding points and the same erf formula as :func:`decoder_triton.linear` with the
GELU epilogue (fp32 accumulator + bias → bf16 → fp32 → ``0.5·x·(1 + erf(x/√2))`` with the
Abramowitz–Stegun erf → bf16); bit-identical to that kernel's output (the erf's reciprocal
and exp2 are the approximate instructions the Triton kernel already compiles to, written
out; a sign-bit xor instead of a select).

One CTA per SM walks the output tiles (grouped order) in two warp-specialised partitions:

* the MMA partition (two warpgroups on one 128×256 tile) issues the TMA loads, STAGES
  k-steps ahead, runs async wgmma, adds the bias, rounds to bf16 and hands the tile over in
  shared memory, then goes on with the next tile;
* the epilogue partition (4 warps) computes the GELU of the handed-over tile in [32, 64]
  pieces and TMA-stores them through a 2-deep ring of output tiles, releasing the hand-off
  buffer as soon as its last piece is in registers.

Twelve warps in all: ptxas caps every partition at 65536 / (32 · 12) = 168 registers, which
the m64n256 wgmma (154) fits; a separate TMA producer warp would make 16 warps and a cap of
128.  sm_90 only (wgmma); :func:`available` says whether this Triton has Gluon's Hopper API.
"""
from __future__ import annotations

import torch

from .decoder_triton import _sm_count

try:  # pragma: no cover - depends on the Triton build
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
except Exception:  # noqa: BLE001 - no Triton, or a Triton without Gluon's Hopper API
    gluon = None

BM, BN, BK = 128, 256, 64
STAGES = 3
GROUP_M = 4
ER = 32              # rows of an epilogue piece ([ER, 64] bf16)
OB_DEPTH = 2         # output-tile ring depth
MMA_WARPS = 8
EPI_WARPS = 4
EPI_REGS = 168


def available(x: torch.Tensor) -> bool:
    """Gluon's Hopper API imported and ``x`` on an sm_90 GPU."""
    return (gluon is not None and x.is_cuda
            and torch.cuda.get_device_capability(x.device) == (9, 0))


def fits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Shapes, dtypes and layouts the kernel takes (TMA: 16-byte aligned rows)."""
    n, k = w.shape
    return (x.dim() == 2 and x.shape[1] == k and x.dtype == torch.bfloat16
            and w.dtype == x.dtype and b is not None and b.dtype == x.dtype
            and x.is_contiguous() and w.is_contiguous() and b.is_contiguous()
            and n % BN == 0 and k % BK == 0 and x.data_ptr() % 16 == 0
            and w.data_ptr() % 16 == 0)


if gluon is not None:
    # the tile constants as the kernels see them (a jit function reads constexpr globals only)
    _BM, _BN, _BK = gl.constexpr(BM), gl.constexpr(BN), gl.constexpr(BK)
    _STAGES, _GROUP_M, _ER = gl.constexpr(STAGES), gl.constexpr(GROUP_M), gl.constexpr(ER)
    _OB_DEPTH, _EPI_WARPS = gl.constexpr(OB_DEPTH), gl.constexpr(EPI_WARPS)
    _EPI_REGS = gl.constexpr(EPI_REGS)

    @gluon.jit
    def _tile_coords(tile, num_pid_m, NUM_PID_N: gl.constexpr, G: gl.constexpr):
        in_group = G * NUM_PID_N
        first_m = (tile // in_group) * G
        size = gl.minimum(num_pid_m - first_m, G)
        return first_m + (tile % in_group) % size, (tile % in_group) // size

    @gluon.jit
    def _approx(x, op: gl.constexpr):
        return gl.inline_asm_elementwise(op + ".approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _gelu(x):
        """``decoder_triton._gelu_erf``, same bits: its division compiles to rcp.approx and
        its exp2's non-ftz fix-up only acts below 2⁻¹²⁶, where 1 − poly·e rounds to 1."""
        z = x * 0.7071067811865476
        az = gl.abs(z)
        t = _approx(1.0 + 0.3275911 * az, "rcp")
        poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
                + 0.254829592) * t
        erf = 1.0 - poly * _approx(-(az * az) * 1.4426950408889634, "ex2")
        sign = z.to(gl.int32, bitcast=True) & -2147483648       # erf(−z) = −erf(z)
        erf = (erf.to(gl.int32, bitcast=True) ^ sign).to(gl.float32, bitcast=True)
        return x * 0.5 * (1.0 + erf)

    @gluon.jit
    def _column_blocks(x, PARTS: gl.constexpr):
        """[M, N / PARTS] column blocks of a wgmma accumulator (register-only halvings)."""
        xs = (x, )
        for _ in gl.static_range(PARTS.bit_length() - 1):
            nxt = ()
            for j in gl.static_range(len(xs)):
                y = xs[j]
                nxt += y.reshape([y.shape[0], 2, y.shape[1] // 2]).permute(0, 2, 1).split()
            xs = nxt
        return xs

    @gluon.jit
    def _load_step(g, a_desc, w_desc, a_bufs, w_bufs, ready, num_pid_m, num_tiles,
                   NUM_PID_N: gl.constexpr, KT: gl.constexpr, NUM_SMS: gl.constexpr):
        """TMA loads of this CTA's k-step ``g`` (its tile g // KT, k-tile g % KT) into ring
        stage g % _STAGES; predicated off past its last tile."""
        tile = gl.program_id(0) + (g // KT) * NUM_SMS
        live = tile < num_tiles
        pid_m, pid_n = _tile_coords(tile, num_pid_m, NUM_PID_N, _GROUP_M)
        s = g % _STAGES
        bar = ready.index(s)
        mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(a_desc, [pid_m * _BM, (g % KT) * _BK], bar,
                                        a_bufs.index(s), pred=live)
        tma.async_copy_global_to_shared(w_desc, [pid_n * _BN, (g % KT) * _BK], bar,
                                        w_bufs.index(s), pred=live)

    @gluon.jit
    def _mma_partition(a_desc, w_desc, a_bufs, w_bufs, h_buf, ready, h_full, h_empty,
                       bias_ptr, M, N: gl.constexpr, K: gl.constexpr, NUM_SMS: gl.constexpr,
                       num_warps: gl.constexpr):
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, _BN, 16])
        KT: gl.constexpr = K // _BK
        NUM_PID_N: gl.constexpr = N // _BN
        num_pid_m = gl.cdiv(M, _BM)
        num_tiles = num_pid_m * NUM_PID_N
        for g in gl.static_range(_STAGES - 1):
            _load_step(g, a_desc, w_desc, a_bufs, w_bufs, ready, num_pid_m, num_tiles,
                       NUM_PID_N, KT, NUM_SMS)
        acc = gl.zeros([_BM, _BN], gl.float32, acc_layout)
        step = 0
        n_tile = 0
        for tile in range(gl.program_id(0), num_tiles, NUM_SMS):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, NUM_PID_N, _GROUP_M)
            for kt in range(KT):
                s = step % _STAGES
                mbarrier.wait(ready.index(s), (step // _STAGES) & 1)
                tok = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc,
                                    use_acc=kt > 0, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(tok, ))
                gl.thread_barrier()  # k-step step−1 retired in every warp: refill its stage
                _load_step(step + _STAGES - 1, a_desc, w_desc, a_bufs, w_bufs, ready,
                           num_pid_m, num_tiles, NUM_PID_N, KT, NUM_SMS)
                step += 1
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.wait(h_empty, (n_tile & 1) ^ 1)
            blocks = _column_blocks(acc, _BN // 64)  # bias and bf16, 64 columns at a time
            for j in gl.static_range(_BN // 64):
                c = blocks[j]
                cols = pid_n * _BN + j * 64 + gl.arange(0, 64, layout=gl.SliceLayout(0, c.type.layout))
                bias = gl.load(bias_ptr + cols).to(gl.float32)
                h_buf.index(j).store((c + bias[None, :]).to(gl.bfloat16))
            mbarrier.arrive(h_full)
            n_tile += 1

    @gluon.jit
    def _epilogue_partition(c_desc, h_buf, o_buf, h_full, h_empty, M, N: gl.constexpr,
                            NUM_SMS: gl.constexpr):
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [_EPI_WARPS, 1], [1, 0])
        NUM_PID_N: gl.constexpr = N // _BN
        PIECES: gl.constexpr = _BM // _ER
        BLOCKS: gl.constexpr = _BN // 64
        num_pid_m = gl.cdiv(M, _BM)
        num_tiles = num_pid_m * NUM_PID_N
        n_tile = 0
        for tile in range(gl.program_id(0), num_tiles, NUM_SMS):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, NUM_PID_N, _GROUP_M)
            mbarrier.wait(h_full, n_tile & 1)
            x = h_buf.index(0).slice(0, _ER, dim=0).load(blk)
            for jb in gl.static_range(BLOCKS):
                for rp in gl.static_range(PIECES):
                    if rp + 1 < PIECES:  # the next piece's shared load goes first
                        x_next = h_buf.index(jb).slice((rp + 1) * _ER, _ER, dim=0).load(blk)
                    elif jb + 1 < BLOCKS:
                        x_next = h_buf.index(jb + 1).slice(0, _ER, dim=0).load(blk)
                    else:
                        x_next = x
                        mbarrier.arrive(h_empty)  # the whole tile is in registers
                    ob = o_buf.index((jb * PIECES + rp) % _OB_DEPTH)
                    tma.store_wait(_OB_DEPTH - 1)
                    ob.store(_gelu(x.to(gl.float32)).to(gl.bfloat16))
                    fence_async_shared()
                    tma.async_copy_shared_to_global(
                        c_desc, [pid_m * _BM + rp * _ER, pid_n * _BN + jb * 64], ob)
                    x = x_next
            n_tile += 1
        tma.store_wait(0)

    @gluon.jit(do_not_specialize=["M"])
    def _linear_gelu_kernel(a_desc, w_desc, c_desc, bias_ptr, M, N: gl.constexpr,
                            K: gl.constexpr, NUM_SMS: gl.constexpr, num_warps: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [_STAGES, _BM, _BK], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [_STAGES, _BN, _BK], w_desc.layout)
        # the hand-off tile as BN/64 column blocks [BM, 64] (128B-swizzled)
        h_buf = gl.allocate_shared_memory(c_desc.dtype, [_BN // 64, _BM, 64], c_desc.layout)
        o_buf = gl.allocate_shared_memory(c_desc.dtype, [_OB_DEPTH, _ER, 64], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        h_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        h_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(_STAGES):
            mbarrier.init(ready.index(i), count=1)
        mbarrier.init(h_full, count=1)
        mbarrier.init(h_empty, count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_mma_partition, (a_desc, w_desc, a_bufs, w_bufs, h_buf, ready, h_full, h_empty,
                              bias_ptr, M, N, K, NUM_SMS, num_warps)),
            (_epilogue_partition, (c_desc, h_buf, o_buf, h_full, h_empty, M, N, NUM_SMS)),
        ], [_EPI_WARPS], [_EPI_REGS])


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bf16(GELU_erf(bf16(x Wᵀ + b)))``: x [M, K], w [N, K] (nn.Linear), b [N], all bf16
    (check :func:`available` and :func:`fits` first)."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    sms = _sm_count(x.device)
    layout = gl.NVMMASharedLayout.get_default_for
    a_d = TensorDescriptor.from_tensor(x, [BM, BK], layout([BM, BK], gl.bfloat16))
    w_d = TensorDescriptor.from_tensor(w, [BN, BK], layout([BN, BK], gl.bfloat16))
    c_d = TensorDescriptor.from_tensor(out, [ER, 64], layout([ER, 64], gl.bfloat16))
    tiles = triton.cdiv(m, BM) * (n // BN)
    _linear_gelu_kernel[(min(sms, tiles),)](a_d, w_d, c_d, b, m, N=n, K=k, NUM_SMS=sms,
                                            num_warps=MMA_WARPS)
    return out
