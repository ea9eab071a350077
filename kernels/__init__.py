"""fastinterp's compute kernels (installed as `fastinterp.kernels`).

One file per kernel, its Triton (GPU) and torch/Numba (CPU) forms side by side with their
table `FORMS` (registered with `dispatch`); the one rule that picks a form, and the one
place the environment is read, live in `dispatch.py`. Nothing here knows about CLIP.
"""
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    ENV_VARS,
    HAS_NUMBA,
    HAS_TRITON,
    REGISTRY,
    Form,
    available_backends,
    available_forms,
    choose_backend,
    environment,
    last_backend,
    triton_interpreting,
)
from .normalize import l2_normalize_rows

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ENV_VARS",
    "HAS_NUMBA",
    "HAS_TRITON",
    "REGISTRY",
    "Form",
    "available_backends",
    "available_forms",
    "choose_backend",
    "environment",
    "last_backend",
    "triton_interpreting",
    "l2_normalize_rows",
]
