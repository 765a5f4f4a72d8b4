"""Checkpoint directories, official layouts, loading and random weights.

An official Hugging Face directory (``tencent/Hunyuan3D-Part``) holds one folder per
component, each with a ``config.json`` and (except the scheduler) a ``.safetensors``::

    p3sam/ model/ conditioner/ shapevae/ scheduler/

Every component module of turbopart is built by a *builder* (``COMPONENTS[name].builder``)
with the contract::

    build(config: dict | None = None, *, skip_unused: bool = False) -> nn.Module

``config`` is the component's ``config.json`` (the official ``{"target", "params"}`` form,
plus an optional top-level ``"turbopart"`` object for architecture facts the official file
does not state, e.g. tiny test widths); ``None`` means the official full-size model.  The
module's ``state_dict()`` keys and shapes are the official ones; with ``skip_unused`` it may
omit parameters that inference never reads (they are still validated in the file).
Builders are called on the meta device; a module that owns non-persistent buffers provides
``reset_non_persistent(device)`` to create them after loading.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .runtime.precision import Numerics, param_dtypes

HF_REPO_ID = "tencent/Hunyuan3D-Part"


class CheckpointError(RuntimeError):
    """A checkpoint directory or file that cannot be used, with every reason in one message."""


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    builder: str  # "module.path:function"
    official_target: str
    official_params: Mapping[str, Any] | None = None  # None: the builder's default
    strip_prefix: str = ""
    has_weights: bool = True

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"

    def build_fn(self) -> Callable[..., nn.Module]:
        mod, fn = self.builder.split(":")
        return getattr(importlib.import_module(mod), fn)

    def module(self):
        return importlib.import_module(self.builder.split(":")[0])


COMPONENTS: dict[str, ComponentSpec] = {
    "p3sam": ComponentSpec(
        "p3sam", "turbopart.p3sam.model:build",
        "partgen.bbox_estimator.auto_mask_api.AutoMask",
        {"ckpt_path": "checkpoints/p3sam.ckpt"}, strip_prefix="dit."),
    "model": ComponentSpec(
        "model", "turbopart.xpart.dit:build",
        "partgen.models.partformer_dit.PartFormerDITPlain"),
    "shapevae": ComponentSpec(
        "shapevae", "turbopart.xpart.vae:build",
        "partgen.models.autoencoders.VolumeDecoderShapeVAE"),
    "conditioner": ComponentSpec(
        "conditioner", "turbopart.xpart.conditioner:build",
        "partgen.models.conditioner.condioner_release.Conditioner"),
    "scheduler": ComponentSpec(
        "scheduler", "turbopart.xpart.scheduler:build",
        "partgen.models.diffusion.schedulers.FlowMatchEulerDiscreteScheduler",
        {"num_train_timesteps": 1000}, has_weights=False),
}
WEIGHT_COMPONENTS = tuple(k for k, v in COMPONENTS.items() if v.has_weights)


def _spec(component: str) -> ComponentSpec:
    try:
        return COMPONENTS[component]
    except KeyError:
        raise CheckpointError(
            f"unknown component {component!r}; expected one of {sorted(COMPONENTS)}") from None


# --------------------------------------------------------------------------- configs

def default_config(component: str) -> dict:
    """The official ``config.json`` of ``component`` (full size)."""
    spec = _spec(component)
    mod = spec.module()
    params = dict(spec.official_params) if spec.official_params is not None \
        else dict(mod.default_params())
    return {"target": spec.official_target, "params": params}


def tiny_config(component: str) -> dict:
    """A tiny config of ``component`` for tests (official form + ``turbopart`` extras)."""
    return _spec(component).module().tiny_config()


def build(component: str, config: dict | None = None, *, skip_unused: bool = False,
          device: torch.device | str = "meta") -> nn.Module:
    """Build ``component`` (official layout) on ``device`` without loading weights."""
    fn = _spec(component).build_fn()
    with torch.device(device):
        return fn(config, skip_unused=skip_unused)


def layout(component: str, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the official state dict, from our own module definitions."""
    module = build(component, config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- directories

def locate(path: str | os.PathLike, component: str) -> Path:
    """The folder of ``component`` in ``path`` (a whole checkpoint dir or that folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return path.parent
    if (path / component).is_dir():
        return path / component
    if (path / "config.json").is_file() and (
            not _spec(component).has_weights or weight_file(path, component, missing_ok=True)):
        return path
    raise CheckpointError(f"{path}: no '{component}/' folder (expected the Hugging Face layout "
                          f"{' '.join(c + '/' for c in COMPONENTS)})")


def weight_file(folder: str | os.PathLike, component: str, *, missing_ok: bool = False
                ) -> Path | None:
    """The weight file of a component folder: safetensors first, then ``.pt``/``.ckpt``."""
    folder = Path(folder)
    spec = _spec(component)
    candidates = [folder / spec.filename] + sorted(folder.glob("*.safetensors")) \
        + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.ckpt"))
    for c in candidates:
        if c.is_file():
            return c
    if missing_ok:
        return None
    raise CheckpointError(f"{folder}: no weight file ({spec.filename}, *.safetensors, *.pt "
                          f"or *.ckpt)")


def read_config(folder: str | os.PathLike, component: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: config.json is not an object")
    return cfg


# --------------------------------------------------------------------------- files

class CheckpointFile:
    """Keys, shapes and dtypes of a checkpoint file, and tensor loading by key.

    safetensors are memory-mapped and read straight to the target device; pickled
    ``.pt``/``.ckpt`` go through ``torch.load(weights_only=True, mmap=True)`` only.
    """

    def __init__(self, path: str | os.PathLike, strip_prefix: str = ""):
        self.path = Path(path)
        self.strip_prefix = strip_prefix
        self._state: dict[str, torch.Tensor] | None = None
        self._names: dict[str, str] = {}  # our key -> key in the file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        elif self.path.suffix in (".pt", ".ckpt", ".pth", ".bin"):
            self._open_pickle()
        else:
            raise CheckpointError(f"{self.path}: unsupported weight file type")

    def _key(self, name: str) -> str:
        p = self.strip_prefix
        return name[len(p):] if p and name.startswith(p) else name

    def _open_safetensors(self) -> None:
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    key = self._key(name)
                    self._names[key] = name
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = _ST_DTYPES.get(sl.get_dtype(), None)
        except Exception as exc:  # truncated / corrupt header
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None

    def _open_pickle(self) -> None:
        try:
            obj = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(
                f"{self.path}: cannot be read with torch.load(weights_only=True) ({exc})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{self.path}: no tensor state dict inside")
        self._state = {}
        for name, t in obj.items():
            key = self._key(name)
            self._names[key] = name
            self._state[key] = t
            self.shapes[key] = tuple(t.shape)
            self.dtypes[key] = t.dtype

    def keys(self) -> list[str]:
        return list(self.shapes)

    def load(self, keys: Iterable[str], device: torch.device | str = "cpu",
             dtypes: Mapping[str, torch.dtype] | None = None, workers: int = 8
             ) -> dict[str, torch.Tensor]:
        """Read ``keys`` onto ``device`` (cast to ``dtypes[key]`` where given).

        safetensors onto CUDA are read in file order with large sequential reads, through
        pinned buffers and asynchronous copies (:class:`turbopart.runtime.loading.
        SafetensorsReader`); onto the CPU, with ``TURBOPART_LOADER=mmap`` or when that
        reader fails, through the memory-mapped ``safetensors`` API.
        """
        return self._start_load(keys, device, dtypes, workers).result()

    def _start_load(self, keys: Iterable[str], device: torch.device | str = "cpu",
                    dtypes: Mapping[str, torch.dtype] | None = None, workers: int = 8
                    ) -> "_PendingLoad":
        """Start :meth:`load` in the background; ``.result()`` waits, ``.cancel()`` drops."""
        keys = list(keys)
        device = torch.device(device)
        dtypes = dtypes or {}
        if self._state is None:
            from .runtime import loading
            if loading.loader_mode(device) == "sequential" and device.type in ("cpu", "cuda"):
                try:
                    entries = self._entries()
                    reader = loading.SafetensorsReader(
                        self.path, {k: entries[self._names[k]] for k in keys}, device,
                        dtypes, workers=workers).start()
                    return _PendingLoad(self, keys, device, dtypes, workers, reader)
                except KeyError:
                    raise
                except Exception as exc:  # pragma: no cover - depends on the system
                    _warn_fallback(self.path, exc)
        return _PendingLoad(self, keys, device, dtypes, workers, None)

    def _entries(self) -> dict[str, tuple]:
        from .runtime.prefetch import safetensors_index
        try:
            return safetensors_index(self.path)[1]
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") \
                from None

    def _load_mmap(self, keys: list[str], device: torch.device,
                   dtypes: Mapping[str, torch.dtype], workers: int
                   ) -> dict[str, torch.Tensor]:
        """The memory-mapped reader (pickles: the mmap'd ``torch.load`` state)."""
        def finish(key: str, t: torch.Tensor) -> torch.Tensor:
            want = dtypes.get(key)
            if want is not None and t.is_floating_point() and t.dtype != want:
                t = t.to(want)
            return t

        if self._state is not None:
            return {k: finish(k, self._state[k].to(device)) for k in keys}

        from safetensors import safe_open
        dev = "cpu" if device.type == "cpu" else str(device)

        def read(chunk: list[str]) -> dict[str, torch.Tensor]:
            from .runtime.loading import load_stream
            out = {}
            with load_stream(device), safe_open(str(self.path), framework="pt",
                                                device=dev) as f:
                for k in chunk:
                    out[k] = finish(k, f.get_tensor(self._names[k]))
            return out

        if workers <= 1 or len(keys) < 2 * workers:
            return read(keys)
        # Interleave big and small tensors so the threads read about equal bytes.
        order = sorted(keys, key=lambda k: -math.prod(self.shapes[k]))
        chunks = [order[i::workers] for i in range(workers)]
        out: dict[str, torch.Tensor] = {}
        with ThreadPoolExecutor(workers) as pool:
            for part in pool.map(read, chunks):
                out.update(part)
        return out


def _warn_fallback(path, exc: BaseException) -> None:
    import warnings
    warnings.warn(f"{path}: sequential reader failed ({type(exc).__name__}: {exc}); "
                  "reading through the memory-mapped safetensors API instead", RuntimeWarning,
                  stacklevel=3)


class _PendingLoad:
    """A load in flight (sequential reader) or to be done on ``result()`` (mmap reader)."""

    def __init__(self, file: CheckpointFile, keys, device, dtypes, workers, reader):
        self.file, self.keys, self.device = file, keys, device
        self.dtypes, self.workers, self.reader = dtypes, workers, reader

    def result(self) -> dict[str, torch.Tensor]:
        if self.reader is not None:
            try:
                return self.reader.result()
            except Exception as exc:
                from .runtime.memory import is_oom
                if is_oom(exc):
                    raise
                _warn_fallback(self.file.path, exc)
            finally:
                self.reader = None
        return self.file._load_mmap(self.keys, self.device, self.dtypes, self.workers)

    def cancel(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def validate(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
             where: str) -> None:
    """Raise one :class:`CheckpointError` naming every missing, unexpected, mis-shaped key."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [(k, expected[k], found[k]) for k in expected
                 if k in found and tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{where}: checkpoint does not match the official layout "
             f"({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} with a wrong shape)"]
    lines += [f"  missing:     {k} {list(expected[k])}" for k in missing]
    lines += [f"  unexpected:  {k} {list(found[k])}" for k in unexpected]
    lines += [f"  wrong shape: {k} expected {list(e)}, found {list(f)}" for k, e, f in misshaped]
    raise CheckpointError("\n".join(lines))


# --------------------------------------------------------------------------- loading

def load_component(path: str | os.PathLike, component: str, *,
                   device: torch.device | str = "cpu",
                   numerics: Numerics | str = Numerics.FAST,
                   skip_unused: bool = True,
                   dtypes: Mapping[str, torch.dtype] | None = None,
                   workers: int = 8) -> nn.Module:
    """Open, validate and load one component into a ready module (eval mode).

    The whole file is validated against the official layout (every key, every shape);
    only the tensors the inference module holds are read.
    """
    from .runtime.loading import load_stream
    with load_stream(device):
        return _load_component(path, component, device, numerics, skip_unused, dtypes,
                               workers)


def _load_component(path, component, device, numerics, skip_unused, dtypes, workers
                    ) -> nn.Module:
    spec = _spec(component)
    folder = locate(path, component)
    config = read_config(folder, component)
    module = build(component, config, skip_unused=skip_unused)
    if spec.has_weights:
        file = CheckpointFile(weight_file(folder, component), spec.strip_prefix)
        wanted = module.state_dict()
        dt = dict(param_dtypes(module, numerics, device))
        if dtypes:
            dt.update(dtypes)
        # The reads start before the whole-file validation (an extra build of the full
        # module when skip_unused): it runs while the disk works.
        shapes_ok = all(k in file.shapes and tuple(file.shapes[k]) == tuple(v.shape)
                        for k, v in wanted.items())
        pending = file._start_load(wanted.keys(), device, dt, workers=workers) \
            if shapes_ok else None
        try:
            expected = layout(component, config) if skip_unused else \
                {k: tuple(v.shape) for k, v in wanted.items()}
            validate(expected, file.shapes, str(file.path))
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise
        if pending is None:
            pending = file._start_load(wanted.keys(), device, dt, workers=workers)
        tensors = pending.result()
        module.load_state_dict(tensors, strict=True, assign=True)
    if isinstance(module, nn.Module):
        finish_module(module, device)
    from .runtime import prefetch
    prefetch.mark_ready()
    return module


def finish_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Create non-persistent buffers, check nothing is left on meta, eval mode."""
    for m in module.modules():
        fn = getattr(m, "reset_non_persistent", None)
        if fn is not None:
            fn(torch.device(device))
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left unloaded: {left[:10]}")
    return module.eval()


# --------------------------------------------------------------------------- random weights

def storage_dtype(component: str, key: str) -> torch.dtype:
    """dtype of ``key`` in the official released files (spec xpart §1.1)."""
    if component == "p3sam":
        return torch.float32
    if component == "conditioner":
        return torch.float32 if key.startswith("seg_feat_encoder.") else torch.bfloat16
    return torch.bfloat16


def _norm_keys(module: nn.Module) -> set[str]:
    keys = set()
    for name, m in module.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or \
                type(m).__name__ in ("RMSNorm", "LayerNorm") or getattr(m, "is_norm", False):
            for p, _ in m.named_parameters(recurse=False):
                keys.add(f"{name}.{p}" if name else p)
    return keys


#: Realistic init (shared/bench/realistic-init.md): "static blob" geometry decoder.
REALISTIC_A, REALISTIC_C0, REALISTIC_S = 100.0, 2.7, 0.4


def _apply_realistic(component: str, sd: dict[str, torch.Tensor]) -> None:
    if component != "shapevae":
        return
    w = sd["geo_decoder.query_proj.weight"]
    nf = (w.shape[1] - 3) // 6  # num_freqs
    w[0].zero_()
    for a in range(3):  # cos(2^1 * x_a) columns
        w[0, 3 + 3 * nf + nf * a + 1] = REALISTIC_A
    sd["geo_decoder.query_proj.bias"][0] = -REALISTIC_A * REALISTIC_C0
    sd["geo_decoder.cross_attn_decoder.attn.c_proj.weight"][0].zero_()
    sd["geo_decoder.cross_attn_decoder.mlp.c_proj.weight"][0].zero_()
    ow = sd["geo_decoder.output_proj.weight"]
    ow.zero_()
    ow[0, 0] = REALISTIC_S
    sd["geo_decoder.output_proj.bias"].zero_()


def _plain_fill_(t: torch.Tensor, key: str, norms: set[str], std: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The plain init of one tensor: norm weights 1 / norm biases 0, other biases 0, every
    other tensor (Linear, sparse conv, MoE gate, part_embed, mask_token) N(0, std²)."""
    leaf = key.rsplit(".", 1)[-1]
    if key in norms:
        return t.fill_(1.0 if leaf == "weight" else 0.0)
    if leaf == "bias":
        return t.zero_()
    return t.normal_(0.0, std, generator=generator)


def materialize_random(module: nn.Module, device: torch.device | str = "cpu", *,
                       dtypes: Mapping[str, torch.dtype] | None = None, std: float = 0.02,
                       seed: int = 0, generator: torch.Generator | None = None,
                       requires_grad: bool = False) -> nn.Module:
    """Give ``module`` (built on meta, or real) plain random weights on ``device``, in place.

    The rule of :func:`random_state_dict`; each tensor is drawn in fp32 from ``generator``
    (default: a generator on ``device`` seeded with ``seed``) and stored as ``dtypes[key]``
    (default fp32).  For benchmarks and tests that need no weight directory.
    """
    device = torch.device(device)
    norms = _norm_keys(module)
    gen = generator if generator is not None else \
        torch.Generator(device=device).manual_seed(seed)
    draw_dev = gen.device
    dtypes = dtypes or {}
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                key = f"{mod_name}.{name}" if mod_name else name
                t = torch.empty(p.shape, dtype=torch.float32, device=draw_dev)
                _plain_fill_(t, key, norms, std, gen)
                setattr(mod, name, nn.Parameter(
                    t.to(device=device, dtype=dtypes.get(key, torch.float32)),
                    requires_grad=requires_grad))
    return finish_module(module, device)


def random_state_dict(component: str, config: dict | None = None, *, init: str = "plain",
                      seed: int = 0, device: torch.device | str = "cpu",
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tensors in the official layout and storage dtypes.

    ``plain``: weights N(0, std²), biases 0, norm weights 1, norm biases 0 (the init of the
    official baseline).  ``realistic``: ``plain`` plus the static-blob geometry decoder of
    ``shared/bench/realistic-init.md`` (shapevae only).
    """
    if init not in ("plain", "realistic"):
        raise ValueError(f"init must be 'plain' or 'realistic', got {init!r}")
    module = build(component, config)
    norms = _norm_keys(module)
    gen = torch.Generator(device=device).manual_seed(
        seed * 1000003 + sorted(COMPONENTS).index(component))
    out: dict[str, torch.Tensor] = {}
    for key, meta in module.state_dict().items():
        t = torch.empty(meta.shape, dtype=torch.float32, device=device)
        out[key] = _plain_fill_(t, key, norms, std, gen).to(storage_dtype(component, key))
    if init == "realistic":
        _apply_realistic(component, out)
    return out


def write_random(out_dir: str | os.PathLike, *, tiny: bool = False, init: str = "plain",
                 seed: int = 0, components: Iterable[str] | None = None,
                 device: torch.device | str = "cpu", progress: bool = False) -> Path:
    """Write a random-weight directory in the official Hugging Face layout."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comps = list(components) if components is not None else list(COMPONENTS)
    with open(out / "config.json", "w") as f:
        json.dump({"Name": ["Hunyuan3D-Part"]}, f)
    for comp in comps:
        spec = _spec(comp)
        cfg = tiny_config(comp) if tiny else default_config(comp)
        folder = out / comp
        folder.mkdir(exist_ok=True)
        if spec.has_weights:
            if progress:
                print(f"  writing {comp} ({'tiny' if tiny else 'full size'}, {init})", flush=True)
            sd = random_state_dict(comp, cfg, init=init, seed=seed, device=device)
            tmp = folder / (spec.filename + ".part")
            save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(tmp),
                      metadata={"format": "pt", "turbopart_init": init, "seed": str(seed)})
            os.replace(tmp, folder / spec.filename)
            del sd
        with open(folder / "config.json", "w") as f:
            json.dump(cfg, f, indent=2)
    return out


# --------------------------------------------------------------------------- checking

def check_dir(path: str | os.PathLike, components: Iterable[str] | None = None
              ) -> dict[str, str]:
    """Validate every component present in ``path``; raise on the first bad one.

    Returns ``{component: summary}`` for the components checked.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    comps = list(components) if components else [c for c in COMPONENTS if (path / c).is_dir()]
    if not comps:
        raise CheckpointError(f"{path}: no component folders ({', '.join(COMPONENTS)})")
    report = {}
    for comp in comps:
        spec = _spec(comp)
        folder = locate(path, comp)
        config = read_config(folder, comp)
        if not spec.has_weights:
            build(comp, config)  # validates the config
            report[comp] = "config ok"
            continue
        expected = layout(comp, config)
        file = CheckpointFile(weight_file(folder, comp), spec.strip_prefix)
        validate(expected, file.shapes, str(file.path))
        n = sum(math.prod(s) for s in file.shapes.values())
        dts = sorted({str(d).replace("torch.", "") for d in file.dtypes.values()})
        report[comp] = f"{len(file.shapes)} tensors, {n / 1e6:.1f} M parameters, {'/'.join(dts)}"
    return report


# --------------------------------------------------------------------------- resolution

def resolve(weights: str | os.PathLike | None = None, *, download: bool = False,
            progress: bool = True) -> Path:
    """Find the weight directory: ``weights``, ``$TURBOPART_WEIGHTS``, the Hugging Face cache,
    then (only with ``download``) a download of ``tencent/Hunyuan3D-Part``."""
    for cand, origin in ((weights, "--weights"), (os.environ.get("TURBOPART_WEIGHTS"),
                                                  "TURBOPART_WEIGHTS")):
        if cand:
            p = Path(cand).expanduser()
            if not p.exists():
                raise CheckpointError(f"{origin}={cand}: no such directory")
            return p
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(HF_REPO_ID, local_files_only=True))
    except Exception:
        pass
    if download:
        return fetch(progress=progress)
    raise CheckpointError(
        "no Hunyuan3D-Part weights found. Get them with one of:\n"
        f"  turbopart weights download            (downloads {HF_REPO_ID}, about 9.5 GB)\n"
        f"  huggingface-cli download {HF_REPO_ID} --local-dir DIR, then --weights DIR\n"
        "  or set TURBOPART_WEIGHTS=DIR.  The weights are Tencent's, under their license.\n"
        "For benchmarking without them: --weights random (full-size random weights; the "
        "output is noise).")


def fetch(local_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Download ``tencent/Hunyuan3D-Part`` with ``huggingface_hub`` (into ``local_dir``, or the
    Hugging Face cache), showing its progress bars; then validate what arrived."""
    from huggingface_hub import snapshot_download
    if progress:
        print(f"downloading {HF_REPO_ID} (about 9.5 GB; Tencent's weights, under their "
              f"license) ...", flush=True)
    try:
        path = Path(snapshot_download(HF_REPO_ID, local_dir=None if local_dir is None
                                      else str(local_dir)))
    except Exception as exc:
        raise CheckpointError(f"download of {HF_REPO_ID} failed: {exc}") from None
    check_dir(path)
    return path
