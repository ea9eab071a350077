"""The Numba kernels of the Sinkhorn solvers (`sinkhorn.py`, `sinkhorn_batch.py`): one
problem addressed inside flat buffers (`_solve_one`), and all problems of a batch in one
``prange`` (`_solve_many`). Imported only when numba is (`dispatch.HAS_NUMBA`); the public
modules register these as the kernels' "numba" forms.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.core.extending import intrinsic

from .sinkhorn_checks import BAD_COST_NEGATIVE, BAD_COST_NONFINITE, CONVERGED, NOT_CONVERGED, NUMERICAL_ERROR

_FLAGS = {"reassoc", "contract"}  # reassociation vectorises the dot products; NaN/inf checks stay exact


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
