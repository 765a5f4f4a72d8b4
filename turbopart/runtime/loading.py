"""Load checkpoint components straight onto the target device, fast from a cold disk.

Each component is built on the meta device (no fp32 CPU construction pass: the official
start-up spends 17–20 s building the DiT on the CPU before the checkpoint overwrites it) and
its tensors are read by :class:`SafetensorsReader`:

* only the tensors the inference module holds, in **file order**, with large sequential
  reads (16 MiB) in a few threads — no page-fault-driven reads of a memory map;
* on CUDA through a small pool of **pinned** host buffers and asynchronous host-to-device
  copies (the disk, the page-cache copy and the PCIe transfer overlap); on the CPU through
  plain buffers;
* dtype casts on the device as soon as a tensor is complete.

Components load in parallel threads (reads and copies release the GIL), and
:func:`turbopart.weights.load_component` validates the layout while the reads run.  Together
with the read-ahead helper of :mod:`turbopart.runtime.prefetch` (started by the CLI before
the heavy imports) the disk is busy from the first millisecond of the process.

``TURBOPART_LOADER=mmap`` selects the previous reader (safetensors memory-mapped,
``get_tensor`` per key; the default for CPU loads, where its tensors need no copy),
``TURBOPART_LOADER=sequential`` forces the sequential one; the mmap reader is also the
fallback, with a warning, when the sequential reader fails for a reason other than a full
GPU.  ``TURBOPART_LOADER_THREADS`` overrides the reader
threads per file, ``TURBOPART_LOADER_BUFFERS`` the number of 16 MiB staging buffers.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import prefetch
from .precision import Numerics

CHUNK = 16 << 20   # bytes per read
GAP = 1 << 20      # unneeded bytes between two tensors that are read through, not skipped

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)


@contextlib.contextmanager
def load_stream(device: torch.device | str):
    """Issue this thread's copies and casts on a CUDA stream of its own, and wait for them
    before leaving: work on the default stream meanwhile (P3-SAM segmenting while X-Part
    loads) does not queue behind gigabytes of host-to-device copies.  CPU: nothing."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def loader_mode(device: torch.device | str = "cuda") -> str:
    """``sequential`` or ``mmap`` for loads onto ``device`` (``TURBOPART_LOADER``; default
    mmap: on the H100 VM a cold start took 8.9 s with it against 9.8 s sequential,
    ``benchmarks/results/startup_h100.json``)."""
    m = os.environ.get("TURBOPART_LOADER", "auto").strip().lower()
    if m in ("mmap", "safetensors", "old", "0"):
        return "mmap"
    if m in ("sequential", "pinned", "1"):
        return "sequential"
    return "mmap"


# --------------------------------------------------------------------------- plan

def plan_chunks(spans: Iterable[tuple[int, int, str]], chunk: int | None = None,
                gap: int | None = None) -> list[tuple[int, int, list[tuple[str, int, int, int]]]]:
    """Reads covering ``spans`` (``(begin, end, key)`` byte ranges of a file).

    Returns ``[(start, end, pieces)]`` in file order, each read at most ``chunk`` bytes; a
    piece ``(key, offset in the read, offset in the tensor, length)`` says where its bytes
    go.  Spans closer than ``gap`` share a read (the bytes between are read and dropped);
    a span longer than ``chunk`` is split over several reads.
    """
    chunk = chunk or CHUNK
    gap = GAP if gap is None else gap
    items = sorted((b, e, k) for b, e, k in spans if e > b)
    runs: list[list] = []
    for b, e, k in items:
        if runs and b - runs[-1][1] <= gap and b >= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
            runs[-1][2].append((b, e, k))
        else:
            runs.append([b, e, [(b, e, k)]])
    out = []
    for rb, re_, members in runs:
        i = 0
        for cb in range(rb, re_, chunk):
            ce = min(re_, cb + chunk)
            pieces = []
            while i < len(members) and members[i][1] <= cb:
                i += 1
            j = i
            while j < len(members) and members[j][0] < ce:
                b, e, k = members[j]
                lo, hi = max(b, cb), min(e, ce)
                pieces.append((k, lo - cb, lo - b, hi - lo))
                j += 1
            out.append((cb, ce, pieces))
    return out


# --------------------------------------------------------------------------- staging

class _StagingPool:
    """Host buffers for the reads, shared by every reader of the process: pinned on CUDA
    (asynchronous copies), each returned with the event of its last copy."""

    def __init__(self, pinned: bool, limit: int, size: int):
        self.pinned, self.limit, self.size = pinned, limit, size
        self.free: queue.Queue = queue.Queue()
        self.made = 0
        self.lock = threading.Lock()
        self.users = 0

    def get(self):
        try:
            slot = self.free.get_nowait()
        except queue.Empty:
            with self.lock:
                make = self.made < self.limit
                self.made += make
            if make:
                buf = torch.empty(self.size, dtype=torch.uint8, pin_memory=self.pinned)
                return [buf, None]
            slot = self.free.get()
        if slot[1] is not None:
            slot[1].synchronize()
            slot[1] = None
        return slot

    def put(self, slot, event=None) -> None:
        slot[1] = event
        self.free.put(slot)


_POOLS: dict[tuple[bool, int], _StagingPool] = {}
_POOLS_LOCK = threading.Lock()


def _acquire_pool(pinned: bool, size: int) -> _StagingPool:
    with _POOLS_LOCK:
        pool = _POOLS.get((pinned, size))
        if pool is None:
            limit = int(os.environ.get("TURBOPART_LOADER_BUFFERS", "12") or 12)
            pool = _POOLS[(pinned, size)] = _StagingPool(pinned, max(2, limit), size)
        pool.users += 1
        return pool


def _release_pool(pool: _StagingPool) -> None:
    with _POOLS_LOCK:
        pool.users -= 1
        key = (pool.pinned, pool.size)
        if pool.users == 0 and _POOLS.get(key) is pool:
            del _POOLS[key]  # buffers go back to torch (pinned: its host cache)


def _memoryview(t: torch.Tensor) -> memoryview:
    import ctypes
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


# --------------------------------------------------------------------------- reader

class SafetensorsReader:
    """Reads tensors of one safetensors file onto a device in background threads.

    ``entries``: ``{key: (dtype string, shape, begin, end)}`` with absolute file offsets
    (:func:`turbopart.runtime.prefetch.safetensors_index`); ``dtypes``: casts by key
    (floating tensors only, as :meth:`turbopart.weights.CheckpointFile.load`).
    :meth:`start` returns at once; :meth:`result` waits and returns ``{key: tensor}``.
    """

    def __init__(self, path: str | os.PathLike, entries: Mapping[str, tuple],
                 device: torch.device | str = "cpu",
                 dtypes: Mapping[str, torch.dtype] | None = None, workers: int = 4):
        self.path = str(path)
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"sequential reader: unsupported device {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.entries = dict(entries)
        for k, (dt, *_rest) in self.entries.items():
            if dt not in ST_DTYPES:
                raise ValueError(f"sequential reader: unsupported dtype {dt} ({k})")
        self.dtypes = dict(dtypes or {})
        env = os.environ.get("TURBOPART_LOADER_THREADS")
        self.workers = max(1, int(env) if env else workers)
        self.cuda = self.device.type == "cuda"
        self.chunk = CHUNK
        self.chunks = plan_chunks(((b, e, k) for k, (_, _, b, e) in self.entries.items()),
                                  self.chunk)
        self.out: dict[str, torch.Tensor] = {}
        self._u8: dict[str, torch.Tensor] = {}
        self._left = {k: e - b for k, (_, _, b, e) in self.entries.items()}
        self._lock = threading.Lock()
        self._next = 0
        self._cancel = False
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self.bytes_read = 0
        self.seconds = 0.0
        self._t0 = 0.0

    # ------------------------------------------------------------------ tensors

    def _dest(self, key: str) -> torch.Tensor:
        """The uint8 view of ``key``'s destination tensor (created on first use)."""
        u8 = self._u8.get(key)
        if u8 is None:
            dt, shape, _, _ = self.entries[key]
            t = torch.empty(shape, dtype=ST_DTYPES[dt], device=self.device)
            self.out[key] = t
            u8 = t.reshape(-1).view(torch.uint8) if t.numel() else t
            self._u8[key] = u8
        return u8

    def _finish(self, key: str) -> None:
        with self._lock:
            t = self.out[key]
            self._u8.pop(key, None)
        want = self.dtypes.get(key)
        if want is not None and t.is_floating_point() and t.dtype != want:
            t = t.to(want)  # on CUDA: after the copies, in stream order
            with self._lock:
                self.out[key] = t

    def _read(self, fd: int, buf: torch.Tensor, start: int, end: int) -> None:
        mv = _memoryview(buf)
        pos = start
        while pos < end:
            n = os.preadv(fd, [mv[pos - start:end - start]], pos)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {pos}")
            pos += n
        with self._lock:
            self.bytes_read += end - start

    def _scatter(self, buf: torch.Tensor, pieces) -> list[str]:
        """Copy the pieces of a read to their tensors; the keys completed by it."""
        done = []
        for key, off, toff, length in pieces:
            with self._lock:
                dst = self._dest(key)
            dst[toff:toff + length].copy_(buf[off:off + length], non_blocking=self.cuda)
            with self._lock:
                self._left[key] -= length
                if self._left[key] == 0:
                    done.append(key)
        return done

    # ------------------------------------------------------------------ threads

    def start(self) -> "SafetensorsReader":
        self._t0 = time.perf_counter()
        for k in self.entries:  # empty tensors need no read
            if self._left[k] == 0:
                with self._lock:
                    self._dest(k)
                self._finish(k)
        self.pool = _acquire_pool(self.cuda, self.chunk)
        self._released = False
        n = min(self.workers, max(1, len(self.chunks)))
        self._threads = [threading.Thread(target=self._work, name=f"turbopart-read-{i}",
                                          daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()
        return self

    def _work(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        with load_stream(self.device):
            self._work_on_stream()

    def _work_on_stream(self) -> None:
        fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):
                pass
            stream = torch.cuda.current_stream(self.device) if self.cuda else None
            while not self._cancel:
                with self._lock:
                    i = self._next
                    self._next += 1
                if i >= len(self.chunks):
                    return
                start, end, pieces = self.chunks[i]
                slot = self.pool.get()
                event = None
                try:
                    self._read(fd, slot[0], start, end)
                    done = self._scatter(slot[0], pieces)
                    if self.cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    for key in done:
                        self._finish(key)
                finally:
                    self.pool.put(slot, event)
        except BaseException as exc:  # reported by result()
            with self._lock:
                if self._error is None:
                    self._error = exc
            self._cancel = True
        finally:
            if fd is not None:
                os.close(fd)

    def result(self) -> dict[str, torch.Tensor]:
        """Wait for the reads; ``{key: tensor}`` in the order of ``entries``."""
        for t in self._threads:
            t.join()
        try:
            if self._error is not None:
                raise self._error
            if self._cancel:
                raise RuntimeError("read cancelled")
            missing = [k for k, n in self._left.items() if n]
            if missing:
                raise RuntimeError(f"{self.path}: {len(missing)} tensors incomplete")
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
        finally:
            self._release()
            self.seconds = time.perf_counter() - self._t0
        return {k: self.out[k] for k in self.entries}

    def _release(self) -> None:
        if not self._released:
            self._released = True
            _release_pool(self.pool)

    def cancel(self) -> None:
        self._cancel = True
        for t in self._threads:
            t.join()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self._release()
        self.out.clear()
        self._u8.clear()


# --------------------------------------------------------------------------- components

def load_components(weights: str | os.PathLike, components: Iterable[str], *,
                    device: torch.device | str = "cpu",
                    numerics: Numerics | str = Numerics.FAST,
                    parallel: bool = True, timings: dict | None = None,
                    on_loaded: Callable[[str, nn.Module], None] | None = None
                    ) -> dict[str, nn.Module]:
    """``{name: loaded module}`` for ``components`` of the checkpoint dir ``weights``.

    ``timings`` (optional dict) receives the seconds each component took.  The biggest
    component starts first; errors propagate (the first one raised wins).  ``on_loaded(name,
    module)`` runs in the component's loader thread as soon as it is ready, while the others
    still load (e.g. a warm-up pass); its seconds go to ``timings[name + "_on_loaded"]``.
    """
    from ..weights import load_component
    names = list(dict.fromkeys(components))
    order = {"model": 0, "conditioner": 1, "shapevae": 2, "p3sam": 3, "scheduler": 4}
    names.sort(key=lambda n: order.get(n, 9))
    device = torch.device(device)

    def one(name: str) -> tuple[str, nn.Module, float]:
        t0 = time.perf_counter()
        m = load_component(weights, name, device=device, numerics=numerics,
                           workers=4 if parallel else 8)
        dt = time.perf_counter() - t0
        if on_loaded is not None:
            on_loaded(name, m)
            if timings is not None:
                timings[name + "_on_loaded"] = time.perf_counter() - t0 - dt
        return name, m, dt

    out: dict[str, nn.Module] = {}
    if parallel and len(names) > 1:
        with ThreadPoolExecutor(len(names)) as pool:
            for name, m, dt in pool.map(one, names):
                out[name] = m
                if timings is not None:
                    timings[name] = dt
    else:
        for name in names:
            _, m, dt = one(name)
            out[name] = m
            if timings is not None:
                timings[name] = dt
    prefetch.mark_ready()
    return out
