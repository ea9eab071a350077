"""The `fastinterp` command line: `info`, `demo`, and one sub-command group per method."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

from .models import TINY_MODEL

METHOD_COMMANDS: tuple[str, ...] = (
    # modules with `register_cli(subparsers)`, each adding one sub-command group
    "fastinterp.sith",
    "fastinterp.mutual",
    "fastinterp.ccs",
)


def cmd_info(args) -> int:
    import numpy
    import open_clip
    import torch

    import fastinterp
    from fastinterp import kernels as K
    from fastinterp.concepts import default_cache_dir

    versions = {"fastinterp": fastinterp.__version__, "python": platform.python_version(),
                "torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": numpy.__version__}
    for name in ("triton", "numba", "ot", "pydensecrf"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except ImportError:
            versions[name] = "missing"
    print("versions:")
    for k, v in versions.items():
        print(f"  {k:12s} {v}")
    print("backends available:", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in K.available_backends().items()))
    print(f"{K.ENV_VAR}:", __import__("os").environ.get(K.ENV_VAR, "(unset: automatic)"))
    if torch.cuda.is_available():
        print("device: cuda,", torch.cuda.get_device_name(0))
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads); no CUDA GPU")
    print("concept cache:", default_cache_dir())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.output, model_name=args.model_name, pretrained=args.pretrained,
                      checkpoint=args.checkpoint, device=args.device, seed=args.seed,
                      progress=not args.quiet)
    print(f"demo report written to {report}")
    return 0


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = TINY_MODEL) -> None:
    """The model flags every command shares."""
    p.add_argument("--model-name", default=default_model, help=f"open_clip model name (default: {default_model})")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs internet); default: random weights")
    p.add_argument("--checkpoint", default=None, help="local checkpoint file with the model's weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinterp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, available kernel backends, device")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="offline demo: random-weight ViT, built-in concepts, report folder")
    add_model_args(p)
    p.add_argument("--output", default="fastinterp-out", help="output folder (default: fastinterp-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    for module in METHOD_COMMANDS:
        importlib.import_module(module).register_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, IndexError, RuntimeError) as err:
        print(f"fastinterp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
