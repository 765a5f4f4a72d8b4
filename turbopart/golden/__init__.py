"""Golden parity: run the official reference cases (``shared/golden/cases``) through turbopart.

A case is ``<name>.json`` + ``<name>.safetensors`` with ``weight.*`` (official keys),
``input.*``, ``output.*`` (what the official code returned) and ``rng.*`` (its random draws).
:func:`run_case` builds our module from the case's tiny official config, loads the weights,
feeds the inputs, injects the random draws and returns every output it can, named as in the
case without the ``output.`` prefix.  One runner module per kind lives beside this file
(``turbopart/golden/<kind>.py``, function ``run(case) -> dict``).
"""
from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

KINDS = ("sonata", "p3sam", "automask", "dit", "shapevae", "conditioner", "scheduler",
         "sampling")

#: Default tolerance: |ours - ref| <= ATOL * max(1, |ref|) for float outputs.
ATOL = 1e-4


@dataclass
class Case:
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return str(self.meta.get("case", self.path.stem))

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` (e.g. ``"weight."``) with the prefix removed."""
        n = len(prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def input(self, name: str) -> torch.Tensor:
        return self.tensors["input." + name]

    def rng(self, name: str) -> torch.Tensor:
        return self.tensors["rng." + name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        return self.prefixed("output.")


def load_case(path: str | os.PathLike) -> Case:
    """Read ``<case>.json`` and its safetensors file (path of either, or without suffix)."""
    from safetensors.torch import load_file
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    jp = p.with_suffix(".json")
    with open(jp) as f:
        meta = json.load(f)
    st = jp.parent / meta.get("file", p.name + ".safetensors")
    return Case(jp, meta, load_file(str(st)))


def case_kind(case: Case) -> str:
    """Which runner handles ``case``: by name, then by the official call it describes."""
    name = case.name.lower()
    for kind in sorted(KINDS, key=len, reverse=True):
        if name == kind or name.startswith(kind + "_") or name.startswith(kind + "-"):
            return kind
    call = json.dumps(case.meta.get("official_call", {}))
    rules = [("predict_aabb", "automask"), ("PartFormerPipeline", "sampling"),
             ("FlowMatchEulerDiscreteScheduler", "scheduler"),
             ("PartFormerDITPlain", "dit"), ("Conditioner", "conditioner"),
             ("VolumeDecoderShapeVAE", "shapevae"), ("build_P3SAM", "p3sam"),
             ("get_feat", "sonata")]
    for needle, kind in rules:
        if needle in call:
            return kind
    raise ValueError(f"{case.path}: cannot tell which kind of case this is")


def _runner(kind: str):
    return importlib.import_module(f"turbopart.golden.{kind}")


def run_case(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Run one golden case; return ``{output name without 'output.': tensor}``."""
    case = load_case(path)
    return _runner(case_kind(case)).run(case)


# --------------------------------------------------------------------------- comparison

@dataclass
class Check:
    name: str
    ok: bool
    max_abs: float | None = None
    detail: str = ""


def compare_tensor(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL
                   ) -> Check:
    ours = torch.as_tensor(ours).detach().cpu()
    ref = ref.detach().cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        if ours.numel() == ref.numel():
            ours = ours.reshape(ref.shape)
        else:
            return Check(name, False, None, f"shape {list(ours.shape)} != {list(ref.shape)}")
    if not ref.is_floating_point():
        if ours.is_floating_point():
            return Check(name, False, None, "float output where the reference is integer")
        bad = int((ours.to(torch.int64) != ref.to(torch.int64)).sum())
        return Check(name, bad == 0, float(bad), f"{bad} of {ref.numel()} differ" if bad else "")
    r = ref.double()
    o = ours.double()
    both_nan = torch.isnan(r) & torch.isnan(o)
    diff = (o - r).abs()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    nan_mismatch = torch.isnan(diff) | (torch.isnan(r) != torch.isnan(o))
    lim = atol * torch.clamp(r.abs(), min=1.0)
    lim = torch.where(torch.isnan(lim), torch.full_like(lim, atol), lim)
    bad = (diff > lim) | nan_mismatch
    finite = diff[~torch.isnan(diff)]
    mx = float(finite.max()) if finite.numel() else 0.0
    nbad = int(bad.sum())
    return Check(name, nbad == 0, mx, f"{nbad} of {ref.numel()} outside tolerance" if nbad else "")


def compare(case: Case, outputs: dict[str, torch.Tensor]) -> list[Check]:
    """Compare ``outputs`` with the case's ``output.*`` tensors (missing ones fail).

    A runner module may define ``COMPARE = {name: fn(case, ours, ref) -> Check}`` for outputs
    with their own rule (e.g. labels equal up to a renumbering).
    """
    special: dict[str, Callable] = getattr(_runner(case_kind(case)), "COMPARE", {})
    checks = []
    for name, ref in case.outputs.items():
        if name not in outputs:
            checks.append(Check(name, False, None, "not produced"))
        elif name in special:
            checks.append(special[name](case, outputs[name], ref))
        else:
            checks.append(compare_tensor(name, outputs[name], ref))
    return checks


def run_dir(path: str | os.PathLike) -> dict[str, list[Check]]:
    """Run and compare every case in a directory (or one case file)."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    results = {}
    for jf in files:
        case = load_case(jf)
        try:
            outputs = _runner(case_kind(case)).run(case)
            results[case.name] = compare(case, outputs)
        except Exception as exc:  # report, keep going
            results[case.name] = [Check("<run>", False, None, f"{type(exc).__name__}: {exc}")]
    return results


def format_table(results: dict[str, list[Check]], verbose: bool = False) -> str:
    lines = [f"{'case':<14} {'result':<6} {'outputs':>8} {'max abs err':>12}  notes"]
    for name, checks in results.items():
        ok = all(c.ok for c in checks)
        errs = [c.max_abs for c in checks if c.max_abs is not None and not math.isnan(c.max_abs)]
        mx = max(errs) if errs else float("nan")
        bad = [c for c in checks if not c.ok]
        note = "; ".join(f"{c.name}: {c.detail}" for c in bad[:3])
        if len(bad) > 3:
            note += f"; ... {len(bad) - 3} more"
        lines.append(f"{name:<14} {'PASS' if ok else 'FAIL':<6} {len(checks):>8} {mx:>12.3g}  {note}")
        if verbose:
            for c in checks:
                lines.append(f"    {'ok ' if c.ok else 'BAD'} {c.name:<40} "
                             f"{'' if c.max_abs is None else f'{c.max_abs:.3g}':>10}  {c.detail}")
    return "\n".join(lines)
