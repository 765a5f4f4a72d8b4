"""The byte-code cache for installs without .pyc files (turbopart.runtime.bytecode)."""
import compileall
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from turbopart.runtime import bytecode
prefix = bytecode.enable(sys.argv[2], probe="fakepkg")
import fakepkg
print(prefix)
print(fakepkg.__cached__)
print(os.path.isfile(fakepkg.__cached__))
"""


def _run(tmp_path: Path, **env) -> list[str]:
    full = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", **env)
    full.pop("PYTHONPYCACHEPREFIX", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "src"),
                          str(tmp_path / "cache")], env=full, capture_output=True, text=True,
                         check=True)
    return out.stdout.split("\n")[:3]


def _package(tmp_path: Path) -> Path:
    pkg = tmp_path / "src" / "fakepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    return pkg


def test_source_only_install_gets_a_cache(tmp_path):
    pkg = _package(tmp_path)
    prefix, cached, written = _run(tmp_path)
    assert prefix == str(tmp_path / "cache")
    assert cached.startswith(prefix) and written == "True"   # written despite the env var
    assert not (pkg / "__pycache__").exists()                # the source tree stays clean
    # the next process reads it
    assert _run(tmp_path)[1:] == [cached, "True"]


def test_installed_bytecode_is_left_alone(tmp_path):
    pkg = _package(tmp_path)
    assert compileall.compile_dir(str(pkg), quiet=1)
    prefix, cached, written = _run(tmp_path)
    assert prefix == "None"
    assert Path(cached).parent == pkg / "__pycache__" and written == "True"


def test_switched_off(tmp_path):
    _package(tmp_path)
    prefix, cached, written = _run(tmp_path, TURBOPART_PYCACHE="0")
    assert prefix == "None" and written == "False"
    assert not (tmp_path / "cache").exists()
