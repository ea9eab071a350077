"""fastinterp's compute kernels (installed as `fastinterp.kernels`).

One file per kernel, its Triton (GPU) and torch/Numba (CPU) forms side by side; the
dispatch rule lives in `dispatch.py`. Nothing here knows about CLIP.
"""
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    HAS_NUMBA,
    HAS_TRITON,
    available_backends,
    choose_backend,
    last_backend,
    triton_interpreting,
)
from .normalize import l2_normalize_rows

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "HAS_NUMBA",
    "HAS_TRITON",
    "available_backends",
    "choose_backend",
    "last_backend",
    "triton_interpreting",
    "l2_normalize_rows",
]
