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

Inputs: numpy arrays, lists, or CPU torch tensors (a torch input gives a torch output).
Everything is computed in float64; the plan comes back in the inputs' floating dtype.
Bad input (NaN/inf or negative costs, negative or non-finite marginals, marginals whose sums
differ, shape mismatches, reg <= 0) raises a ValueError naming the problem. Negative costs
are refused for the two POT methods unless ``allow_negative_cost=True``: the plan does not
change when a constant is added to M, so ``M - M.min()`` is the usual fix.
"""
from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.core.extending import intrinsic

from .dispatch import choose_backend

__all__ = ["METHODS", "sinkhorn", "sinkhorn_batched", "sinkhorn_fixed"]

METHODS = {"sinkhorn": 0, "sinkhorn_knopp": 0, "sinkhorn_log": 1, "reference": 2, "fixed_iterations": 2}
_OTHER_POT_METHODS = ("greenkhorn", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling")

# status codes written by the kernels
CONVERGED, NOT_CONVERGED, NUMERICAL_ERROR, BAD_COST_NONFINITE, BAD_COST_NEGATIVE = 0, 1, 2, 3, 4

_FLAGS = {"reassoc", "contract"}  # reassociation vectorises the dot products; NaN/inf checks stay exact


# ----------------------------------------------------------------------------------------
# Numba kernels: one problem, addressed inside flat buffers
# ----------------------------------------------------------------------------------------


@intrinsic
def _bits_as_float(typingctx, bits):
    """Reinterpret an int64's bits as a float64 (for building 2**k)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _address_as_pointer(typingctx, address):
    """An int64 memory address as a float64 pointer (for numba.carray)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float64)))
    return types.CPointer(types.float64)(types.int64), codegen


@njit(cache=True)
def _data_address(x):
    """The address of a numpy array's first element (for the ragged list form)."""
    return x.ctypes.data


@njit(cache=True, error_model="numpy", fastmath=_FLAGS, inline="always")
def _exp_fast(x):
    """exp(x) within 1 ulp of libm for -708 <= x <= 709, in straight-line code that LLVM
    vectorises (libm's exp is a scalar call: ~13x slower here). Inputs outside that range are
    clamped to it; callers that need exact underflow/overflow there fix those entries up
    with math.exp (see _exp_fixup).

    exp(x) = 2**k * exp(r), k = round(x / ln 2), r = x - k ln 2 split in two parts (|r| <=
    ln2 / 2), exp(r) by its degree-13 Taylor polynomial (truncation error < 1e-17).
    """
    xc = min(max(x, -708.0), 709.0)
    k = math.floor(xc * 1.4426950408889634 + 0.5)
    r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _bits_as_float((np.int64(k) + 1023) << 52)


@njit(cache=True, inline="always")
def _loop_shape(n, m, ld):
    """(rows, cols) to walk an (n, m) block of row stride ld: one long row when the block is
    contiguous (short rows vectorise poorly: the cost check ran 3x slower on 300-wide rows)."""
    return (1, n * m) if ld == m else (n, m)


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _exp_of_cost(M, moff, n, m, ld, reg, K):
    """K[i * m + j] = exp(M_ij / (-reg)), exactly libm's value where it under/overflows."""
    rows, cols = _loop_shape(n, m, ld)
    n_out = 0  # an integer count keeps the loop vectorised (a float min/max would not)
    for i in range(rows):
        base = moff + i * ld
        for j in range(cols):
            t = M[base + j] / (-reg)
            n_out += (t < -708.0) | (t > 709.0)
            K[i * cols + j] = _exp_fast(t)
    if n_out:  # rare fix-ups: exact subnormals, zeros and infinities
        for i in range(rows):
            base = moff + i * ld
            for j in range(cols):
                t = M[base + j] / (-reg)
                if t < -708.0 or t > 709.0:
                    K[i * cols + j] = math.exp(t)


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _check_cost(M, moff, n, m, ld, check_negative):
    probe = 0.0  # x * 0.0 is 0 for finite x, NaN for NaN/inf: branch-free, vectorised
    n_negative = 0
    rows, cols = _loop_shape(n, m, ld)
    for i in range(rows):
        base = moff + i * ld
        for j in range(cols):
            x = M[base + j]
            probe += x * 0.0
            n_negative += x < 0.0
    if probe != 0.0:
        return BAD_COST_NONFINITE
    if check_negative and n_negative:
        return BAD_COST_NEGATIVE
    return CONVERGED


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _knopp(M, moff, n, m, ld, a, b, reg, u, v, numItermax, stopThr, errs, out):
    """POT's sinkhorn_knopp on one problem. u (n,), v (m,) hold the start point; on return
    the final scalings. Writes the plan into out (flat, row stride ld). Returns
    (niter, status, last err)."""
    K = np.empty(n * m)
    _exp_of_cost(M, moff, n, m, ld, reg, K)
    Kp = np.empty(n * m)  # (1 / a_i) * K_ij, as POT forms it
    for i in range(n):
        inv_a = 1.0 / a[i]
        for j in range(m):
            Kp[i * m + j] = inv_a * K[i * m + j]
    ktu = np.empty(m)
    v_new = np.empty(m)
    u_new = np.empty(n)
    err = 1.0
    status = NOT_CONVERGED
    niter = numItermax - 1 if numItermax > 0 else 0
    n_err = 0
    for ii in range(numItermax):
        for j in range(m):
            ktu[j] = 0.0
        for i in range(n):
            ui = u[i]
            row = i * m
            for j in range(m):
                ktu[j] += K[row + j] * ui
        # K^T u == 0 gives v = inf or NaN, so one finiteness test covers POT's three checks;
        # x * 0.0 is 0 for finite x and NaN otherwise
        probe = 0.0
        for j in range(m):
            v_new[j] = b[j] / ktu[j]
            probe += v_new[j] * 0.0
        for i in range(n):
            row = i * m
            s = 0.0
            for j in range(m):
                s += Kp[row + j] * v_new[j]
            u_new[i] = 1.0 / s
            probe += u_new[i] * 0.0
        if probe != 0.0:  # machine precision reached: keep the previous iterate and stop
            status = NUMERICAL_ERROR
            niter = ii
            break
        for i in range(n):
            u[i] = u_new[i]
        for j in range(m):
            v[j] = v_new[j]
        if ii % 10 == 0:
            # column marginal of diag(u) K diag(v): v_j * (K^T u)_j with the updated u
            for j in range(m):
                ktu[j] = 0.0
            for i in range(n):
                ui = u[i]
                row = i * m
                for j in range(m):
                    ktu[j] += K[row + j] * ui
            sq = 0.0
            for j in range(m):
                d = ktu[j] * v[j] - b[j]
                sq += d * d
            err = math.sqrt(sq)
            if n_err < errs.shape[0]:
                errs[n_err] = err
            n_err += 1
            if err < stopThr:
                status = CONVERGED
                niter = ii
                break
    for i in range(n):
        base = moff + i * ld
        ui = u[i]
        for j in range(m):
            out[base + j] = ui * K[i * m + j] * v[j]
    return niter, status, err


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _lse(x, k):
    """log(sum(exp(x[:k]))) with the max shifted out (a non-finite max shifts by 0)."""
    mx = -np.inf
    for t in range(k):
        mx = max(mx, x[t])
    s = 0.0
    if not math.isfinite(mx):  # all -inf (or an inf): libm exp, no shift
        for t in range(k):
            s += math.exp(x[t])
        return math.log(s)
    for t in range(k):  # terms below exp(-708) (< 1e-307 next to the max's 1) do not matter
        s += _exp_fast(x[t] - mx)
    return math.log(s) + mx


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _log_domain(M, moff, n, m, ld, a, b, reg, u, v, numItermax, stopThr, errs, out):
    """POT's sinkhorn_log on one problem; u (n,), v (m,) are log-potentials (start point in,
    final out). Writes the plan into out. Returns (niter, status, last err)."""
    Mr = np.empty((n, m))
    for i in range(n):
        base = moff + i * ld
        for j in range(m):
            Mr[i, j] = -M[base + j] / reg
    loga = np.empty(n)
    logb = np.empty(m)
    for i in range(n):
        loga[i] = math.log(a[i])
    for j in range(m):
        logb[j] = math.log(b[j])
    buf_m = np.empty(max(n, m))
    col_max = np.empty(m)
    col_sum = np.empty(m)
    err = 1.0
    status = NOT_CONVERGED
    niter = numItermax - 1 if numItermax > 0 else 0
    n_err = 0
    for ii in range(numItermax):
        # v_j = log b_j - logsumexp_i(Mr_ij + u_i), all columns at once (rows outer: vectorised)
        for j in range(m):
            col_max[j] = -np.inf
        for i in range(n):
            ui = u[i]
            for j in range(m):
                col_max[j] = max(col_max[j], Mr[i, j] + ui)
        finite = True
        for j in range(m):
            finite = finite and math.isfinite(col_max[j])
        if finite:
            for j in range(m):
                col_sum[j] = 0.0
            for i in range(n):
                ui = u[i]
                for j in range(m):
                    col_sum[j] += _exp_fast(Mr[i, j] + ui - col_max[j])
            for j in range(m):
                v[j] = logb[j] - (math.log(col_sum[j]) + col_max[j])
        else:  # some column is all -inf (a zero weight): the careful per-column form
            for j in range(m):
                for i in range(n):
                    buf_m[i] = Mr[i, j] + u[i]
                v[j] = logb[j] - _lse(buf_m, n)
        for i in range(n):
            for j in range(m):
                buf_m[j] = Mr[i, j] + v[j]
            u[i] = loga[i] - _lse(buf_m, m)
        if ii % 10 == 0:
            sq = 0.0
            for j in range(m):
                c = 0.0
                for i in range(n):
                    c += _exp_fast(Mr[i, j] + u[i] + v[j])
                d = c - b[j]
                sq += d * d
            err = math.sqrt(sq)
            if n_err < errs.shape[0]:
                errs[n_err] = err
            n_err += 1
            if err < stopThr:
                status = CONVERGED
                niter = ii
                break
    for i in range(n):
        base = moff + i * ld
        for j in range(m):
            t = Mr[i, j] + u[i] + v[j]
            out[base + j] = _exp_fast(t) if -708.0 <= t <= 709.0 else math.exp(t)
    return niter, status, err


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _fixed(M, moff, n, m, ld, reg, iters, out):
    """The reference's loop: P = exp(-M / reg); iters x (rows to sum 1, then columns).

    Every iterate is diag(u) P0 diag(v): normalising the rows sets u = 1 / (P0 v), then
    the columns set v = 1 / (P0^T u). Iterating on u (n,) and v (m,) does the same with two
    matrix-vector products per iteration instead of four passes over the matrix (the
    result agrees with the matrix form to rounding, ~1e-15 relative).
    """
    P0 = np.empty(n * m)
    _exp_of_cost(M, moff, n, m, ld, reg, P0)
    u = np.empty(n)
    v = np.ones(m)
    ktu = np.empty(m)
    for _ in range(iters):
        for i in range(n):
            row = i * m
            s = 0.0
            for j in range(m):
                s += P0[row + j] * v[j]
            u[i] = 1.0 / s
        for j in range(m):
            ktu[j] = 0.0
        for i in range(n):
            row = i * m
            ui = u[i]
            for j in range(m):
                ktu[j] += P0[row + j] * ui
        for j in range(m):
            v[j] = 1.0 / ktu[j]
        # v's overall scale drifts by about (n / m) per iteration (rows and columns cannot
        # both sum to 1) and the plan does not depend on it: rescale by a power of two (exact)
        _, e = math.frexp(v[0])
        f = math.ldexp(1.0, -e)
        for j in range(m):
            v[j] *= f
    if iters > 0:  # the last column step, with the final u
        for j in range(m):
            ktu[j] = 0.0
        for i in range(n):
            row = i * m
            ui = u[i]
            for j in range(m):
                ktu[j] += P0[row + j] * ui
        for j in range(m):
            v[j] = 1.0 / ktu[j]
    for i in range(n):
        base = moff + i * ld
        if iters > 0:
            ui = u[i]
            for j in range(m):
                out[base + j] = ui * P0[i * m + j] * v[j]
        else:
            for j in range(m):
                out[base + j] = P0[i * m + j]
    return (iters - 1 if iters > 0 else 0), CONVERGED, 0.0


@njit(cache=True, error_model="numpy", fastmath=_FLAGS)
def _solve_one(method, M, moff, n, m, ld, a, b, reg, u, v, numItermax, stopThr, errs, out,
               check_negative):
    bad = _check_cost(M, moff, n, m, ld, check_negative)
    if bad != CONVERGED:
        return 0, bad, np.nan
    if method == 0:
        return _knopp(M, moff, n, m, ld, a, b, reg, u, v, numItermax, stopThr, errs, out)
    if method == 1:
        return _log_domain(M, moff, n, m, ld, a, b, reg, u, v, numItermax, stopThr, errs, out)
    return _fixed(M, moff, n, m, ld, reg, numItermax, out)


@njit(cache=True, parallel=True, error_model="numpy")
def _solve_many(method, m_addr, out_addr, ld, nrows, ncols, a, aoff, b, boff, reg, u, v,
                numItermax, stopThr, check_negative, niter, status, err):
    """All problems, one prange. Problem p's cost rows start at address m_addr[p] (float64,
    row stride ld[p], n_p rows of m_p values), its plan goes to out_addr[p] (same layout):
    separate arrays of a list, or blocks of one padded array. The caller keeps the memory
    alive. Marginals a[aoff[p]: + n_p], b[boff[p]: + m_p]; u, v (same offsets) receive the
    final scalings (log-potentials for "sinkhorn_log")."""
    no_errs = np.empty(0)
    for p in prange(m_addr.shape[0]):
        n = nrows[p]
        m = ncols[p]
        span = (n - 1) * ld[p] + m
        Mp = numba.carray(_address_as_pointer(m_addr[p]), span)
        outp = numba.carray(_address_as_pointer(out_addr[p]), span)
        up = u[aoff[p]:aoff[p] + n]
        vp = v[boff[p]:boff[p] + m]
        for i in range(n):
            up[i] = 0.0 if method == 1 else 1.0 / n
        for j in range(m):
            vp[j] = 0.0 if method == 1 else 1.0 / m
        it, st, e = _solve_one(method, Mp, 0, n, m, ld[p], a[aoff[p]:aoff[p] + n],
                               b[boff[p]:boff[p] + m], reg[p], up, vp, numItermax, stopThr,
                               no_errs, outp, check_negative)
        niter[p] = it
        status[p] = st
        err[p] = e


# ----------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------


def _as_array(x, name: str) -> tuple[np.ndarray, bool]:
    """numpy view/copy of x; True when it was a torch tensor."""
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            raise RuntimeError(f"sinkhorn runs on the CPU (Numba): move {name} to the CPU")
        return x.detach().numpy(), True
    return np.asarray(x), False


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


def _warn_status(status: np.ndarray, niter: np.ndarray, err: np.ndarray, numItermax: int,
                 stopThr: float, batched: bool) -> None:
    numerical = np.flatnonzero(status == NUMERICAL_ERROR)
    if numerical.size:
        where = (f"{numerical.size} of {status.size} problems (first: {numerical[:5].tolist()})"
                 if batched else f"iteration {int(niter[0])}")
        warnings.warn(f"sinkhorn: numerical errors (K^T u hit 0, or u/v overflowed) at {where}; "
                      f"the previous iterate is returned. method='sinkhorn_log' or a larger reg "
                      f"avoids this", UserWarning, stacklevel=3)
    slow = np.flatnonzero(status == NOT_CONVERGED)
    if slow.size:
        which = f"{slow.size} of {status.size} problems" if batched else "the problem"
        warnings.warn(f"sinkhorn did not converge for {which} in numItermax={numItermax} iterations "
                      f"(marginal error {float(np.max(err[slow])):.3g} > stopThr={stopThr:g}): "
                      f"increase numItermax or reg", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def sinkhorn(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, *, method: str = "sinkhorn", allow_negative_cost: bool = False,
             backend: str | None = None):
    """Entropic OT plan: POT's ``ot.sinkhorn`` contract.

    Args:
        a: (n,) source weights, or [] for uniform.
        b: (m,) target weights, or [] for uniform (sum(b) must equal sum(a)).
        M: (n, m) cost matrix, finite (non-negative unless ``allow_negative_cost``).
        reg: regularisation > 0.
        numItermax: maximum iterations ("reference": the exact number of iterations).
        stopThr: stop when the column-marginal error (checked every 10th iteration) < stopThr.
        verbose: print the errors as POT does (after the solve).
        log: also return a dict like POT's: "err" (list), "niter" (index of the last
            iteration), "u", "v" (and "log_u", "log_v" for "sinkhorn_log").
        warn: warn on non-convergence or numerical errors.
        warmstart: (log_u (n,), log_v (m,)) start potentials, as in POT.
        method: "sinkhorn" (default), "sinkhorn_log", or "reference"/"fixed_iterations".
            A string in the numItermax position is read as the method (POT's positional
            order is ``sinkhorn(a, b, M, reg, method, numItermax, ...)``).
        allow_negative_cost: accept negative entries of M.
        backend: None or "numba".

    Returns:
        (n, m) plan, numpy (or a CPU torch tensor when M is one), in the inputs' float dtype;
        with ``log=True`` the tuple (plan, log dict).
    """
    if isinstance(numItermax, str):  # POT's positional order: (a, b, M, reg, method, ...)
        if not (isinstance(stopThr, float) and stopThr == 1e-9):
            raise TypeError("sinkhorn(a, b, M, reg, method, ...): with the method as 5th positional "
                            "argument (POT's order) pass numItermax=..., stopThr=... by keyword")
        method, numItermax = numItermax, 1000
    code = _method_code(method)
    numItermax, stopThr = _check_scalars(numItermax, stopThr)
    choose_backend("sinkhorn", [x for x in (a, b, M) if isinstance(x, torch.Tensor)],
                   cpu="numba", gpu=None, backend=backend)
    M_np, M_torch = _as_array(M, "M")
    a_np, _ = _as_array(a, "a")
    b_np, _ = _as_array(b, "b")
    if M_np.ndim != 2:
        raise ValueError(f"M must be a 2-D cost matrix (n, m), got shape {M_np.shape}")
    if M_np.dtype.kind not in "iuf":
        raise TypeError(f"M must be numeric, got dtype {M_np.dtype}")
    n, m = M_np.shape
    if n == 0 or m == 0:
        raise ValueError(f"M has shape {M_np.shape}: need at least one row and one column")
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
    if warmstart is not None:
        wu, wv = (np.asarray(_as_array(w, "warmstart")[0], dtype=np.float64).reshape(-1) for w in warmstart)
        if wu.shape != (n,) or wv.shape != (m,):
            raise ValueError(f"warmstart must be (log_u of shape ({n},), log_v of shape ({m},))")
        u = wu.copy() if code == 1 else np.exp(wu)
        v = wv.copy() if code == 1 else np.exp(wv)
    else:
        u = np.zeros(n) if code == 1 else np.full(n, 1.0 / n)
        v = np.zeros(m) if code == 1 else np.full(m, 1.0 / m)
    errs = np.full(numItermax // 10 + 1, np.nan)
    out = np.empty(n * m)
    niter, status, err = _solve_one(code, Mf, 0, n, m, m, af, bf, reg, u, v, numItermax, stopThr,
                                    errs, out, code != 2 and not allow_negative_cost)
    _raise_bad_cost(np.array([status]), "")
    if warn and code != 2:
        _warn_status(np.array([status]), np.array([niter]), np.array([err]), numItermax, stopThr, False)
    errs = errs[~np.isnan(errs)]
    if verbose:
        for k, e in enumerate(errs):
            if k % 20 == 0:
                print("{:5s}|{:12s}".format("It.", "Err") + "\n" + "-" * 19)
            print("{:5d}|{:8e}|".format(10 * k, e))
    plan = out.reshape(n, m).astype(out_dtype, copy=False)
    plan = torch.from_numpy(plan) if M_torch else plan
    if not log:
        return plan
    info = {"err": [float(e) for e in errs], "niter": int(niter), "status": int(status)}
    wrap = torch.from_numpy if M_torch else (lambda x: x)
    if code == 1:
        with np.errstate(over="ignore", under="ignore"):
            info.update(log_u=wrap(u), log_v=wrap(v), u=wrap(np.exp(u)), v=wrap(np.exp(v)))
    else:
        info.update(u=wrap(u), v=wrap(v))
    return plan, info


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


def sinkhorn_batched(a, b, M, reg, numItermax=1000, stopThr=1e-9, *, method: str = "sinkhorn",
                     shapes=None, log: bool = False, warn: bool = True,
                     allow_negative_cost: bool = False, out=None, backend: str | None = None):
    """Many independent Sinkhorn problems in one parallel Numba call (``prange`` over problems).

    Args:
        a: None (uniform), a list of B 1-D source weights (n_b,), or a (B, n) array
            (entries past n_b ignored).
        b: None, a list of B (m_b,) target weights, or a (B, m) array.
        M: a list of B cost matrices (n_b, m_b) (ragged), or a padded (B, n, m) array.
        reg: one float, or (B,) per-problem values.
        numItermax, stopThr, method, allow_negative_cost: as in ``sinkhorn``.
        shapes: (B, 2) ints, the valid (n_b, m_b) of each padded problem (padded M only).
        out: padded M only: a C-contiguous float64 numpy array of M's shape to write the
            plans into (returned), instead of allocating B * n * m new values per call; in a
            sweep this skips the allocation and first-touch cost of a large fresh buffer.
        log: also return {"niter": (B,), "status": (B,) 0 converged / 1 iteration limit /
            2 numerical error, "err": (B,) last measured marginal error}.

    Returns:
        a list of (n_b, m_b) plans for list input (non-overlapping views of one buffer), or
        a (B, n, m) array (zero outside each problem's shape) for padded input; numpy, or
        torch for torch input. Problem b's plan
        equals ``sinkhorn(a[b], b[b], M[b], reg[b], ...)`` exactly.
    """
    code = _method_code(method)
    numItermax, stopThr = _check_scalars(numItermax, stopThr)
    padded = isinstance(M, (np.ndarray, torch.Tensor))
    torch_in = isinstance(M, torch.Tensor) or (not padded and len(M) and isinstance(M[0], torch.Tensor))
    choose_backend("sinkhorn_batched", [M] if isinstance(M, torch.Tensor) else
                   ([M[0]] if torch_in else []), cpu="numba", gpu=None, backend=backend)
    if padded:
        M3, _ = _as_array(M, "M")
        if M3.ndim != 3:
            raise ValueError(f"a padded batch M must be (B, n, m), got shape {M3.shape}; or pass a list of 2-D costs")
        if M3.dtype.kind not in "iuf":
            raise TypeError(f"M must be numeric, got dtype {M3.dtype}")
        B, n_max, m_max = M3.shape
        if shapes is None:
            nrows = np.full(B, n_max, dtype=np.int64)
            ncols = np.full(B, m_max, dtype=np.int64)
        else:
            shp = np.asarray(shapes)
            if shp.shape != (B, 2) or shp.dtype.kind not in "iu":
                raise ValueError(f"shapes must be a (B, 2) integer array of (n_b, m_b), got {shp.shape} {shp.dtype}")
            nrows = shp[:, 0].astype(np.int64)
            ncols = shp[:, 1].astype(np.int64)
            if (nrows < 1).any() or (ncols < 1).any() or (nrows > n_max).any() or (ncols > m_max).any():
                raise ValueError(f"shapes must lie within 1..{n_max} rows and 1..{m_max} columns")
        Mf = np.ascontiguousarray(M3, dtype=np.float64).reshape(-1)
        moff = np.arange(B, dtype=np.int64) * (n_max * m_max)
        ld = np.full(B, m_max, dtype=np.int64)
        out_dtype = _float_dtype(M3)
    else:
        # One pass, a few hundred ns per problem: each cost matrix stays in its own (float64,
        # C-contiguous) array, no gather into one buffer; its address is read in compiled code
        # (x.__array_interface__ costs ~2 us, as long as solving a 5 x 300 problem).
        B = len(M)
        mats = []
        nrows = np.empty(B, dtype=np.int64)
        ncols = np.empty(B, dtype=np.int64)
        m_addr = np.empty(B, dtype=np.int64)
        float_dtypes = set()
        for p, x in enumerate(M):
            if not isinstance(x, np.ndarray):
                x = _as_array(x, f"M[{p}]")[0]
            if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
                raise ValueError(f"M[{p}] must be a non-empty 2-D cost matrix, got shape {x.shape}")
            kind = x.dtype.kind
            if kind not in "iuf":
                raise TypeError(f"M[{p}] must be numeric, got dtype {x.dtype}")
            if kind == "f":
                float_dtypes.add(x.dtype)
            x = np.ascontiguousarray(x, dtype=np.float64)
            nrows[p], ncols[p] = x.shape
            m_addr[p] = _data_address(x)
            mats.append(x)
        out_dtype = np.result_type(*float_dtypes) if float_dtypes else np.dtype(np.float64)
    if B == 0:
        return ([] if not padded else np.zeros((0,) + tuple(M3.shape[1:]), dtype=out_dtype)) if not log \
            else ([], {"niter": np.zeros(0, np.int64), "status": np.zeros(0, np.int64), "err": np.zeros(0)})

    aoff = np.zeros(B, dtype=np.int64)
    np.cumsum(nrows[:-1], out=aoff[1:])
    boff = np.zeros(B, dtype=np.int64)
    np.cumsum(ncols[:-1], out=boff[1:])
    flat_a = _flat_marginals(a, "a", nrows, aoff, padded)
    flat_b = _flat_marginals(b, "b", ncols, boff, padded)
    if code != 2:
        sa = np.add.reduceat(flat_a, aoff)
        sb = np.add.reduceat(flat_b, boff)
        bad = np.flatnonzero(~_sums_match(sa, sb, out_dtype))
        if bad.size:
            p = int(bad[0])
            raise ValueError(f"the marginals of {bad.size} problems carry different mass (problem {p}: "
                             f"sum(a) = {sa[p]:.9g}, sum(b) = {sb[p]:.9g}); normalise both")
    regs = np.broadcast_to(np.asarray(reg, dtype=np.float64), (B,)).copy() if np.ndim(reg) == 0 \
        else np.asarray(_as_array(reg, "reg")[0], dtype=np.float64)
    if regs.shape != (B,):
        raise ValueError(f"reg must be a float or one value per problem ({B},), got shape {regs.shape}")
    if not (np.isfinite(regs).all() and (regs > 0).all()):
        raise ValueError("reg must be finite and > 0 for every problem")

    u = np.empty(flat_a.shape[0])
    v = np.empty(flat_b.shape[0])
    niter = np.zeros(B, dtype=np.int64)
    status = np.zeros(B, dtype=np.int64)
    err = np.zeros(B)
    check_negative = code != 2 and not allow_negative_cost
    if padded:
        if out is not None:
            if not (isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == M3.shape
                    and out.flags.c_contiguous and out.flags.writeable):
                raise ValueError(f"out must be a writeable C-contiguous float64 numpy array of shape "
                                 f"{M3.shape}")
            if shapes is not None:
                out.fill(0.0)
            out_buffer = out
            out = out.reshape(-1)
        else:
            # every entry of a problem's own block is written; only padding needs zeros
            out = np.zeros(Mf.shape[0]) if shapes is not None else np.empty(Mf.shape[0])
            out_buffer = None
        m_addr = Mf.__array_interface__["data"][0] + 8 * moff
        o_addr = out.__array_interface__["data"][0] + 8 * moff
        _solve_many(code, m_addr, o_addr, ld, nrows, ncols, flat_a, aoff, flat_b, boff, regs, u, v,
                    numItermax, stopThr, check_negative, niter, status, err)
    else:
        if out is not None:
            raise ValueError("out= is for a padded (B, n, m) M; a list of problems gets a list of plans")
        # one buffer for all plans, handed out as views: B small arrays would each fault in
        # their own 4 KiB pages, which costs more than solving a 5 x 300 problem
        sizes = nrows * ncols
        ooff = np.zeros(B, dtype=np.int64)
        np.cumsum(sizes[:-1], out=ooff[1:])
        flat_out = np.empty(int(sizes.sum()))
        outs = [flat_out[o:o + n * m].reshape(n, m) for o, n, m in zip(ooff.tolist(), nrows.tolist(), ncols.tolist())]
        o_addr = flat_out.__array_interface__["data"][0] + 8 * ooff
        _solve_many(code, m_addr, o_addr, ncols, nrows, ncols, flat_a, aoff, flat_b, boff, regs, u, v,
                    numItermax, stopThr, check_negative, niter, status, err)
    _raise_bad_cost(status, "[p]")
    if warn and code != 2:
        _warn_status(status, niter, err, numItermax, stopThr, True)

    if padded:
        if out_buffer is not None:
            result = out_buffer
        else:
            plans = out.reshape(M3.shape).astype(out_dtype, copy=False)
            result = torch.from_numpy(plans) if torch_in else plans
    else:
        result = outs if out_dtype == np.float64 else [x.astype(out_dtype) for x in outs]
        if torch_in:
            result = [torch.from_numpy(x) for x in result]
    if log:
        return result, {"niter": niter, "status": status, "err": err}
    return result


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
        return neg, arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64), was_torch

    if isinstance(S, (list, tuple)):
        items = [logits(x, f"S[{p}]") for p, x in enumerate(S)]
        plans = sinkhorn_batched(None, None, [c for c, _, _ in items], 1.0, iters, method="reference",
                                 backend=backend)
        return [torch.from_numpy(P.astype(dt)) if tt else P.astype(dt, copy=False)
                for P, (_, dt, tt) in zip(plans, items)]
    cost, dt, was_torch = logits(S, "S")
    if cost.ndim == 3:
        plans = sinkhorn_batched(None, None, cost, 1.0, iters, method="reference", backend=backend)
    elif cost.ndim == 2:
        plans = sinkhorn(np.zeros(0), np.zeros(0), cost, 1.0, iters, method="reference", backend=backend)
    else:
        raise ValueError(f"S must be (L, K), (B, L, K) or a list of 2-D matrices, got shape {cost.shape}")
    plans = plans.astype(dt, copy=False)
    return torch.from_numpy(plans) if was_torch else plans
