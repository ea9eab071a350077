"""The one rule that picks a kernel implementation ("form"), and the table of forms.

Every kernel module declares its forms beside its code, in a table registered here:

    FORMS = {"l2_normalize_rows": register("l2_normalize_rows",
                                           triton_form(_l2_triton), torch_form(_l2_torch))}

A `Form` is a name ("torch", "triton", "numba", or a variant such as "torch-bf16-screen"),
the function implementing it, the device its inputs may live on ("cpu", "cuda", "any") and
what it needs to run (Triton, Numba, native bf16 dot products). The first word of the name
is the form's *backend* ("torch-bf16-screen" is a torch form). `choose_backend(kernel,
tensors, backend=...)` is the only way a form is picked, for each call:

1. an explicit `backend=` argument wins: a backend ("torch" | "triton" | "numba") or an
   exact form name ("torch-bf16-screen"); a ValueError if the kernel has no such form;
2. else `FASTINTERP_BACKEND=torch|triton|numba`, where the kernel has that backend (a
   kernel without it ignores it; any other value is a ValueError);
3. else Triton when the inputs are CUDA tensors and Triton imports, the kernel's CPU (or
   any-device) form otherwise.

Within the chosen backend, a *variant* form (one with a switch, e.g. "torch-bf16-screen")
replaces the plain form when the call's inputs allow it (the kernel passes it in
`variants`), it is available here (on this device, its probe passes) and its switch is on:
the call's own argument (e.g. `screen=`) > the variant's environment variable
(`FASTINTERP_PURSUIT_SCREEN=0|1`) > the call's default (e.g. M >= 2048 atoms). Named
explicitly in `backend=`, a variant runs or raises a RuntimeError saying why it cannot.

A picked form that cannot run raises a RuntimeError naming what is missing: Triton not
installed, Triton on CPU tensors without `TRITON_INTERPRET=1` (set before import: that is
how the tests run every Triton kernel without a GPU), Numba not installed, a CPU-only form
given CUDA tensors. The form that ran is recorded under the kernel's name in
`last_backend` (the exact form name, e.g. "torch-bf16-screen"), for logs and benchmarks.

Environment variables are read in one place, `env_value` (the list is `ENV_VARS`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

__all__ = [
    "BACKENDS", "ENV_VAR", "ENV_VARS", "Form", "HAS_NUMBA", "HAS_TRITON", "REGISTRY",
    "available_backends", "available_forms", "choose_backend", "env_value", "environment",
    "last_backend", "numba_form", "register", "torch_form", "triton_form", "triton_interpreting",
]

BACKENDS = ("torch", "triton", "numba")
ENV_VAR = "FASTINTERP_BACKEND"
DEVICES = ("cpu", "cuda", "any")

log = logging.getLogger("fastinterp.kernels")

last_backend: dict[str, str] = {}
"""kernel name -> the form its most recent call ran (e.g. "torch-bf16-screen")."""

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
except ImportError:  # the Numba forms (MI, Sinkhorn) then raise when called
    numba = None
    HAS_NUMBA = False


# --------------------------------------------------------------------------------------
# Environment: the one place it is read
# --------------------------------------------------------------------------------------
ENV_VARS = {
    ENV_VAR: "torch | triton | numba: the backend of every kernel that has it (rule 2)",
    "FASTINTERP_PURSUIT_SCREEN": "0 | 1: the pursuit's bf16-screened CPU form off / on "
                                 "(when the call allows it and passes no screen=)",
    "TRITON_INTERPRET": "1: Triton kernels run in the interpreter on CPU tensors "
                        "(must be set before triton is imported)",
    "TRITON_PTXAS_PATH": "ptxas used by the ahead-of-time compile check (aot.py)",
}
"""Every environment variable the kernels read, with its meaning."""


def env_value(name: str) -> str:
    """The stripped value of environment variable `name` ("" when unset): the only place
    the kernels read the environment (read per call, so a change takes effect at once)."""
    return os.environ.get(name, "").strip()


def environment() -> dict[str, str]:
    """The current value of every variable in `ENV_VARS` ("" when unset), for logs."""
    return {name: env_value(name) for name in ENV_VARS}


def _env_backend() -> str:
    env = env_value(ENV_VAR).lower()
    if env and env not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r}: choose one of {BACKENDS} (or unset it)")
    return env


def _env_switch(name: str) -> bool | None:
    """A variant's 0/1 switch: True, False, or None (unset or another value)."""
    value = env_value(name)
    return value == "1" if value in ("0", "1") else None


def triton_interpreting() -> bool:
    return env_value("TRITON_INTERPRET") not in ("", "0")


# --------------------------------------------------------------------------------------
# Forms and the registry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Form:
    """One implementation of a kernel.

    name: "torch" | "triton" | "numba", or "<backend>-<variant>" (e.g. "torch-bf16-screen").
    fn: the function implementing it (its signature is the kernel module's business).
    device: where its inputs may live: "cpu", "cuda" (Triton: CPU tensors too under
        TRITON_INTERPRET=1) or "any".
    needs: what it needs besides the device, for error messages ("" when nothing).
    check: returns whether `needs` is met here (None: always).
    switch_env: variants only: the environment variable that turns it on/off (may be None).
    variant: True for a form that replaces its backend's plain form only when switched on.
    """

    name: str
    fn: Callable
    device: str = "any"
    needs: str = ""
    check: Callable[[], bool] | None = None
    switch_env: str | None = None
    variant: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"form {self.name!r}: its name must start with one of {BACKENDS}")
        if self.device not in DEVICES:
            raise ValueError(f"form {self.name!r}: device must be one of {DEVICES}")
        if self.variant == (self.name in BACKENDS):
            raise ValueError(f"form {self.name!r}: a variant is named '<backend>-<variant>', "
                             f"a plain form by its backend")

    @property
    def backend(self) -> str:
        return self.name.split("-", 1)[0]

    def available(self) -> bool:
        """Whether its requirement (`needs`) is met here; the device is checked per call."""
        return self.check is None or bool(self.check())


def torch_form(fn: Callable, *, device: str = "any") -> Form:
    """The torch form: runs on whatever device its inputs are on."""
    return Form("torch", fn, device=device)


def triton_form(fn: Callable) -> Form:
    """The Triton form: CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)."""
    return Form("triton", fn, device="cuda", needs="Triton", check=lambda: HAS_TRITON)


def numba_form(fn: Callable) -> Form:
    """The Numba form: CPU arrays, needs numba importable."""
    return Form("numba", fn, device="cpu", needs="numba", check=lambda: HAS_NUMBA)


@dataclass(frozen=True)
class _Table:
    forms: dict[str, Form]           # form name -> form
    plain: dict[str, Form]           # backend -> its plain form
    variants: dict[str, list[Form]]  # backend -> its variant forms
    cuda: Form | None                # the device default on CUDA inputs
    cpu: Form                        # the device default otherwise


REGISTRY: dict[str, _Table] = {}
"""kernel name -> its table of forms (filled by `register` as kernel modules import)."""


def register(kernel: str, *forms: Form) -> dict[str, Form]:
    """Declare `kernel`'s forms; returns them as {form name: Form} (the module's table)."""
    table = {f.name: f for f in forms}
    if len(table) != len(forms):
        raise ValueError(f"kernel {kernel!r}: two forms share a name")
    plain = {f.backend: f for f in forms if not f.variant}
    variants: dict[str, list[Form]] = {}
    for f in forms:
        if f.variant:
            if f.backend not in plain:
                raise ValueError(f"kernel {kernel!r}: variant {f.name!r} has no plain {f.backend!r} form")
            variants.setdefault(f.backend, []).append(f)
    cuda = next((f for f in plain.values() if f.device == "cuda"), None)
    cpu = next((f for f in plain.values() if f.device == "cpu"), None) \
        or next((f for f in plain.values() if f.device == "any"), None)
    if cpu is None:
        raise ValueError(f"kernel {kernel!r}: needs a form that runs on CPU inputs")
    REGISTRY[kernel] = _Table(table, plain, variants, cuda, cpu)
    return table


_ADHOC: dict[tuple, _Table] = {}


def _adhoc_table(kernel: str, cpu: str, gpu: str | None) -> _Table:
    """The table of an unregistered kernel described by `cpu=` / `gpu=` (the pre-registry
    call form, kept working): a "torch" form runs anywhere, "numba" on the CPU."""
    key = (kernel, cpu, gpu)
    table = _ADHOC.get(key)
    if table is None:
        makers = {"torch": torch_form, "numba": numba_form, "triton": triton_form}
        forms = [makers[cpu](None)] + ([makers[gpu](None)] if gpu else [])
        name = f"\0adhoc:{kernel}:{cpu}:{gpu}"
        register(name, *forms)
        table = _ADHOC[key] = REGISTRY.pop(name)
    return table


# --------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------
def _pick(kernel: str, table: _Table, on_cuda: bool, backend: str | None,
          variants: Mapping[str, tuple[bool | None, bool]] | None) -> Form:
    forced = None
    if backend is not None:
        if backend in table.forms:
            form = table.forms[backend]
            if form.variant:
                forced, form = form, table.plain[form.backend]
        elif backend in BACKENDS:
            raise ValueError(f"kernel {kernel!r} has no {backend!r} form; it has {sorted(table.forms)}")
        else:
            known = sorted(set(BACKENDS) | set(table.forms))
            raise ValueError(f"backend={backend!r}: choose one of {BACKENDS} (this kernel's forms: "
                             f"{sorted(table.forms)}; known: {known})")
    else:
        env = _env_backend()
        if env in table.plain:
            form = table.plain[env]
        elif on_cuda and table.cuda is not None and HAS_TRITON:
            form = table.cuda
        else:
            form = table.cpu
    if forced is not None:
        if variants is None or forced.name not in variants:
            raise RuntimeError(f"kernel {kernel!r}: form {forced.name!r} does not apply to this call's "
                               f"inputs; use backend={forced.backend!r}")
        if (forced.device == "cpu" and on_cuda) or not forced.available():
            raise RuntimeError(f"kernel {kernel!r}: form {forced.name!r} needs {forced.needs or 'CPU inputs'}"
                               f"{' on CPU inputs' if forced.device == 'cpu' else ''}, which this machine "
                               f"or call does not give; use backend={forced.backend!r}")
        return forced
    if variants:
        for v in table.variants.get(form.backend, ()):
            if v.name not in variants:
                continue
            explicit, default = variants[v.name]
            on = explicit if explicit is not None else None
            if on is None and v.switch_env:
                on = _env_switch(v.switch_env)
            if on is None:
                on = default
            if on and not (v.device == "cpu" and on_cuda) and v.available():
                return v
    return form


def _check_runs(kernel: str, form: Form, on_cuda: bool) -> None:
    if form.backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"kernel {kernel!r}: Triton is not installed; use backend='torch'")
        if not on_cuda and not triton_interpreting():
            raise RuntimeError(
                f"kernel {kernel!r}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"importing fastinterp to run the interpreter on the CPU"
            )
    elif form.device == "cpu" and on_cuda:
        raise RuntimeError(f"kernel {kernel!r}: the {form.name!r} form runs on CPU arrays; move the "
                           f"inputs to the CPU")
    elif not form.available():
        raise RuntimeError(f"kernel {kernel!r}: the {form.name!r} form needs {form.needs}, which is not "
                           f"available here (see fastinterp.kernels.available_backends())")


def choose_backend(kernel: str, tensors=(), *, backend: str | None = None,
                   variants: Mapping[str, tuple[bool | None, bool]] | None = None,
                   cpu: str | None = None, gpu: str | None = "triton") -> str:
    """Pick, check and record the form for one call of `kernel`; returns its name (look the
    function up in the kernel's table: `FORMS[kernel][name].fn`).

    Args:
        kernel: a registered kernel name (also the key in `last_backend`).
        tensors: the call's inputs (CUDA tensors among them drive the automatic choice).
        backend: explicit request: a backend or an exact form name; None: automatic.
        variants: the variant forms this call's inputs allow, each mapped to (the call's
            switch: True / False / None = not given, the call's default when neither the
            switch nor the variant's environment variable decides).
        cpu, gpu: only for a kernel that is not registered: its CPU form ("torch" or
            "numba") and GPU form ("triton" or None).
    """
    table = REGISTRY.get(kernel)
    if table is None:
        if cpu is None:
            raise KeyError(f"kernel {kernel!r} is not registered (known: {sorted(REGISTRY)})")
        table = _adhoc_table(kernel, cpu, gpu)
    on_cuda = False
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            on_cuda = True
            break
    form = _pick(kernel, table, on_cuda, backend, variants)
    _check_runs(kernel, form, on_cuda)
    name = form.name
    if last_backend.get(kernel) != name:
        log.debug("kernel %s -> %s", kernel, name)
        last_backend[kernel] = name
    return name


def available_backends() -> dict[str, bool]:
    """Which backends can run here: torch always; Triton when it imports and there is a GPU
    or the interpreter is on; Numba when it imports."""
    return {
        "torch": True,
        "triton": HAS_TRITON and (torch.cuda.is_available() or triton_interpreting()),
        "numba": HAS_NUMBA,
    }


def available_forms(kernel: str) -> dict[str, bool]:
    """{form name: whether it can run here} for a registered kernel (Triton as in
    `available_backends`; variants by their probe, e.g. the CPU's bf16 support)."""
    backends = available_backends()
    return {name: backends[f.backend] and f.available() for name, f in REGISTRY[kernel].forms.items()}
