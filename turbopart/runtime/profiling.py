"""Stage timers and memory figures for progress reports, ``--profile`` and benchmarks."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch


def sync(device: torch.device | str | None = None) -> None:
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_stream(device: torch.device | str) -> None:
    """Wait for the work queued on the calling thread's current stream of ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.current_stream(device).synchronize()


@dataclass
class Profile:
    """Wall time per named stage (the calling thread's current CUDA stream synchronised at
    both ends when ``synchronize`` is on: stages timed on another thread with a stream of
    its own, such as the pipeline's part finishing, neither wait for nor delay the others).
    Stages timed on concurrent threads overlap, so their sum can exceed the wall time."""

    device: str = "cpu"
    synchronize: bool = True
    stages: dict[str, float] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.synchronize:
            sync_stream(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                sync_stream(self.device)
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    def count(self, name: str, value: Any) -> None:
        self.counters[name] = value

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def peak_memory_gb(self) -> float | None:
        if torch.device(self.device).type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "stages_s": dict(self.stages), "total_s": self.total,
                "peak_gpu_gb": self.peak_memory_gb(), "counters": dict(self.counters)}

    def table(self) -> str:
        width = max([len(k) for k in self.stages] + [5])
        lines = [f"{k:<{width}}  {v * 1000:9.1f} ms" for k, v in self.stages.items()]
        lines.append(f"{'total':<{width}}  {self.total * 1000:9.1f} ms")
        peak = self.peak_memory_gb()
        if peak is not None:
            lines.append(f"{'peak GPU memory':<{width}}  {peak:9.2f} GB")
        return "\n".join(lines)

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=2)


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): the part of a
    command's wall clock spent before its own timers (interpreter start, imports)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        import os
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def git_commit() -> str | None:
    """The source commit: ``$TURBOPART_COMMIT`` (set when the tree travels without .git),
    else ``git rev-parse HEAD`` of the checkout (+dirty), else None."""
    import os
    import subprocess
    from pathlib import Path
    env = os.environ.get("TURBOPART_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "--", "turbopart"],
                               timeout=10).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """GPU, torch and commit facts every benchmark result records."""
    import platform
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": platform.python_version(), "commit": git_commit()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def timed(fn, device: torch.device | str, repeats: int, warmup: int = 1,
          first: list | None = None) -> tuple[list[float], Any]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, and the last output.

    On CUDA each repeat is timed with device events, elsewhere with a synchronised wall
    clock; the wall-clock seconds of the warm-up calls are appended to ``first`` when given
    (the first of them is the cold call).
    """
    device = torch.device(device)
    out = None
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        if first is not None:
            first.append(time.perf_counter() - t0)
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return times, out
