"""The ``turbopart`` command line."""
from __future__ import annotations

import argparse
import os
import sys

from .runtime.switches import switch

EPILOG = """\
The weights are Tencent's (tencent/Hunyuan3D-Part, under their license) and are downloaded
by you: `turbopart weights download`, or pass --weights DIR / set TURBOPART_WEIGHTS.
"""


class UserError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


def parse_device(spec: str | None):
    """``--device``: None → cuda when available, else cpu; a clear error for bad values."""
    import torch
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec}: not a device (use cuda, cuda:N or cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: no CUDA device is available here (use --device cpu)")
    return dev


def add_runtime_options(p: argparse.ArgumentParser, *, numerics: bool = True,
                        exact_help: str = "the official arithmetic",
                        fast_help: str = "turbopart's bf16 kernels (default)") -> None:
    """``--device`` and (with ``numerics``) ``--exact | --fast``, the same on every command."""
    p.add_argument("--device", default=None, metavar="cuda|cpu",
                   help="device (default: cuda when available, else cpu)")
    if numerics:
        num = p.add_mutually_exclusive_group()
        num.add_argument("--exact", dest="numerics", action="store_const", const="exact",
                         help=exact_help)
        num.add_argument("--fast", dest="numerics", action="store_const", const="fast",
                         help=fast_help)
        p.set_defaults(numerics="fast")


def _cmd_weights_random(args) -> int:
    from . import weights
    print(f"writing {'tiny' if args.tiny else 'full-size'} random weights "
          f"(init {args.init}, seed {args.seed}) to {args.out}", flush=True)
    weights.write_random(args.out, tiny=args.tiny, init=args.init, seed=args.seed,
                         device=args.device, progress=True)
    print("done: this directory holds RANDOM weights; outputs made with it are noise")
    return 0


def _cmd_weights_check(args) -> int:
    from . import weights
    report = weights.check_dir(args.dir)
    for comp, summary in report.items():
        print(f"{comp:<12} ok   {summary}")
    return 0


def _cmd_weights_download(args) -> int:
    from . import weights
    path = weights.fetch(args.local_dir)
    print(f"weights ready in {path}  (use --weights {path} or set TURBOPART_WEIGHTS)")
    return 0


def _cmd_golden(args) -> int:
    from . import golden
    results = golden.run_dir(args.dir)
    print(golden.format_table(results, verbose=args.verbose))
    return 0 if all(all(c.ok for c in checks) for checks in results.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="turbopart",
        description="turbopart: fast Hunyuan3D-Part (P3-SAM segmentation + X-Part generation).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("weights", help="create, check or download checkpoint directories")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION")
    r = wsub.add_parser("random", help="write random weights in the official layout "
                        "(for tests and benchmarks; outputs are noise)")
    r.add_argument("--out", required=True, help="directory to write")
    r.add_argument("--tiny", action="store_true", help="tiny test configuration")
    r.add_argument("--init", choices=["plain", "realistic"], default="plain",
                   help="plain: N(0, 0.02^2) weights (the official baseline's init); "
                        "realistic: plus a geometry decoder that does trained-like work")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu", help="device that draws the numbers")
    r.set_defaults(func=_cmd_weights_random)
    c = wsub.add_parser("check", help="validate a checkpoint directory against the "
                        "official layout")
    c.add_argument("dir")
    c.set_defaults(func=_cmd_weights_check)
    d = wsub.add_parser("download", help="download tencent/Hunyuan3D-Part from Hugging Face")
    d.add_argument("--local-dir", default=None, metavar="DIR",
                   help="download into DIR (default: the Hugging Face cache)")
    d.set_defaults(func=_cmd_weights_download)

    g = sub.add_parser("golden", help="run the official reference cases and print a "
                       "pass/fail table")
    g.add_argument("dir", help="folder of <case>.json + <case>.safetensors (or one case)")
    g.add_argument("-v", "--verbose", action="store_true", help="one line per output")
    g.set_defaults(func=_cmd_golden)

    _register_product_commands(sub)
    return p


def _register_product_commands(sub) -> None:
    """Commands defined beside the pipeline code (segment, generate, run, bench, ...)."""
    from .commands import register
    from .xpart.commands import register as register_xpart
    register(sub)
    register_xpart(sub)


def _bytecode_cache() -> None:
    """Cache the byte-code of the imports where the install has none
    (:mod:`turbopart.runtime.bytecode`; ``TURBOPART_PYCACHE=0`` switches it off)."""
    try:
        from .runtime import bytecode
        bytecode.enable()
    except Exception:  # a cache must never stop the command
        pass


def _early_prefetch(argv: list[str] | None):
    """Start the read-ahead of the weights (and of the libraries torch is about to map) for
    the commands that load models, before anything heavy is imported
    (:mod:`turbopart.runtime.prefetch`; ``TURBOPART_PREFETCH=0`` switches it off)."""
    try:
        from .runtime import prefetch
        args = list(sys.argv[1:] if argv is None else argv)
        if any(a in ("-h", "--help") for a in args):
            return None
        cmd = next((a for a in args if not a.startswith("-")), None)
        comps = prefetch.COMMAND_COMPONENTS.get(cmd)
        if comps is None:
            return None
        spec = None
        for i, a in enumerate(args):
            if a == "--weights" and i + 1 < len(args):
                spec = args[i + 1]
            elif a.startswith("--weights="):
                spec = a.split("=", 1)[1]
        return prefetch.start(prefetch.find_weights(spec), comps)
    except Exception:  # a read-ahead must never stop the command
        return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command-line process itself (not an in-process call)
        _bytecode_cache()
        _early_prefetch(sys.argv[1:])
        _exit_now(_main(None))
    return _main(argv)


def _exit_now(code: int) -> None:
    """End the command-line process once its work is done and its files are closed: run
    the ``atexit`` handlers, flush, and skip the interpreter's teardown (freeing every
    module, tensor and the CUDA context one object at a time adds about a second after a
    model run).  ``TURBOPART_FAST_EXIT=0`` keeps the normal exit."""
    if not switch("TURBOPART_FAST_EXIT"):
        sys.exit(code)
    import atexit
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the status
                pass
        os._exit(code)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .weights import CheckpointError
    try:
        return int(args.func(args) or 0)
    except (UserError, CheckpointError, FileNotFoundError, ValueError) as exc:
        msg = str(exc).strip() or type(exc).__name__
        print(f"turbopart: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbopart: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
