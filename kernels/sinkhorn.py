"""Entropic optimal transport by Sinkhorn-Knopp matrix scaling (Numba, CPU), one problem or
many small ones in ONE parallel call.

Public functions:

* ``sinkhorn(a, b, M, reg, numItermax=1000, stopThr=1e-9, ..., method=...)``: POT's
  ``ot.sinkhorn`` contract (returns the (n, m) transport plan). Methods:

  - "sinkhorn" (POT's ``sinkhorn_knopp``): u = 1/n, v = 1/m; each iteration
    v = b / (K^T u), u = 1 / ((1/a) * (K v)) with K = exp(-M / reg); it stops (keeping the
    previous iterate) as soon as K^T u has a zero or u, v a NaN/inf, and every 10th iteration
    (ii % 10 == 0) measures err = ||u^T K diag(v) - b||_2 and stops when err < stopThr.
    Same iterations, same stopping rule and accounting as POT, so plans agree to ~1e-12.
  - "sinkhorn_log" (POT's ``sinkhorn_log``): the same iteration on log-potentials with
    log-sum-exp, finite for small reg (e.g. 1e-3) where K under/overflows.
  - "reference" (alias "fixed_iterations"): the mutual-knowledge reference's loop:
    P = exp(-M / reg), then numItermax times rows normalised to sum 1, then columns normalised
    to sum 1; no stopping rule, a and b unused (uniform). With M = -2.5 S and reg = 1 this
    is P = exp(2.5 S) as in the reference (see ``sinkhorn_fixed`` for the similarity form).
    Computed on the row and column scalings (two matrix-vector products per iteration);
    the plan equals the reference's matrix loop to ~1e-15 relative.

* ``sinkhorn_batched(a, b, M, reg, ...)``: many problems (a list of ragged (n_b, m_b) costs,
  or a padded (B, n, m) array with ``shapes``) solved in one ``prange`` over problems; each
  problem's result is identical to ``sinkhorn`` on it alone.
* ``sinkhorn_fixed(S, scale=2.5, epsilon=1.0, iters=1000)``: the reference's Sinkhorn on a
  similarity matrix S (or a list of them): P = exp((S * scale) * epsilon), rows then columns.

Code layout: the Numba kernels are in ``sinkhorn_numba.py``, the input checks in
``sinkhorn_checks.py``, the batched solver and its packing in ``sinkhorn_batch.py``; every
public name (and the status codes) stays importable from here. Each solver's only form is
"numba" (tables `FORMS`, picked by `dispatch.choose_backend`).

Inputs: numpy arrays, lists, or CPU torch tensors (a torch input gives a torch output).
Everything is computed in float64; the plan comes back in the inputs' floating dtype.
Bad input (NaN/inf or negative costs, negative or non-finite marginals, marginals whose sums
differ, shape mismatches, reg <= 0) raises a ValueError naming the problem. Negative costs
are refused for the two POT methods unless ``allow_negative_cost=True``: the plan does not
change when a constant is added to M, so ``M - M.min()`` is the usual fix.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .dispatch import HAS_NUMBA, choose_backend, last_backend, numba_form, register
from .sinkhorn_batch import FORMS as _BATCH_TABLE
from .sinkhorn_batch import sinkhorn_batched
from .sinkhorn_checks import (  # noqa: F401  (status codes and METHODS: public names of this module)
    _check_fixed_plans,
    BAD_COST_NEGATIVE,
    BAD_COST_NONFINITE,
    CONVERGED,
    METHODS,
    NOT_CONVERGED,
    NUMERICAL_ERROR,
    _as_array,
    _check_marginal,
    _check_scalars,
    check_cost_shape,
    _float_dtype,
    _method_code,
    _raise_bad_cost,
    _sums_match,
    _warn_status,
)
from .sinkhorn_pot import POT_ONLY_METHODS, call_pot, check_call, check_overflow, pot_reason

if HAS_NUMBA:
    from . import sinkhorn_numba as _nb

__all__ = ["FORMS", "METHODS", "sinkhorn", "sinkhorn_batched", "sinkhorn_fixed"]

FORMS = {"sinkhorn": register("sinkhorn", numba_form(_nb._solve_one if HAS_NUMBA else None)), **_BATCH_TABLE}
_SINGLE_FORMS = FORMS["sinkhorn"]


def _single_problem(a, b, M, reg, code: int, method):
    """Checked float64 (M flat, a, b), n, m, reg, the output dtype and whether M was torch."""
    M_np, M_torch = _as_array(M, "M")
    a_np, _ = _as_array(a, "a")
    b_np, _ = _as_array(b, "b")
    n, m = check_cost_shape(M_np)
    out_dtype = _float_dtype(M_np, a_np, b_np)
    given = a_np.size > 0 or b_np.size > 0
    a_np = np.full(n, 1.0 / n) if a_np.size == 0 else a_np
    b_np = np.full(m, 1.0 / m) if b_np.size == 0 else b_np
    _check_marginal(a_np, "a", n)
    _check_marginal(b_np, "b", m)
    if code == 2 and given and (np.ptp(a_np) > 0 or np.ptp(b_np) > 0):
        raise ValueError(f"method={method!r} normalises rows and columns to 1 (uniform marginals "
                         f"only): pass a=[] and b=[], or use method='sinkhorn' for other weights")
    reg = float(reg)
    if not (reg > 0.0 and math.isfinite(reg)):
        raise ValueError(f"reg={reg!r} must be a finite number > 0")
    if code != 2 and not _sums_match(a_np.sum(dtype=np.float64), b_np.sum(dtype=np.float64), out_dtype):
        raise ValueError(f"the marginals must carry the same mass: sum(a) = {a_np.sum():.9g} but "
                         f"sum(b) = {b_np.sum():.9g}; normalise both (e.g. a / a.sum(), b / b.sum())")
    Mf = np.ascontiguousarray(M_np, dtype=np.float64).reshape(-1)
    af = np.ascontiguousarray(a_np, dtype=np.float64)
    bf = np.ascontiguousarray(b_np, dtype=np.float64)
    return Mf, af, bf, n, m, reg, out_dtype, M_torch


def _start_point(warmstart, code: int, n: int, m: int):
    """(u, v): the scalings (log-potentials for sinkhorn_log) the iteration starts from."""
    if warmstart is not None:
        wu, wv = (np.asarray(_as_array(w, "warmstart")[0], dtype=np.float64).reshape(-1) for w in warmstart)
        if wu.shape != (n,) or wv.shape != (m,):
            raise ValueError(f"warmstart must be (log_u of shape ({n},), log_v of shape ({m},))")
        u = wu.copy() if code == 1 else np.exp(wu)
        v = wv.copy() if code == 1 else np.exp(wv)
    else:
        u = np.zeros(n) if code == 1 else np.full(n, 1.0 / n)
        v = np.zeros(m) if code == 1 else np.full(m, 1.0 / m)
    return u, v


def _log_info(errs, niter, status, u, v, code: int, M_torch: bool) -> dict:
    """POT's log dict for one problem."""
    info = {"err": [float(e) for e in errs], "niter": int(niter), "status": int(status)}
    wrap = torch.from_numpy if M_torch else (lambda x: x)
    if code == 1:
        with np.errstate(over="ignore", under="ignore"):
            info.update(log_u=wrap(u), log_v=wrap(v), u=wrap(np.exp(u)), v=wrap(np.exp(v)))
    else:
        info.update(u=wrap(u), v=wrap(v))
    return info


def _legacy_order(method, numItermax):
    """(method, numItermax): an integer 5th positional argument is numItermax (this module's
    order before it took POT's, where the 5th is the method)."""
    if isinstance(method, numbers.Integral) and not isinstance(method, bool):
        if numItermax != 1000:
            raise TypeError("sinkhorn(a, b, M, reg, method, numItermax, stopThr, ...) is POT's order: the 5th "
                            "positional argument is the method name; pass numItermax=... by keyword")
        return "sinkhorn", int(method)
    if not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'sinkhorn' or 'sinkhorn_log', got {method!r}")
    return method, numItermax


def _masses_match(a_np, b_np, M_np) -> bool:
    sa = float(a_np.sum(dtype=np.float64)) if a_np.size else 1.0
    sb = float(b_np.sum(dtype=np.float64)) if b_np.size else 1.0
    return bool(_sums_match(sa, sb, _float_dtype(M_np, a_np, b_np)))


def _row_shifted(cost: np.ndarray, reg: float) -> np.ndarray:
    """The fixed-iteration loop normalises rows first, which cancels any per-row factor of
    exp(-M / reg): where a row's exp would over- or underflow, shift its costs by their
    minimum (the same plan, finite). Unchanged (the same array) when nothing would."""
    if cost.size == 0 or not np.isfinite(cost).all():
        return cost  # the kernel reports non-finite costs
    lo = cost.min(axis=-1, keepdims=True)
    far = np.abs(lo / reg) > 700.0
    return cost - np.where(far, lo, 0.0) if far.any() else cost


def _print_errors(errs) -> None:
    for k, e in enumerate(errs):
        if k % 20 == 0:
            print("{:5s}|{:12s}".format("It.", "Err") + "\n" + "-" * 19)
        print("{:5d}|{:8e}|".format(10 * k, e))


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False,
             warn=True, warmstart=None, *, allow_negative_cost: bool = True, backend: str | None = None, **kwargs):
    """Entropic OT plan: POT's ``ot.sinkhorn`` contract (same arguments, order, result and warnings).

    Args:
        a: (n,) source weights, or [] for uniform.
        b: (m,) target weights, [] for uniform, or (m, k) histograms (then, as POT, the k
            Sinkhorn losses come back instead of a plan).
        M: (n, m) cost matrix, finite (negative entries allowed, as in POT).
        reg: regularisation > 0.
        method: "sinkhorn" (default), "sinkhorn_log", POT's "greenkhorn",
            "sinkhorn_stabilized", "sinkhorn_epsilon_scaling" (run by POT itself), or
            "reference"/"fixed_iterations" (the mutual-knowledge reference's loop).
        numItermax: maximum iterations ("reference": the exact number of iterations).
        stopThr: stop when the column-marginal error (checked every 10th iteration) < stopThr.
        verbose: print the errors as POT does (after the solve).
        log: also return a dict like POT's: "err" (list), "niter" (index of the last
            iteration), "u", "v" (and "log_u", "log_v" for "sinkhorn_log").
        warn: warn on non-convergence, in POT's words.
        warmstart: (log_u (n,), log_v (m,)) start potentials, as in POT.
        allow_negative_cost: False refuses negative entries of M (a ValueError).
        backend: None or "numba" (the kernel's only form).
        **kwargs: POT's solver keywords (e.g. ``tau`` for "sinkhorn_stabilized"): passed to POT.

    Returns:
        (n, m) plan, numpy (or a torch tensor when M is one), in the inputs' float dtype;
        with ``log=True`` the tuple (plan, log dict). Calls the Numba kernel does not cover
        (see ``sinkhorn_pot``) are POT's own ``ot.sinkhorn`` and return exactly its result.

    Raises:
        ValueError for what POT turns into NaN or a meaningless plan: NaN/inf costs or
        weights, negative weights, reg <= 0, shape mismatches; TypeError for non-numbers.
    """
    method, numItermax = _legacy_order(method, numItermax)
    key = method.lower()
    code = None if key in POT_ONLY_METHODS else _method_code(method)
    numItermax, stopThr = _check_scalars(numItermax, stopThr)
    a_np, b_np, M_np, reg = check_call(a, b, M, reg)
    if not allow_negative_cost and code != 2 and (M_np < 0).any():
        _raise_bad_cost(np.array([BAD_COST_NEGATIVE]), "")
    if code != 2:
        check_overflow(M_np, reg, key)
        why = pot_reason(a, b, M, a_np, b_np, M_np, reg, key, kwargs, _masses_match)
        if why is not None:
            if backend is not None:
                choose_backend("sinkhorn", (), backend=backend)  # a bad name is still an error
            last_backend["sinkhorn"] = "pot"
            return call_pot(a, b, M, reg, key, numItermax, stopThr, verbose, log, warn, warmstart, kwargs)
    elif kwargs:
        raise TypeError(f"method={method!r} takes no solver keywords, got {sorted(kwargs)}")
    form = choose_backend("sinkhorn", [x for x in (a, b, M) if isinstance(x, torch.Tensor)], backend=backend)
    Mf, af, bf, n, m, reg, out_dtype, M_torch = _single_problem(a, b, M, reg, code, method)
    if code == 2:
        Mf = _row_shifted(Mf.reshape(n, m), reg).reshape(-1)
    u, v = _start_point(warmstart, code, n, m)
    errs = np.full(numItermax // 10 + 1, np.nan)
    out = np.empty(n * m)
    niter, status, err = _SINGLE_FORMS[form].fn(code, Mf, 0, n, m, m, af, bf, reg, u, v, numItermax, stopThr,
                                                errs, out, False)
    _raise_bad_cost(np.array([status]), "")
    if code != 2:
        _warn_status(np.array([status]), np.array([niter]), np.array([err]), numItermax, stopThr, False,
                     warn=warn)
    errs = errs[~np.isnan(errs)]
    if verbose:  # POT's Knopp loop prints an error only when it did not stop on it
        _print_errors(errs[:-1] if code == 0 and errs.size and errs[-1] < stopThr else errs)
    plan = out.reshape(n, m).astype(out_dtype, copy=False)
    if code == 2:
        _check_fixed_plans(out, "M")
    plan = torch.from_numpy(plan) if M_torch else plan
    if not log:
        return plan
    return plan, _log_info(errs, niter, status, u, v, code, M_torch)


def sinkhorn_fixed(S, scale: float = 2.5, epsilon: float = 1.0, iters: int = 1000, *,
                   backend: str | None = None):
    """The mutual-knowledge reference's Sinkhorn on similarity matrices.

    P = exp((S * scale) * epsilon), then ``iters`` times: rows divided by their sums, then
    columns by theirs (float64 here; the reference ran in float32).

    Args:
        S: one (L, K) similarity matrix (parts x descriptors), or a list of them (ragged),
            or a padded (B, L, K) array; numpy or CPU torch.
    Returns:
        the plan(s) in the same form as S.
    """
    scale = float(scale)
    epsilon = float(epsilon)
    if not (math.isfinite(scale) and math.isfinite(epsilon)):
        raise ValueError("scale and epsilon must be finite")

    def logits(x, name):
        arr, was_torch = _as_array(x, name)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        neg = -((arr.astype(np.float64) * scale) * epsilon)  # cost whose exp(-cost / 1) is the reference's P
        if neg.ndim >= 2:
            neg = _row_shifted(neg, 1.0)
        return neg, arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64), was_torch

    def finite(plan, name):
        if not np.isfinite(plan).all():
            raise ValueError(f"the plan of {name} under/overflowed float64: (max S - min S) * scale * epsilon is "
                             f"too large for exp; use a smaller scale or epsilon")
        return plan

    if isinstance(S, (list, tuple)):
        items = [logits(x, f"S[{p}]") for p, x in enumerate(S)]
        plans = sinkhorn_batched(None, None, [c for c, _, _ in items], 1.0, iters, method="reference",
                                 backend=backend)
        return [torch.from_numpy(finite(P, f"S[{p}]").astype(dt)) if tt else finite(P, f"S[{p}]").astype(dt, copy=False)
                for p, (P, (_, dt, tt)) in enumerate(zip(plans, items))]
    cost, dt, was_torch = logits(S, "S")
    if cost.ndim == 3:
        plans = sinkhorn_batched(None, None, cost, 1.0, iters, method="reference", backend=backend)
    elif cost.ndim == 2:
        plans = sinkhorn(np.zeros(0), np.zeros(0), cost, 1.0, method="reference", numItermax=iters,
                         backend=backend)
    else:
        raise ValueError(f"S must be (L, K), (B, L, K) or a list of 2-D matrices, got shape {cost.shape}")
    plans = finite(plans, "S").astype(dt, copy=False)
    return torch.from_numpy(plans) if was_torch else plans
