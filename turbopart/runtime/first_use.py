"""Pay a process's once-only first-use costs in the background while the models load.

The first model call of a fresh process is seconds slower than the next one
(``benchmarks/first_call_profile.py``: 1.9 s against 0.5 s for a segmentation with the page
cache warm).  Part of that does not depend on the models and can run while the weights
stream in, when the CPU and the GPU are mostly idle:

* Triton's once-per-process key: a hash of its own sources and libraries (0.36 s), and the
  import of its compiler modules;
* the first Triton launch of the process and the segmentation's prompt FPS kernel
  (:func:`prompt_kernels`);
* the first use of cuBLAS and of the attention kernels (library and kernel loading), with
  tiny products and one tiny attention in each 16-bit dtype, on a stream of its own;
* after :func:`start`'s ``hold`` (``run``: once the segmentation is done), the geometry
  decoder's Triton kernels that a first call reaches only half-way through
  its first full-resolution decode: the query-point Fourier kernel for fp16 / fp32 / fp64
  points (the official decoder's 8 frequencies and 56-wide operand; a compile there cost
  ≈1 s on a machine's first run), the grid front of the fast path and the refinement
  kernels of the octree-512 ladder, run
  once so that their launchers are built too (≈0.5 s on a fresh machine otherwise);
* the PyTorch kernels of the level bookkeeping, marching cubes and the clean-up, loaded by
  their first launch (:func:`geometry_kernels`: one tiny analytic sphere through the
  octree-512 ladder; the first part of a fresh process meshed and cleaned in 0.27 + 0.23 s
  for 8 parts against 0.06–0.12 + 0.15–0.18 s warm).

:func:`start` launches a daemon thread and returns at once; everything it does is a warm-up
whose failure changes nothing (errors are swallowed).  ``TURBOPART_FIRST_USE=0`` switches
it off.
"""
from __future__ import annotations

import threading

import torch

from .switches import switch


def enabled() -> bool:
    return switch("TURBOPART_FIRST_USE")


def _triton() -> None:
    try:
        from triton.runtime.cache import triton_key
        triton_key()  # cached for the process: the first kernel launch skips it
        import triton.compiler  # noqa: F401 - the modules the first launch imports
    except Exception:  # noqa: BLE001 - any Triton layout: nothing to warm
        pass


def _cuda(device: torch.device) -> None:
    stream = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad():
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            a = torch.randn(256, 256, device=device, dtype=dt)
            torch.nn.functional.linear(a, a, a[0])
            a @ a
            if dt is not torch.float32:
                q = torch.randn(1, 2, 128, 64, device=device, dtype=dt)
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
    stream.synchronize()


def prompt_kernels(device: torch.device, points: int = 100_000) -> None:
    """The segmentation's prompt FPS (a Triton kernel) on ``points`` random points, a few
    picks, on a side stream: the first Triton launch of a process pays the runtime's own
    set-up (≈ 0.2 s in ``run``'s prompt stage otherwise) and the kernel's load."""
    from ..geometry.fps import farthest_point_sampling
    stream = torch.cuda.Stream(device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad():
        pts = torch.rand(points, 3, device=device, generator=g)
        farthest_point_sampling(pts, 16, 0, ties="last")
    stream.synchronize()


def grid_front_kernels(device: torch.device, frequencies: torch.Tensor,
                       width: int = 1024) -> None:
    """The fast decoder's separable grid front (:mod:`~turbopart.nn.kernels.grid_front`):
    its tables' float64 products and its kernel at the official width, on a 2-vertex axis."""
    from ..nn.kernels.grid_front import grid_front, grid_tables
    bf = torch.bfloat16
    qw = torch.zeros(width, 56, device=device, dtype=bf)
    cw = torch.zeros(width, width, device=device, dtype=bf)
    ones = torch.ones(width, device=device)
    axis = torch.zeros(2, device=device)
    t = grid_tables(axis, frequencies, True, bf, qw, qw[:, 0], ones, ones, cw, cw[0], 1e-6)
    grid_front(torch.zeros(1, dtype=torch.long, device=device), t, bf)


def decoder_kernels(device: torch.device) -> None:
    """Compile and run once, on a side stream, the geometry decoder's Triton kernels that a
    short call does not reach: the Fourier operand for fp16 / fp32 / fp64 points and the
    refinement kernels of the octree-512 ladder (run, not only compiled: a kernel's first
    launch also builds its launcher)."""
    from ..nn.fourier import fourier_frequencies
    from ..nn.kernels import decoder_triton as kern
    from ..xpart import refine_triton
    if not kern.available(torch.empty(0, device=device)):
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream), torch.no_grad():
        fr = fourier_frequencies(8, False, device=device)
        for dt in (torch.float16, torch.float32, torch.float64):  # coarse, fast, exact
            pts = torch.zeros(64, 3, device=device, dtype=dt)
            kern.fourier_rows(pts, fr, True, torch.bfloat16, torch.bfloat16, 56)
        grid_front_kernels(device, fr)
        refine_triton.warm_up(device)
    stream.synchronize()


def geometry_kernels(device: torch.device, octree_resolution: int = 512) -> None:
    """Decode (an analytic sphere of radius 0.1 as the field, steep enough that only a thin
    band refines), mesh and clean up one part at ``octree_resolution`` on a side stream, as
    the pipeline's fast path does, so its kernels are loaded before the first real part."""
    from ..geometry import cleanup
    from ..geometry.marching_cubes import grid_to_world, marching_cubes
    from ..xpart import decoding

    def sphere(points: torch.Tensor, parts: list) -> torch.Tensor:
        logits = 100.0 * (0.1 - points.float().norm(dim=-1))
        return logits.expand(len(parts), -1).to(torch.bfloat16)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(stream), torch.no_grad():
        for vol in decoding.iter_volumes(sphere, [0], octree_resolution, device=device,
                                         fine_dtype=torch.float32):
            v, f = marching_cubes(vol.grid, decoding.MC_LEVEL, mask=vol.mask)
            v = grid_to_world(v, vol.resolution, decoding.BOUNDS)
            v, f = cleanup.official_cleanup(v, f, reverse=True)
            cleanup.surface_area(v, f)
    if stream is not None:
        stream.synchronize()


def hold_enabled() -> bool:
    """``TURBOPART_FIRST_USE_HOLD=0`` ignores :func:`start`'s ``hold`` (A/B)."""
    return switch("TURBOPART_FIRST_USE_HOLD")


def _steps(device: torch.device, steps) -> None:
    for step in steps:
        try:
            step(device)
        except Exception:  # noqa: BLE001 - a warm-up never fails the command
            pass


def _work(device: torch.device, hold: threading.Event | None = None) -> None:
    """Every warm-up in turn (CUDA only: :func:`start` runs nothing else); a failing one
    is skipped.  The decoder and geometry warm-ups wait for ``hold`` first."""
    _steps(device, (_cuda, lambda _: _triton(), prompt_kernels))
    if hold is not None and hold_enabled():
        hold.wait()
    _steps(device, (decoder_kernels, geometry_kernels))


def start(device: torch.device | str, *, hold: threading.Event | None = None
          ) -> threading.Thread | None:
    """Start the warm-up for ``device`` (CUDA only; None when off or on the CPU).

    ``hold``: the geometry decoder's and meshing warm-ups, needed only at the first
    decode, wait until it is set, so that they do not compete with a model call that
    comes first (``run``'s segmentation, 1.4 s alone and 2.9–4.0 s beside every warm-up,
    the X-Part load and the object sampling); the caller must set it."""
    device = torch.device(device)
    if not enabled() or device.type != "cuda":
        return None
    t = threading.Thread(target=_work, args=(device, hold), name="turbopart-first-use",
                         daemon=True)
    t.start()
    return t
