"""``sinkhorn_batched``: many Sinkhorn problems in ONE parallel Numba call, and the packing
that feeds it (importable as ``fastinterp.kernels.sinkhorn.sinkhorn_batched``).

Two input layouts reach the same kernel (`sinkhorn_numba._solve_many`), which reads each
problem's cost at an address with a row stride and writes its plan likewise:

* padded: one (B, n, m) array (with ``shapes`` giving each problem's valid block); problem p
  lives at offset p * n * m, row stride m;
* list: B ragged (n_b, m_b) matrices, each kept in its own float64 array (no gather into one
  buffer); the plans are views of one output buffer.

Marginals are concatenated per problem into two flat vectors (`_flat_marginals`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import HAS_NUMBA, choose_backend, numba_form, register
from .sinkhorn_checks import (
    _as_array,
    _check_fixed_plans,
    _check_scalars,
    _flat_marginals,
    _float_dtype,
    _method_code,
    _raise_bad_cost,
    _sums_match,
    _warn_status,
)

if HAS_NUMBA:
    from . import sinkhorn_numba as _nb

__all__ = ["FORMS", "sinkhorn_batched"]

FORMS = {"sinkhorn_batched": register("sinkhorn_batched", numba_form(_nb._solve_many if HAS_NUMBA else None))}
_BATCH_FORMS = FORMS["sinkhorn_batched"]


@dataclass
class _Packed:
    """The costs of a batch, as the kernel reads them."""

    B: int
    nrows: np.ndarray    # (B,) int64
    ncols: np.ndarray    # (B,) int64
    out_dtype: np.dtype
    m_addr: np.ndarray | None = None  # list form: (B,) address of each cost matrix
    mats: list | None = None          # list form: the float64 arrays behind m_addr (kept alive)
    M3: np.ndarray | None = None      # padded form: the (B, n, m) input
    Mf: np.ndarray | None = None      # padded form: its flat float64 copy/view
    moff: np.ndarray | None = None    # padded form: (B,) offset of each problem in Mf


def _pack_padded(M, shapes) -> _Packed:
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
    return _Packed(B, nrows, ncols, _float_dtype(M3), M3=M3, Mf=Mf, moff=moff)


def _pack_list(M) -> _Packed:
    # One pass, a few hundred ns per problem: each cost matrix stays in its own (float64,
    # C-contiguous) array, no gather into one buffer; its address is read in compiled code
    # (x.__array_interface__ costs ~2 us, as long as solving a 5 x 300 problem).
    B = len(M)
    mats = []
    nrows = np.empty(B, dtype=np.int64)
    ncols = np.empty(B, dtype=np.int64)
    m_addr = np.empty(B, dtype=np.int64)
    float_dtypes = set()
    data_address = _nb._data_address if HAS_NUMBA else None
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
        m_addr[p] = data_address(x)
        mats.append(x)
    out_dtype = np.result_type(*float_dtypes) if float_dtypes else np.dtype(np.float64)
    return _Packed(B, nrows, ncols, out_dtype, m_addr=m_addr, mats=mats)


def _batch_marginals(a, b, pk: _Packed, code: int, padded: bool):
    """(flat_a, aoff, flat_b, boff): the checked marginals, concatenated per problem."""
    aoff = np.zeros(pk.B, dtype=np.int64)
    np.cumsum(pk.nrows[:-1], out=aoff[1:])
    boff = np.zeros(pk.B, dtype=np.int64)
    np.cumsum(pk.ncols[:-1], out=boff[1:])
    flat_a = _flat_marginals(a, "a", pk.nrows, aoff, padded)
    flat_b = _flat_marginals(b, "b", pk.ncols, boff, padded)
    if code != 2:
        sa = np.add.reduceat(flat_a, aoff)
        sb = np.add.reduceat(flat_b, boff)
        bad = np.flatnonzero(~_sums_match(sa, sb, pk.out_dtype))
        if bad.size:
            p = int(bad[0])
            raise ValueError(f"the marginals of {bad.size} problems carry different mass (problem {p}: "
                             f"sum(a) = {sa[p]:.9g}, sum(b) = {sb[p]:.9g}); normalise both")
    return flat_a, aoff, flat_b, boff


def _batch_regs(reg, B: int) -> np.ndarray:
    regs = np.broadcast_to(np.asarray(reg, dtype=np.float64), (B,)).copy() if np.ndim(reg) == 0 \
        else np.asarray(_as_array(reg, "reg")[0], dtype=np.float64)
    if regs.shape != (B,):
        raise ValueError(f"reg must be a float or one value per problem ({B},), got shape {regs.shape}")
    if not (np.isfinite(regs).all() and (regs > 0).all()):
        raise ValueError("reg must be finite and > 0 for every problem")
    return regs


def _padded_output(pk: _Packed, out, shapes):
    """(flat plan buffer, the caller's `out` array or None, cost addresses, plan addresses)."""
    if out is not None:
        if not (isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == pk.M3.shape
                and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous float64 numpy array of shape "
                             f"{pk.M3.shape}")
        if shapes is not None:
            out.fill(0.0)
        out_buffer = out
        flat = out.reshape(-1)
    else:
        # every entry of a problem's own block is written; only padding needs zeros
        flat = np.zeros(pk.Mf.shape[0]) if shapes is not None else np.empty(pk.Mf.shape[0])
        out_buffer = None
    m_addr = pk.Mf.__array_interface__["data"][0] + 8 * pk.moff
    o_addr = flat.__array_interface__["data"][0] + 8 * pk.moff
    return flat, out_buffer, m_addr, o_addr


def _list_output(pk: _Packed):
    """(the plans as views of one buffer, their addresses)."""
    # one buffer for all plans, handed out as views: B small arrays would each fault in
    # their own 4 KiB pages, which costs more than solving a 5 x 300 problem
    sizes = pk.nrows * pk.ncols
    ooff = np.zeros(pk.B, dtype=np.int64)
    np.cumsum(sizes[:-1], out=ooff[1:])
    flat_out = np.empty(int(sizes.sum()))
    outs = [flat_out[o:o + n * m].reshape(n, m)
            for o, n, m in zip(ooff.tolist(), pk.nrows.tolist(), pk.ncols.tolist())]
    return outs, flat_out.__array_interface__["data"][0] + 8 * ooff


def _empty_result(pk: _Packed, padded: bool, log: bool):
    if not log:
        return [] if not padded else np.zeros((0,) + tuple(pk.M3.shape[1:]), dtype=pk.out_dtype)
    return [], {"niter": np.zeros(0, np.int64), "status": np.zeros(0, np.int64), "err": np.zeros(0)}


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
        backend: None or "numba" (the only form).

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
    form = choose_backend("sinkhorn_batched", (M,) if isinstance(M, torch.Tensor) else
                          ((M[0],) if torch_in else ()), backend=backend)
    pk = _pack_padded(M, shapes) if padded else _pack_list(M)
    if pk.B == 0:
        return _empty_result(pk, padded, log)
    flat_a, aoff, flat_b, boff = _batch_marginals(a, b, pk, code, padded)
    regs = _batch_regs(reg, pk.B)

    u = np.empty(flat_a.shape[0])
    v = np.empty(flat_b.shape[0])
    niter = np.zeros(pk.B, dtype=np.int64)
    status = np.zeros(pk.B, dtype=np.int64)
    err = np.zeros(pk.B)
    check_negative = code != 2 and not allow_negative_cost
    solve_many = _BATCH_FORMS[form].fn
    if padded:
        flat, out_buffer, m_addr, o_addr = _padded_output(pk, out, shapes)
        ld = np.full(pk.B, pk.M3.shape[2], dtype=np.int64)
        solve_many(code, m_addr, o_addr, ld, pk.nrows, pk.ncols, flat_a, aoff, flat_b, boff, regs, u, v,
                   numItermax, stopThr, check_negative, niter, status, err)
    else:
        if out is not None:
            raise ValueError("out= is for a padded (B, n, m) M; a list of problems gets a list of plans")
        outs, o_addr = _list_output(pk)
        solve_many(code, pk.m_addr, o_addr, pk.ncols, pk.nrows, pk.ncols, flat_a, aoff, flat_b, boff, regs,
                   u, v, numItermax, stopThr, check_negative, niter, status, err)
    _raise_bad_cost(status, "[p]")
    if code == 2:  # the plans of a list sit in one buffer, the base of their views
        _check_fixed_plans(flat if padded else (outs[0].base if outs[0].base is not None else outs[0]), "M")
    if warn and code != 2:
        _warn_status(status, niter, err, numItermax, stopThr, True)

    if padded:
        if out_buffer is not None:
            result = out_buffer
        else:
            plans = flat.reshape(pk.M3.shape).astype(pk.out_dtype, copy=False)
            result = torch.from_numpy(plans) if torch_in else plans
    else:
        result = outs if pk.out_dtype == np.float64 else [x.astype(pk.out_dtype) for x in outs]
        if torch_in:
            result = [torch.from_numpy(x) for x in result]
    if log:
        return result, {"niter": niter, "status": status, "err": err}
    return result
