"""When `sinkhorn` hands a call to POT itself, and the checks that run first.

`fastinterp.sinkhorn` is POT's ``ot.sinkhorn`` contract. Its Numba kernel covers the common
case (CPU arrays or tensors without autograd, one histogram b, equal masses, methods
"sinkhorn" / "sinkhorn_log", no solver keywords); every other call POT accepts is passed to ``ot.sinkhorn`` unchanged, so the
answer and the warnings are POT's: other `method=` values, b with several columns (a loss
per column comes back), torch tensors that require grad (a differentiable plan) or live on
a GPU, unequal masses (POT warns that it did not converge and returns its plan), extra
keywords for POT's solvers.

Before either, `check_call` refuses, with a ValueError saying what and where, the inputs
for which POT returns NaN or a meaningless plan: NaN / infinite costs or weights, negative
weights, reg <= 0, mismatched shapes, costs so negative that exp(-M / reg) overflows.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .sinkhorn_checks import check_cost_shape

POT_ONLY_METHODS = ("greenkhorn", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling")
_EXP_LIMIT = 700.0  # exp(700) ~ 1e304: beyond it exp(-M / reg) overflows float64


def _numpy_view(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").numpy()
    if x is None:
        raise TypeError(f"{name} is None: pass an array ({name}=[] for uniform weights)")
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} of objects")
    return arr


def _check_weights(x: np.ndarray, name: str, size: int, allow_columns: bool) -> None:
    if x.size == 0:
        return
    if x.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
    ok_shape = x.ndim == 1 or (allow_columns and x.ndim == 2)
    if not ok_shape:
        raise ValueError(f"{name} must be 1-D (a histogram){' or (m, k) histograms' if allow_columns else ''}, "
                         f"got shape {x.shape}")
    if x.shape[0] != size:
        raise ValueError(f"{name} has {x.shape[0]} entries but M has {size} "
                         f"{'rows' if name == 'a' else 'columns'}: shape mismatch")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if (x < 0).any():
        raise ValueError(f"{name} has negative entries: marginals are non-negative weights")


def check_call(a, b, M, reg) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Numpy views of (a, b, M) and reg as a float, after the checks every call gets."""
    M_np = _numpy_view(M, "M")
    n, m = check_cost_shape(M_np)
    if not np.isfinite(M_np).all():
        raise ValueError("M contains NaN or infinity")
    a_np, b_np = _numpy_view(a, "a"), _numpy_view(b, "b")
    _check_weights(a_np, "a", n, False)
    _check_weights(b_np, "b", m, True)
    if isinstance(reg, torch.Tensor):
        reg = reg.item()
    if isinstance(reg, bool) or not isinstance(reg, numbers.Real):
        raise TypeError(f"reg must be a number, got {reg!r}")
    reg = float(reg)
    if not (reg > 0.0 and math.isfinite(reg)):
        raise ValueError(f"reg={reg!r} must be a finite number > 0 (POT returns NaN for reg = 0)")
    return a_np, b_np, M_np, reg


def pot_reason(a, b, M, a_np, b_np, M_np, reg: float, method: str, kwargs: dict, masses_match) -> str | None:
    """Why this call goes to POT (None: the Numba kernel computes POT's answer)."""
    if method in POT_ONLY_METHODS:
        return f"method={method!r}"
    if kwargs:
        return f"solver keywords {sorted(kwargs)}"
    tensors = [x for x in (a, b, M) if isinstance(x, torch.Tensor)]
    if any(t.requires_grad for t in tensors):
        return "autograd"
    if any(t.device.type != "cpu" for t in tensors):
        return "GPU tensors"
    if b_np.ndim == 2:
        return "several histograms b"
    if not masses_match(a_np, b_np, M_np):
        return "unequal masses"
    return None


def check_overflow(M_np: np.ndarray, reg: float, method: str) -> None:
    """exp(-M / reg) overflowing float64 makes POT's plan infinite (it warns 'numerical errors'
    and returns u K v with K = inf): refused, with the fix, instead."""
    if method != "sinkhorn_log" and -float(M_np.min()) / reg > _EXP_LIMIT:
        raise ValueError(f"exp(-M / reg) overflows float64 (min(M) / reg = {float(M_np.min()) / reg:.3g}): POT "
                         f"returns an infinite plan here. Pass M - M.min() (the plan does not change when a "
                         f"constant is added to M) or method='sinkhorn_log'")


def call_pot(a, b, M, reg, method, numItermax, stopThr, verbose, log, warn, warmstart, kwargs):
    """POT's ``ot.sinkhorn`` on the call as given."""
    import ot

    if method == "sinkhorn_knopp":  # our alias; POT's ot.sinkhorn calls it "sinkhorn"
        method = "sinkhorn"
    out = ot.sinkhorn(a, b, M, reg, method=method, numItermax=numItermax, stopThr=stopThr, verbose=verbose,
                      log=log, warn=warn, warmstart=warmstart, **kwargs)
    plan = out[0] if log else out
    values = plan.detach().cpu().numpy() if isinstance(plan, torch.Tensor) else np.asarray(plan)
    if not np.isfinite(values).all():  # POT's solvers return inf / NaN where exp(-M / reg) under/overflows
        raise ValueError(f"ot.sinkhorn(method={method!r}) returned a plan with NaN or infinity: exp(-M / reg) "
                         f"under/overflows for these costs (M / reg spans {float(np.min(M_np_of(M))) / reg:.3g} .. "
                         f"{float(np.max(M_np_of(M))) / reg:.3g}); use a larger reg or method='sinkhorn_log'")
    return out


def M_np_of(M) -> np.ndarray:
    return M.detach().cpu().numpy() if isinstance(M, torch.Tensor) else np.asarray(M, dtype=np.float64)
