"""The one rule that picks a kernel implementation.

Each kernel has a GPU form (Triton) and a CPU form (torch or Numba). The rule:

1. an explicit `backend=` argument wins (an error if the kernel has no such form);
2. else `FASTINTERP_BACKEND=torch|triton|numba`, where the kernel has that form;
3. else Triton when the inputs are CUDA tensors and Triton imports, the CPU form otherwise.

Triton on CPU tensors only runs under `TRITON_INTERPRET=1` (set before import): that is how
the tests check every Triton kernel on a machine without a GPU. The choice made for each
kernel is recorded in `last_backend` for logs and benchmarks.
"""
from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("torch", "triton", "numba")
ENV_VAR = "FASTINTERP_BACKEND"

log = logging.getLogger("fastinterp.kernels")

last_backend: dict[str, str] = {}
"""kernel name -> the backend its most recent call used."""

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton ships for Linux only
    triton = tl = None
    HAS_TRITON = False

try:
    import numba  # noqa: F401

    HAS_NUMBA = True
except ImportError:
    HAS_NUMBA = False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> dict[str, bool]:
    """Which backends can run here (Triton counts only with a GPU or the interpreter)."""
    return {
        "torch": True,
        "triton": HAS_TRITON and (torch.cuda.is_available() or triton_interpreting()),
        "numba": HAS_NUMBA,
    }


def choose_backend(kernel: str, tensors, *, cpu: str, gpu: str | None = "triton",
                   backend: str | None = None) -> str:
    """Pick and record the backend for one call of `kernel`.

    Args:
        kernel: name used in `last_backend` and log lines.
        tensors: the call's inputs (their devices drive the automatic choice).
        cpu: this kernel's CPU form ("torch" or "numba").
        gpu: this kernel's GPU form ("triton"), or None if it has none.
        backend: explicit request from the caller, or None.
    """
    forms = {cpu} | ({gpu} if gpu else set())
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
        if backend not in forms:
            raise ValueError(f"kernel {kernel!r} has no {backend!r} form; it has {sorted(forms)}")
        choice = backend
    else:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: choose one of {BACKENDS} (or unset it)")
        if env in forms:
            choice = env
        elif on_cuda and gpu and HAS_TRITON:
            choice = gpu
        else:
            choice = cpu
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"kernel {kernel!r}: Triton is not installed; use backend='torch'")
        if not on_cuda and not triton_interpreting():
            raise RuntimeError(
                f"kernel {kernel!r}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"importing fastinterp to run the interpreter on the CPU"
            )
    elif on_cuda and choice == "numba":
        raise RuntimeError(f"kernel {kernel!r}: the Numba form runs on CPU arrays; move the inputs to the CPU")
    if last_backend.get(kernel) != choice:
        log.debug("kernel %s -> %s", kernel, choice)
    last_backend[kernel] = choice
    return choice
