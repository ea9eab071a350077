"""The Numba kernels of `mi.py` (contingency MI, MI-dynamics curves); see that module for
the formulas. Imported only when numba is (`dispatch.HAS_NUMBA`): `mi.py` registers them as
the kernels' "numba" forms.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _paper_mi(n, m, k):
    """The reference's MI for an n x m table holding k ones (see the module docstring)."""
    if n == 0 or m == 0 or k == 0:
        return 0.0
    p = 1.0 / k
    entropy = -(k * (p * math.log(p + 1e-9)))
    return math.log(n) + math.log(m) + entropy


@njit(cache=True)
def _textbook_table_mi(match, n_rows, m, first_row, col_counts, k):
    """Textbook MI of the 0/1 table match[first_row:n_rows, :m] (sklearn's term order).

    col_counts[j]: ones in column j of the active rows; k: ones in all. The table has n_rows
    rows in all (removed rows are zero rows), which matters only for sklearn's
    "one row or one column -> 0" rule.
    """
    if k == 0 or n_rows <= 1 or m <= 1:
        return 0.0
    total = float(k)
    log_total = math.log(total)
    cnm = 1.0 / total  # every nonzero cell holds 1
    mi = 0.0
    for i in range(first_row, n_rows):
        r = 0
        for j in range(m):
            r += match[i, j]
        if r == 0:
            continue
        for j in range(m):
            if match[i, j]:
                outer = r * col_counts[j]
                log_outer = -math.log(float(outer)) + log_total + log_total
                term = cnm * (0.0 - log_total) + cnm * log_outer
                if abs(term) < 2.220446049250313e-16:
                    term = 0.0
                mi += term
    return max(mi, 0.0)


@njit(cache=True, parallel=True)
def _mi_curves_kernel(xv, xoff, yv, yoff, textbook, out):
    """out[xoff[b] + b + t] = MI of image b after removing its first t vision ids, t = 0..N_b."""
    n_images = xoff.shape[0] - 1
    for b in prange(n_images):
        x0 = xoff[b]
        n = xoff[b + 1] - x0
        y0 = yoff[b]
        m = yoff[b + 1] - y0
        o = x0 + b
        if not textbook:
            counts = np.zeros(n + 1, dtype=np.int64)  # counts[i]: matches of X_i; suffix sums below
            for i in range(n):
                xi = xv[x0 + i]
                c = 0
                for j in range(m):
                    if yv[y0 + j] == xi:
                        c += 1
                counts[i] = c
            for i in range(n - 1, -1, -1):
                counts[i] += counts[i + 1]
            for t in range(n + 1):
                out[o + t] = _paper_mi(n, m, counts[t])
        else:
            match = np.zeros((max(n, 1), max(m, 1)), dtype=np.int64)
            col_counts = np.zeros(max(m, 1), dtype=np.int64)
            k = 0
            for i in range(n):
                xi = xv[x0 + i]
                for j in range(m):
                    if yv[y0 + j] == xi:
                        match[i, j] = 1
                        col_counts[j] += 1
                        k += 1
            out[o] = _textbook_table_mi(match, n, m, 0, col_counts, k)
            for t in range(1, n + 1):
                for j in range(m):
                    if match[t - 1, j]:
                        col_counts[j] -= 1
                        k -= 1
                out[o + t] = _textbook_table_mi(match, n, m, t, col_counts, k)


@njit(cache=True)
def _mi_from_codes(ct, cp, n_rows, n_cols, dense_limit):
    """sklearn's mutual_info_score from integer codes ct in [0, n_rows), cp in [0, n_cols)."""
    n = ct.shape[0]
    pi = np.zeros(n_rows, dtype=np.int64)
    pj = np.zeros(n_cols, dtype=np.int64)
    for t in range(n):
        pi[ct[t]] += 1
        pj[cp[t]] += 1
    used_rows = 0
    for i in range(n_rows):
        if pi[i] > 0:
            used_rows += 1
    used_cols = 0
    for j in range(n_cols):
        if pj[j] > 0:
            used_cols += 1
    if used_rows == 1 or used_cols == 1:  # a single cluster has zero entropy: MI = 0
        return 0.0
    total = float(n)
    log_total = math.log(total)
    mi = 0.0
    if n_rows * n_cols <= dense_limit:
        table = np.zeros(n_rows * n_cols, dtype=np.int64)
        for t in range(n):
            table[ct[t] * n_cols + cp[t]] += 1
        for i in range(n_rows):
            if pi[i] == 0:
                continue
            for j in range(n_cols):
                nij = table[i * n_cols + j]
                if nij == 0:
                    continue
                cnm = nij / total
                log_outer = -math.log(float(pi[i] * pj[j])) + log_total + log_total
                term = cnm * (math.log(float(nij)) - log_total) + cnm * log_outer
                if abs(term) < 2.220446049250313e-16:
                    term = 0.0
                mi += term
    else:
        keys = np.empty(n, dtype=np.int64)
        for t in range(n):
            keys[t] = ct[t] * n_cols + cp[t]
        keys.sort()
        t = 0
        while t < n:
            key = keys[t]
            s = t
            while t < n and keys[t] == key:
                t += 1
            nij = t - s
            i = key // n_cols
            j = key - i * n_cols
            cnm = nij / total
            log_outer = -math.log(float(pi[i] * pj[j])) + log_total + log_total
            term = cnm * (math.log(float(nij)) - log_total) + cnm * log_outer
            if abs(term) < 2.220446049250313e-16:
                term = 0.0
            mi += term
    return max(mi, 0.0)


@njit(cache=True)
def _mi_from_table(table):
    """sklearn's mutual_info_score(None, None, contingency=table) for a dense int64 table."""
    n_rows, n_cols = table.shape
    if n_rows == 1 or n_cols == 1:
        return 0.0
    pi = np.zeros(n_rows, dtype=np.int64)
    pj = np.zeros(n_cols, dtype=np.int64)
    total_i = 0
    for i in range(n_rows):
        for j in range(n_cols):
            pi[i] += table[i, j]
            pj[j] += table[i, j]
            total_i += table[i, j]
    total = float(total_i)
    log_total = math.log(total)
    mi = 0.0
    for i in range(n_rows):
        for j in range(n_cols):
            nij = table[i, j]
            if nij == 0:
                continue
            cnm = nij / total
            log_outer = -math.log(float(pi[i] * pj[j])) + log_total + log_total
            term = cnm * (math.log(float(nij)) - log_total) + cnm * log_outer
            if abs(term) < 2.220446049250313e-16:
                term = 0.0
            mi += term
    return max(mi, 0.0)
