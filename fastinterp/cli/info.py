"""`fastinterp info`: versions, kernel backends, device, cache folder."""
from __future__ import annotations

import importlib
import os
import platform


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
    print(f"{K.ENV_VAR}:", os.environ.get(K.ENV_VAR, "(unset: automatic)"))
    if torch.cuda.is_available():
        print("device: cuda,", torch.cuda.get_device_name(0))
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads); no CUDA GPU")
    print("concept cache:", default_cache_dir())
    return 0


def cmd_aot(args) -> int:
    from ..kernels import aot

    try:
        archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"--arch {args.arch!r}: give compute capabilities such as 80,90") from None
    return aot.run(archs, args.only, as_json=args.json)


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, available kernel backends, device")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 without a GPU; registers, spills, "
                                   "shared memory")
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default: 80,90)")
    p.add_argument("--only", default=None, help="keep kernels whose module or name contains this")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.set_defaults(func=cmd_aot)
