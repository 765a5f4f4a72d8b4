"""The web app's handlers (driven directly, CPU, tiny random weights) and its UI build."""
from __future__ import annotations

from pathlib import Path

import pytest

from turbopart import weights
from turbopart.app import Engine, build_app
from turbopart.examples import write_example


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = weights.write_random(tmp_path_factory.mktemp("w"), tiny=True, seed=5)
    return Engine(weights=str(d), device="cpu", points=4000, prompts=16)


def test_segment_then_generate(engine, tmp_path):
    mesh = tmp_path / "chair.glb"
    write_example(mesh)
    glb, info, files, seg = engine.segment(str(mesh), seed=1, max_parts=4)
    assert Path(glb).is_file() and info["parts"] >= 1 and len(files) == 3
    from turbopart import app
    app.PRESETS["tiny"] = (2, 32)
    try:
        parts, exploded, summary, files = engine.generate(str(mesh), "tiny", 1, 4, seg)
    finally:
        del app.PRESETS["tiny"]
    assert Path(parts).is_file() and Path(exploded).is_file()
    assert all(Path(f).is_file() for f in files)
    assert summary["of boxes"] == info["parts"]


def test_ui_builds():
    pytest.importorskip("gradio")
    demo = build_app(Engine(weights="unused"))
    assert demo is not None


def test_app_serves_a_page():
    pytest.importorskip("gradio")
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(Engine(weights="unused"))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True)
    try:
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
        assert b"turbopart" in html or b"gradio" in html.lower()
    finally:
        demo.close()
