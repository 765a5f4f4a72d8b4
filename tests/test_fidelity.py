"""The fidelity report runs end to end on tiny weights (CPU: both numerics compute in fp32,
so the distances must be ~0 — a real check that both code paths see the same inputs)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from turbopart import metrics, weights
from turbopart.examples import example_mesh
from turbopart.fidelity import fidelity_report


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return weights.write_random(tmp_path_factory.mktemp("w"), tiny=True, seed=3)


def test_report_on_cpu_is_consistent(tiny_dir):
    rep = fidelity_report(tiny_dir, example_mesh(), device="cpu", points=3000, prompts=16,
                          steps=2, octree_resolution=32, parts=2, progress=False)
    p, d, x = rep.sections["p3sam"], rep.sections["dit"], rep.sections["xpart"]
    assert p["features_relative_error"] < 1e-5
    assert p["best_mask_point_agreement"] == 1.0 and p["best_head_agreement"] == 1.0
    assert p["face_label_agreement"] == 1.0
    assert d["velocity_relative_error"] < 1e-5
    assert x["latents_relative_error"] < 1e-4
    assert "fidelity" in rep.table()


def test_cli_fidelity_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, "-m", "turbopart", "fidelity", "--weights",
                        str(tiny_dir), "--sections", "dit", "--parts", "2", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "velocity_relative_error" in out.read_text()


def test_metrics_label_agreement_and_boxes():
    a = np.array([0, 0, 1, 1, 2, -1])
    b = np.array([5, 5, 7, 7, 7, -1])
    assert metrics.label_agreement(a, b) == pytest.approx(5 / 6)
    assert metrics.label_agreement(a, b, weights=np.array([1, 1, 1, 1, 0, 1.0])) == 1.0
    box = np.array([[0, 0, 0], [1, 1, 1.0]])
    assert metrics.box_iou(box, box) == 1.0
    assert metrics.box_iou(box, box + 2) == 0.0
