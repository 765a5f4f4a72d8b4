"""On/off environment switches (``TURBOPART_…``), read one way everywhere.

A switch that is on by default is turned off by ``0``; one that is off by default is turned
on by ``1``; unset or empty keeps the default.  Standard library only (the CLI reads
switches before torch is imported).
"""
from __future__ import annotations

import os


def switch(name: str, default: bool = True) -> bool:
    """The state of the environment switch ``name`` (see the module documentation)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    return value != "0" if default else value == "1"
