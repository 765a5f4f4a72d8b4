"""Shared test fixtures: the ../shared folder (golden cases, meshes), GPU skips."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests (and the CLI subprocesses they start) neither record a start-up profile in the home
# cache nor start the weight read-ahead helper.
os.environ.setdefault("TURBOPART_STARTUP_PROFILE", "0")
os.environ.setdefault("TURBOPART_PREFETCH", "0")


def shared_dir() -> Path | None:
    env = os.environ.get("TURBOPART_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / "shared"]:
        if (cand / "golden").is_dir():
            return cand
    return None


SHARED = shared_dir()
CASES = SHARED / "golden" / "cases" if SHARED else None
MANIFESTS = SHARED / "golden" / "manifests" if SHARED else None
MESHES = SHARED / "meshes" if SHARED else None

needs_shared = pytest.mark.skipif(
    SHARED is None, reason="needs ../shared (golden cases and meshes); set TURBOPART_SHARED")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (its CPU interpreter)")


def run_in_triton_interpreter(script: str, timeout: int = 900) -> None:
    """Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (Triton kernels on
    CPU tensors; the repo and tests/ importable, no TURBOPART_DECODER* overrides) and
    assert it exits 0 after printing "ok"."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    for key in [k for k in env if k.startswith("TURBOPART_DECODER")]:
        env.pop(key)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def case_path(name: str) -> Path:
    if CASES is None:
        pytest.skip("needs ../shared/golden/cases; set TURBOPART_SHARED")
    p = CASES / f"{name}.json"
    if not p.exists():
        pytest.skip(f"golden case {name} not in {CASES}")
    return p


def mesh_path(name: str) -> Path:
    if MESHES is None:
        pytest.skip("needs ../shared/meshes; set TURBOPART_SHARED")
    if not (MESHES / name).is_file():
        pytest.skip(f"{name} is not in {MESHES}")
    return MESHES / name


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
