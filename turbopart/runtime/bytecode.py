"""A byte-code cache for Python installs that ship without ``.pyc`` files.

Installers that skip byte-compilation (``uv pip install`` without ``--compile-bytecode``,
images built with ``PYTHONDONTWRITEBYTECODE=1``) leave every module as source only, and with
``PYTHONDONTWRITEBYTECODE`` set (or a read-only ``site-packages``) Python compiles all of
them again at every start: on the H100 VM, ``import torch`` took 3.8–4.6 s that way against
1.5–1.9 s with byte-code, and trimesh + scipy 1.2–2.2 s against 0.6 s.

:func:`enable` (called by the CLI before any heavy import) points ``sys.pycache_prefix`` at
``$TURBOPART_CACHE/pycache`` (``~/.cache/turbopart/pycache``) when torch's own byte-code is
missing, and lets this process write there: the first run compiles once, later runs read the
cached byte-code.  Python checks every cached file against its source (mtime and size), so an
upgraded package is compiled again.  Nothing changes where byte-code is already installed
(torch's ``.pyc`` exists), where the user set a ``PYTHONPYCACHEPREFIX`` of their own, or with
``TURBOPART_PYCACHE=0``.

Standard library only: this module runs before torch is imported.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .switches import switch

#: The package whose byte-code decides (the bulk of the start-up's imports).
PROBE = "torch"


def cache_root() -> Path:
    """turbopart's cache folder: ``$TURBOPART_CACHE``, else ``~/.cache/turbopart``."""
    return Path(os.environ.get("TURBOPART_CACHE") or Path.home() / ".cache" / "turbopart")


def enabled() -> bool:
    return switch("TURBOPART_PYCACHE")


def installed_bytecode(package: str = PROBE) -> bool | None:
    """Whether ``package``'s ``__init__`` has its byte-code where Python looks by default
    (None when the package is not found or is not a source module)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.has_location or not spec.cached:
        return None
    return os.path.isfile(spec.cached)


def enable(root: str | os.PathLike | None = None, probe: str = PROBE) -> Path | None:
    """Use (and fill) the byte-code cache under ``root`` (default
    ``cache_root() / "pycache"``) when the package ``probe`` has no installed byte-code.
    Returns the prefix in use, else None."""
    if not enabled() or sys.pycache_prefix is not None:
        return None
    if installed_bytecode(probe) is not False:
        return None
    prefix = Path(root) if root is not None else cache_root() / "pycache"
    try:
        prefix.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(prefix, os.W_OK):
        return None
    sys.pycache_prefix = str(prefix)
    sys.dont_write_bytecode = False
    return prefix
