"""Input checks and status reporting shared by the Sinkhorn solvers (`sinkhorn.py`,
`sinkhorn_batch.py`): pure numpy, no Numba.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

METHODS = {"sinkhorn": 0, "sinkhorn_knopp": 0, "sinkhorn_log": 1, "reference": 2, "fixed_iterations": 2}
_OTHER_POT_METHODS = ("greenkhorn", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling")

# status codes written by the kernels
CONVERGED, NOT_CONVERGED, NUMERICAL_ERROR, BAD_COST_NONFINITE, BAD_COST_NEGATIVE = 0, 1, 2, 3, 4


def _as_array(x, name: str) -> tuple[np.ndarray, bool]:
    """numpy view/copy of x; True when it was a torch tensor."""
    if x is None:
        raise TypeError(f"{name} is None: pass a numeric array (numpy, a list, or a CPU torch tensor)")
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            raise RuntimeError(f"sinkhorn runs on the CPU (Numba): move {name} to the CPU")
        return x.detach().numpy(), True
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} holding non-numbers "
                        f"(or rows of different lengths)")
    return arr, False


def check_cost_shape(M_np: np.ndarray) -> tuple[int, int]:
    """A cost matrix must be a numeric, non-empty (n, m) array; returns (n, m)."""
    if M_np.ndim != 2:
        raise ValueError(f"M must be a 2-D cost matrix (n, m), got shape {M_np.shape}")
    if M_np.dtype.kind not in "iuf":
        raise TypeError(f"M must be numeric, got dtype {M_np.dtype}")
    n, m = M_np.shape
    if n == 0 or m == 0:
        raise ValueError(f"M has shape {M_np.shape}: need at least one row and one column")
    return n, m


def _float_dtype(*arrays) -> np.dtype:
    kinds = [x.dtype for x in arrays if x is not None and x.size and x.dtype.kind == "f"]
    return np.result_type(*kinds) if kinds else np.dtype(np.float64)


def _method_code(method) -> int:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {method!r}")
    key = method.lower()
    if key in METHODS:
        return METHODS[key]
    if key in _OTHER_POT_METHODS:
        raise NotImplementedError(f"method={method!r} is not implemented here; use 'sinkhorn', "
                                  f"'sinkhorn_log' (small reg) or ot.sinkhorn for {method!r}")
    raise ValueError(f"method={method!r}: choose one of {sorted(METHODS)}")


def _check_scalars(numItermax, stopThr) -> tuple[int, float]:
    if isinstance(numItermax, bool) or not float(numItermax).is_integer() or numItermax < 0:
        raise ValueError(f"numItermax={numItermax!r} must be an integer >= 0")
    stopThr = float(stopThr)
    if not (stopThr >= 0.0) or math.isnan(stopThr):
        raise ValueError(f"stopThr={stopThr!r} must be a number >= 0")
    return int(numItermax), stopThr


def _check_marginal(x: np.ndarray, name: str, size: int, problem: str = "") -> None:
    if x.ndim != 1:
        raise ValueError(f"{name}{problem} must be 1-D (a histogram), got shape {x.shape}"
                         + ("; for many problems use sinkhorn_batched" if x.ndim == 2 else ""))
    if x.shape[0] != size:
        raise ValueError(f"{name}{problem} has {x.shape[0]} entries but M has {size} "
                         f"{'rows' if name == 'a' else 'columns'}: shape mismatch")
    if x.dtype.kind not in "iuf":
        raise TypeError(f"{name}{problem} must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}{problem} contains NaN or infinity")
    if (x < 0).any():
        raise ValueError(f"{name}{problem} has negative entries: marginals are non-negative weights")


def _sums_match(sa, sb, dtype) -> np.ndarray:
    rtol = 1e-4 if dtype == np.float32 else 1e-6
    return np.abs(sa - sb) <= rtol * np.maximum(np.abs(sa), np.abs(sb)) + 1e-12


def _raise_bad_cost(status: np.ndarray, what: str) -> None:
    nonfinite = np.flatnonzero(status == BAD_COST_NONFINITE)
    if nonfinite.size:
        raise ValueError(f"M{what} contains NaN or infinity" + (
            f" (problems {nonfinite[:10].tolist()})" if what else ""))
    negative = np.flatnonzero(status == BAD_COST_NEGATIVE)
    if negative.size:
        raise ValueError(
            f"M{what} has negative costs" + (f" (problems {negative[:10].tolist()})" if what else "")
            + ": the plan is unchanged when a constant is added to M, so pass M - M.min(), or "
              "allow_negative_cost=True to solve as is")


POT_NOT_CONVERGED = ("Sinkhorn did not converge. You might want to increase the number of iterations "
                     "`numItermax` or the regularization parameter `reg`.")
"""POT's non-convergence warning, word for word (the single-problem `sinkhorn` gives POT's warnings)."""


def _warn_status(status: np.ndarray, niter: np.ndarray, err: np.ndarray, numItermax: int,
                 stopThr: float, batched: bool, *, warn: bool = True) -> None:
    """Warnings for the kernels' status codes. One problem: POT's texts, and (as POT) the
    numerical-error warning even with warn=False. A batch: counts and the first problems."""
    numerical = np.flatnonzero(status == NUMERICAL_ERROR)
    if numerical.size:
        if batched:
            warnings.warn(f"sinkhorn: numerical errors (K^T u hit 0, or u/v overflowed) in {numerical.size} of "
                          f"{status.size} problems (first: {numerical[:5].tolist()}); the previous iterate is "
                          f"returned. method='sinkhorn_log' or a larger reg avoids this", UserWarning, stacklevel=3)
        else:
            warnings.warn(f"Warning: numerical errors at iteration {int(niter[0])}", UserWarning, stacklevel=3)
    slow = np.flatnonzero(status == NOT_CONVERGED)
    if slow.size and warn:
        if batched:
            warnings.warn(f"sinkhorn did not converge for {slow.size} of {status.size} problems in "
                          f"numItermax={numItermax} iterations (marginal error {float(np.max(err[slow])):.3g} > "
                          f"stopThr={stopThr:g}): increase numItermax or reg", UserWarning, stacklevel=3)
        else:
            warnings.warn(POT_NOT_CONVERGED, UserWarning, stacklevel=3)


def _check_fixed_plans(flat: np.ndarray, what: str) -> None:
    """The fixed-iteration loop has no status: a row or column whose entries all underflow
    gives 0 / 0. One pass over the plans (reference method only)."""
    if not np.isfinite(flat).all():
        raise ValueError(f"the fixed-iteration plan of {what} under/overflowed float64 (a whole row or column of "
                         f"exp(-M / reg) is 0 or inf): the spread of the costs / reg is too large; use a larger reg")


def _ragged(x, name: str, count: int):
    """None/[] -> None; a (B, k) array -> list of its rows; a list -> list of numpy arrays."""
    if x is None:
        return None
    if isinstance(x, (np.ndarray, torch.Tensor)):
        arr, _ = _as_array(x, name)
        if arr.ndim == 1 and arr.size == 0:
            return None
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a list of 1-D marginals or a (B, k) array, got shape {arr.shape}")
        rows = list(arr)
    else:
        rows = [_as_array(r, f"{name}[{p}]")[0] for p, r in enumerate(x)]
        if not rows:
            return None
    if len(rows) != count:
        raise ValueError(f"{name} has {len(rows)} marginals for {count} problems")
    return rows


def _flat_marginals(x, name: str, counts: np.ndarray, offs: np.ndarray, padded: bool) -> np.ndarray:
    """Concatenate per-problem marginals (uniform where x is None), checking each."""
    B = counts.shape[0]
    rows = _ragged(x, name, B)
    if rows is None:
        return np.repeat(1.0 / counts, counts)
    flat = np.empty(int(counts.sum()))
    for p, r in enumerate(rows):
        r = np.asarray(r)
        if padded and r.ndim == 1 and r.shape[0] >= counts[p]:
            r = r[: counts[p]]
        _check_marginal(r, name, int(counts[p]), f"[{p}]")
        flat[offs[p]:offs[p] + counts[p]] = r
    return flat
