"""Start-up read-ahead: put the bytes a process is about to read into the page cache early.

A cold start reads two things from disk: the shared libraries and module files of the imports
(``import torch`` maps about a GB of CUDA libraries and faults its pages in one by one), and
the checkpoint tensors (about 8.4 GB for P3-SAM + X-Part).  Both are serial when the process
does them itself: first the imports, then the weights.  :func:`start` launches a small
helper process (this file run as a script, standard library only, so it is up in a few ms)
that reads, with large reads in a few threads, one lane after the other in the order the
process needs them:

* lane ``libs``: the pages of the libraries and the module files (``.pyc``, or the source
  where Python finds no byte-code) previous turbopart
  processes touched before their first model was ready (a *start-up profile*, recorded by a
  process that called :func:`start`: a snapshot of ``/proc/self/pagemap`` and
  ``sys.modules`` at the first :func:`mark_ready` and one at exit; union over runs, entries
  of changed files dropped);
* lane ``weights_first``: the byte ranges of the first component's tensors (the one the
  command loads first), from the safetensors header (keys inference never reads are
  skipped, :data:`UNUSED`), in offset order;
* lane ``later``: the profile's pages touched after that (first-call libraries);
* lane ``weights``: the other components' tensors.

The helper only warms the page cache: the process reads everything it needs itself, so a
wrong or missing profile, an unreadable file or a killed helper costs speed, never
correctness.  The helper exits when done and is killed when its parent exits.

Switches (environment):

* ``TURBOPART_PREFETCH``: ``1`` / ``all`` (default): weights and profile; ``weights``: the
  weights only; ``libs``: the profile only; ``0``: off.
* ``TURBOPART_PREFETCH_THREADS``: reader threads per lane (default 4).
* ``TURBOPART_PREFETCH_LOG``: a file the helper writes its timings to (JSON), for benchmarks.
* ``TURBOPART_STARTUP_PROFILE``: the profile file (default
  ``$TURBOPART_CACHE/startup-profile.json``, ``~/.cache/turbopart`` when unset); ``0``: do
  not record one.

This module imports nothing heavy: the CLI calls :func:`start` before it imports torch.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from pathlib import Path

#: Keys (after the component's strip prefix) that inference never reads (the loader builds
#: the modules with ``skip_unused=True``; spec xpart §1.5).  Only a read-ahead hint: a key
#: listed wrongly is read by the loader anyway (tests check the lists against the builders).
UNUSED: dict[str, tuple[str, ...]] = {
    "p3sam": ("sonata.embedding.mask_token",),
    "model": (),
    "shapevae": ("encoder.", "pre_kl."),
    "conditioner": ("geo_encoder.local_encoder.geo_decoder.",
                    "geo_encoder.local_encoder.post_kl.", "geo_encoder.local_encoder.pre_kl.",
                    "geo_encoder.local_encoder.transformer.", "obj_encoder.geo_decoder.",
                    "obj_encoder.post_kl.", "obj_encoder.pre_kl.", "obj_encoder.transformer.",
                    "seg_feat_encoder.sonata.embedding.mask_token"),
}
#: Key prefix of the official files that the loader strips (``CheckpointFile.strip_prefix``).
STRIP_PREFIX = {"p3sam": "dit."}
#: Components each CLI command loads.
COMMAND_COMPONENTS = {"segment": ("p3sam",), "generate": ("model", "conditioner", "shapevae"),
                      "run": ("p3sam", "model", "conditioner", "shapevae")}

CHUNK = 16 << 20          # bytes per read of the weights lane
GAP = 1 << 20             # unneeded bytes between two needed ranges read through
LIB_GAP = 256 << 10       # the same for library pages
PAGE = 4096
#: Checkpoint files are read by the loader, never part of the library profile.
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# --------------------------------------------------------------------------- safetensors

def safetensors_index(path: str | os.PathLike) -> tuple[int, dict[str, tuple[str, tuple, int, int]]]:
    """``(data_start, {name: (dtype, shape, begin, end)})`` of a safetensors file, offsets
    absolute in the file; raises ``ValueError`` for a malformed or truncated file."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 30):
            raise ValueError(f"header length {n} beyond the file size {size}")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError("truncated header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"bad header entry for {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        item = DTYPE_SIZES.get(dtype)
        if item is None:
            raise ValueError(f"{name}: unsupported dtype {dtype}")
        if not 0 <= b <= e or start + e > size or e - b != numel * item:
            raise ValueError(f"{name}: data offsets {b}..{e} do not fit the shape {list(shape)} "
                             f"{dtype} or the file ({size} bytes)")
        out[name] = (dtype, shape, start + b, start + e)
    return start, out


def needed(component: str, key: str) -> bool:
    """Whether inference reads ``key`` (official file key) of ``component`` (a hint)."""
    p = STRIP_PREFIX.get(component, "")
    if p and key.startswith(p):
        key = key[len(p):]
    return not any(key == u or key.startswith(u) for u in UNUSED.get(component, ()))


def merge_ranges(ranges, gap: int) -> list[list[int]]:
    """Sorted, merged ``[begin, end)`` ranges (ranges closer than ``gap`` are joined)."""
    out: list[list[int]] = []
    for b, e in sorted(ranges):
        if e <= b:
            continue
        if out and b - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([b, e])
    return out


def subtract_ranges(a, b) -> list[list[int]]:
    """The parts of the sorted, disjoint ranges ``a`` outside the sorted, disjoint ``b``."""
    out: list[list[int]] = []
    j = 0
    for lo, hi in a:
        while j < len(b) and b[j][1] <= lo:
            j += 1
        k = j
        while lo < hi and k < len(b) and b[k][0] < hi:
            if b[k][0] > lo:
                out.append([lo, b[k][0]])
            lo = max(lo, b[k][1])
            k += 1
        if lo < hi:
            out.append([lo, hi])
    return out


def component_file(weights: str | os.PathLike, component: str) -> Path | None:
    """The safetensors file of ``component`` in a checkpoint dir (the loader's first choice)."""
    root = Path(weights)
    for folder in (root / component, root):
        cand = folder / f"{component}.safetensors"
        if cand.is_file():
            return cand
    folder = root / component
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files[0]
    return None


def weight_ranges(weights: str | os.PathLike, components) -> list[tuple[str, list[list[int]]]]:
    """``[(file, ranges)]``: the bytes the loader reads, per component file, in file order."""
    out = []
    for comp in components:
        path = component_file(weights, comp)
        if path is None:
            continue
        try:
            _, index = safetensors_index(path)
        except (OSError, ValueError):
            continue
        rng = [(b, e) for name, (_, _, b, e) in index.items() if needed(comp, name)]
        out.append((str(path), merge_ranges(rng, GAP)))
    return out


# --------------------------------------------------------------------------- weights dir

def random_weights_dir(init: str = "realistic") -> Path:
    """Where ``--weights random[:init]`` keeps its full-size random weights."""
    from .bytecode import cache_root
    return cache_root() / f"random-{init}"


def find_weights(spec: str | None = None) -> Path | None:
    """The weight dir ``turbopart.weights.resolve`` would pick, found without imports:
    ``spec`` (a dir or ``random[:init]``), ``$TURBOPART_WEIGHTS``, the Hugging Face cache.
    None when not found (the read-ahead is skipped; the loader reports the problem)."""
    if spec:
        if str(spec).startswith("random"):
            p = random_weights_dir(str(spec).partition(":")[2] or "realistic")
            return p if (p / ".complete").is_file() else None
        p = Path(spec).expanduser()
        return p if p.exists() else None
    env = os.environ.get("TURBOPART_WEIGHTS")
    if env:
        p = Path(env).expanduser()
        return p if p.exists() else None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "huggingface"),
        "hub")
    repo = Path(hub) / "models--tencent--Hunyuan3D-Part"
    try:
        rev = (repo / "refs" / "main").read_text().strip()
        snap = repo / "snapshots" / rev
        return snap if snap.is_dir() else None
    except OSError:
        return None


# --------------------------------------------------------------------------- profile

def profile_path() -> Path | None:
    env = os.environ.get("TURBOPART_STARTUP_PROFILE")
    if env == "0":
        return None
    if env:
        return Path(env)
    from .bytecode import cache_root
    return cache_root() / "startup-profile.json"


def _file_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def load_profile(path: Path | None = None, *, counts: list | None = None,
                 meta: dict | None = None) -> dict:
    """The recorded profile with only the entries whose files are unchanged (``counts``, if
    given, receives ``[valid, recorded]``; ``meta`` the profile's other fields)."""
    path = path or profile_path()
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for name, ent in files.items():
        if isinstance(ent, dict) and ent.get("key") == _file_key(name):
            out[name] = ent
    if counts is not None:
        counts[:] = [len(out), len(files)]
    if meta is not None:
        meta.update({k: v for k, v in data.items() if k != "files"})
    return out


def _mapped_pages() -> dict[str, tuple[list[list[int]], int]]:
    """``{file: (byte ranges with pages present in this process, load order)}`` for every
    file-backed mapping (``/proc/self/maps`` + the present bit of ``/proc/self/pagemap``)."""
    maps: list[tuple[int, int, int, str]] = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if not path.startswith("/") or path.startswith(("/dev/", "/proc/", "/sys/",
                                                            "/memfd:")) \
                    or path.endswith(("(deleted)",) + WEIGHT_SUFFIXES):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, int(parts[2], 16), path))
    # ld.so maps each new library below the previous ones: descending address ~ load order.
    order: dict[str, int] = {}
    for lo, _, _, path in sorted(maps, key=lambda m: -m[0]):
        order.setdefault(path, len(order))
    out: dict[str, list] = {}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        np = None
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for lo, hi, off, path in maps:
            n = (hi - lo) // PAGE
            data = os.pread(fd, 8 * n, 8 * (lo // PAGE))
            rng = out.setdefault(path, [])
            if np is not None:
                present = np.concatenate(
                    ([False], (np.frombuffer(data, "<u8") >> 63).astype(bool), [False]))
                edges = np.flatnonzero(present[1:] != present[:-1])
                rng += [(off + int(b) * PAGE, off + int(e) * PAGE)
                        for b, e in zip(edges[0::2], edges[1::2])]
                continue
            words = struct.unpack(f"<{len(data) // 8}Q", data)
            run = None
            for i, w in enumerate(words):
                if w >> 63:
                    if run is None:
                        run = i
                elif run is not None:
                    rng.append((off + run * PAGE, off + i * PAGE))
                    run = None
            if run is not None:
                rng.append((off + run * PAGE, off + len(words) * PAGE))
    finally:
        os.close(fd)
    return {p: (merge_ranges(r, LIB_GAP), order[p]) for p, r in out.items() if r}


def _module_files() -> list[str]:
    """The files Python read for the imported modules: the ``.pyc`` where one exists, else
    the source (an install without byte-code, or ``PYTHONDONTWRITEBYTECODE``, compiles every
    source at every start)."""
    seen = []
    for mod in list(sys.modules.values()):
        for f in (getattr(mod, "__cached__", None), getattr(mod, "__file__", None)):
            if isinstance(f, str) and not f.endswith((".so", ".pyd")) and os.path.isfile(f):
                seen.append(f)
                break
    return list(dict.fromkeys(seen))


def snapshot() -> dict[str, dict]:
    """The files this process has touched so far (see :func:`_mapped_pages`)."""
    files: dict[str, dict] = {}
    try:
        mapped = _mapped_pages()
    except OSError:
        mapped = {}
    for path, (rng, order) in mapped.items():
        key = _file_key(path)
        if key is not None:
            rng = [[b, min(e, key[0])] for b, e in rng if b < key[0]]
            files[path] = {"key": key, "ranges": rng, "order": order, "kind": "lib"}
    for i, path in enumerate(_module_files()):
        key = _file_key(path)
        if key is not None and path not in files:
            files[path] = {"key": key, "ranges": [[0, key[0]]], "order": i, "kind": "module"}
    return files


def _mapped_files() -> set[str]:
    out = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].strip())
    except OSError:
        pass
    return out


class _Recorder:
    """Records the start-up profile: a snapshot when the models are ready (start-up pages)
    and one at exit (later pages), merged into the profile file.  Only when the profile is
    missing or stale (files changed), or when this process mapped files it does not know."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ready: dict[str, dict] | None = None
        self.enabled = False
        self.stale: bool | None = None  # decided at the first mark_ready / exit

    def _is_stale(self) -> bool:
        if self.stale is None:
            path = profile_path()
            counts, meta = [0, 0], {}
            if path is not None and path.is_file():
                load_profile(path, counts=counts, meta=meta)
            # missing, files changed, or never recorded up to "models ready"
            self.stale = counts[0] == 0 or counts[0] < counts[1] or not meta.get("ready")
        return self.stale

    def mark_ready(self) -> None:
        if not self.enabled or self.ready is not None:
            return
        with self.lock:
            if self.ready is None and self._is_stale():
                try:
                    self.ready = snapshot()
                except Exception:
                    self.ready = {}

    def write(self) -> None:
        path = profile_path()
        if not self.enabled or path is None:
            return
        try:
            old = load_profile(path)
            if not self._is_stale():
                known = set(old)
                new = [f for f in _mapped_files() if f not in known and os.path.isfile(f)
                       and not f.endswith(WEIGHT_SUFFIXES)]
                if not new:
                    return
            now = snapshot()
        except Exception:
            return
        ready = self.ready or {}
        merged = dict(old)
        changed = False
        for name, ent in now.items():
            prev = merged.get(name) or {**ent, "ranges": [], "later": []}
            # start-up pages: touched by the time the models were ready (this run or before)
            start = merge_ranges([tuple(r) for r in prev.get("ranges", [])] +
                                 [tuple(r) for r in ready.get(name, {}).get("ranges", [])],
                                 LIB_GAP)
            later = subtract_ranges(merge_ranges(
                [tuple(r) for r in prev.get("later", [])] +
                [tuple(r) for r in ent["ranges"]], LIB_GAP), start)
            new_ent = {**prev, "key": ent["key"], "ranges": start, "later": later}
            if new_ent != merged.get(name):
                merged[name] = new_ent
                changed = True
        if not changed and not self.stale:
            return
        meta: dict = {}
        load_profile(path, meta=meta)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"version": 1, "ready": bool(meta.get("ready") or ready),
                                       "files": merged}))
            os.replace(tmp, path)
        except OSError:
            pass


_RECORDER = _Recorder()


def mark_ready() -> None:
    """Models are loaded: pages touched so far are *start-up* pages of the profile (only
    when a profile is being recorded; cheap otherwise)."""
    _RECORDER.mark_ready()


# --------------------------------------------------------------------------- the helper

class Prefetcher:
    """Handle of a running read-ahead helper process."""

    def __init__(self, proc, plan: dict):
        self.proc = proc
        self.plan = plan

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except Exception:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(2)
            except Exception:
                pass


_ACTIVE: list[Prefetcher] = []


def mode() -> str:
    # default all: the whole job on the H100 VM took 18.9-20.3 s with it, 23.1-25.0 s
    # without (benchmarks/results/whole_run_realistic_prefetch_ab.json)
    m = os.environ.get("TURBOPART_PREFETCH", "all").strip().lower()
    return {"": "all", "1": "all", "all": "all", "on": "all", "true": "all",
            "weights": "weights", "libs": "libs", "0": "off", "off": "off", "false": "off",
            "no": "off"}.get(m, "all")


def start(weights: str | os.PathLike | None = None, components=(), *,
          record: bool = True) -> Prefetcher | None:
    """Start the read-ahead helper for ``components`` of the checkpoint dir ``weights``
    (either may be empty: then only the profile lane runs).  Returns None when switched off
    or when nothing is to be read.  Also arms the profile recorder (at exit) unless
    ``record`` is False."""
    m = mode()
    if m == "off":
        return None
    prof = profile_path() if m in ("all", "libs") else None
    if m == "libs":  # the process reads the weights itself, alone on the disk
        weights = None
    if record and profile_path() is not None and sys.platform.startswith("linux"):
        _arm_recorder()
    plan = {"weights": str(weights) if weights else None,
            "components": list(components) if weights else [],
            "profile": str(prof) if prof else None,
            "threads": int(os.environ.get("TURBOPART_PREFETCH_THREADS", "4") or 4),
            "log": os.environ.get("TURBOPART_PREFETCH_LOG"),
            "parent": os.getpid(), "t0": time.time()}
    if not plan["components"] and not plan["profile"]:
        return None
    import subprocess
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__),
                                 json.dumps(plan)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True)
    except OSError:
        return None
    handle = Prefetcher(proc, plan)
    if not _ACTIVE:
        import atexit
        atexit.register(_stop_all)
    _ACTIVE.append(handle)
    return handle


def _stop_all() -> None:
    for h in _ACTIVE:
        h.stop()


_ARMED = False


def _arm_recorder() -> None:
    global _ARMED
    if _ARMED:
        return
    _ARMED = True
    _RECORDER.enabled = True
    import atexit
    atexit.register(_RECORDER.write)


def _read_lane(items, threads: int, parent: int, stats: dict, name: str,
               sequential: bool = True) -> None:
    """Read ``items`` (path, begin, end) with ``threads`` threads, in order (``sequential``:
    large readahead, else none beyond the ranges: library pages are scattered)."""
    lock = threading.Lock()
    it = iter(items)
    fds: dict[str, int] = {}
    total = [0]

    def fd_of(path):
        with lock:
            fd = fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL if sequential
                                     else os.POSIX_FADV_RANDOM)
                except (AttributeError, OSError):
                    pass
                fds[path] = fd
            return fd

    def work():
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        n_items = 0
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            n_items += 1
            if n_items % 64 == 0 and os.getppid() != parent:
                return  # the parent is gone
            path, b, e = nxt
            try:
                fd = fd_of(path)
                pos = b
                while pos < e:
                    n = os.preadv(fd, [mv[:min(CHUNK, e - pos)]], pos)
                    if n <= 0:
                        break
                    pos += n
                with lock:
                    total[0] += pos - b
            except OSError:
                continue

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, daemon=True) for _ in range(max(1, threads))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for fd in fds.values():
        os.close(fd)
    stats[name] = {"bytes": total[0], "s": time.perf_counter() - t0,
                   "done_after_start_s": time.time() - stats["t0"]}


def _chunks(path: str, ranges) -> list[tuple[str, int, int]]:
    out = []
    for b, e in ranges:
        for p in range(b, e, CHUNK):
            out.append((path, p, min(e, p + CHUNK)))
    return out


def _helper(plan: dict) -> None:
    try:  # die with the parent (Linux)
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    parent = int(plan["parent"])
    if os.getppid() != parent:
        return
    stats: dict = {"t0": float(plan["t0"]), "helper_start_s": time.time() - float(plan["t0"])}
    threads = max(1, int(plan.get("threads", 4)))
    weights = [_chunks(path, rng) for path, rng in
               weight_ranges(plan["weights"], plan.get("components", ()))] \
        if plan.get("weights") else []
    startup, later = [], []
    if plan.get("profile"):
        prof = load_profile(Path(plan["profile"]))
        for path, ent in sorted(prof.items(), key=lambda kv: (kv[1].get("kind") != "module",
                                                              kv[1].get("order", 0))):
            startup.extend(_chunks(path, ent.get("ranges", [])))
            later.extend(_chunks(path, ent.get("later", [])))
    stats["planned_bytes"] = {"weights": sum(e - b for w in weights for _, b, e in w),
                              "libs": sum(e - b for _, b, e in startup),
                              "later": sum(e - b for _, b, e in later)}
    # In the order the process needs them, one lane at a time (lanes that ran at once
    # slowed the imports more than they gained): the imports' pages, the first component's
    # weights (the one loaded first), the pages of the first calls, the other weights.
    _read_lane(startup, threads, parent, stats, "libs", sequential=False)
    _read_lane(weights[0] if weights else [], threads, parent, stats, "weights_first")
    _read_lane(later, threads, parent, stats, "later", sequential=False)
    _read_lane([c for w in weights[1:] for c in w], threads, parent, stats, "weights")
    log = plan.get("log")
    if log:
        stats.pop("t0", None)
        try:
            Path(log).write_text(json.dumps(stats))
        except OSError:
            pass


if __name__ == "__main__":
    _helper(json.loads(sys.argv[1]))
