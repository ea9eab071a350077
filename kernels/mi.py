"""Contingency-table mutual information and MI-dynamics curves (Numba, CPU).

Two things live here:

* ``mutual_info_score(labels_true, labels_pred, *, contingency=None)``: scikit-learn's
  ``sklearn.metrics.mutual_info_score`` contract and result (natural log), without the
  sparse-matrix detour: labels are turned into integer codes and counted in one Numba pass.

* The mutual-knowledge MI of SPEC.md section 3.3 and its dynamics, batched over many images
  with ragged lengths in ONE parallel Numba call:
  ``mi_curves(vision_ids, language_ids) -> list of (N_b + 1,) float64 curves``,
  ``dataset_curve(curves)`` and ``curve_auc(curve)``.

The paper's MI in closed form. The reference builds the N x M table T (T_ij = 1 where
X_i == Y_j; duplicates within X or Y each count), so with k = sum T >= 1 matching pairs every
nonzero cell of p = T / k is 1/k and

    H  = -sum p ln(p + 1e-9) = -k * (1/k) * ln(1/k + 1e-9)      (zero cells add 0 * ln 1e-9 = 0)
    MI = ln N + ln M + H      = ln N + ln M - ln(1/k + 1e-9)     (~ ln N + ln M + ln k)

and MI = 0 when k = 0 (the reference's 0 / 0 = NaN is mapped to 0). The 1e-9 makes it
differ from ln N + ln M + ln k by about k * 1e-9, which is why the kernel evaluates the
formula with the 1e-9 rather than ln k. Removing vision concept t removes its c_t = #{j:
Y_j == X_t} matches, so a whole curve needs only the per-row match counts: O(N * M) per
image instead of the reference's O(N^2 * M) Python loop.

Empty X or Y: the original code returns ln 0 = -inf; here (and in
``fastinterp.reference.mi``) MI = 0 ("0 when nothing matches", SPEC.md).

The textbook variant (``variant="textbook"``) is the mutual information of the same table
read as a joint distribution over (row, column): sum p_ij ln(p_ij / (p_i p_j)), exactly what
``sklearn.metrics.mutual_info_score(None, None, contingency=T)`` returns; 0 when nothing
matches.
"""
from __future__ import annotations

import itertools
import numbers
import warnings

import numpy as np
import torch

from .dispatch import HAS_NUMBA, choose_backend, numba_form, register

if HAS_NUMBA:
    import numba

    from . import mi_numba as _nb

__all__ = [
    "FORMS",
    "curve_auc",
    "dataset_curve",
    "mi_curves",
    "mi_curves_flat",
    "mutual_info_score",
    "paper_mutual_info",
]

VARIANTS = ("reference", "textbook")
_EPS = float(np.finfo(np.float64).eps)

# the kernels' forms: Numba only (CPU); without numba, `choose_backend` raises on a call
FORMS = {
    "mi_curves": register("mi_curves", numba_form(_nb._mi_curves_kernel if HAS_NUMBA else None)),
    "mutual_info_score": register("mutual_info_score", numba_form(_nb._mi_from_codes if HAS_NUMBA else None)),
    "mutual_info_contingency": register("mutual_info_contingency",
                                        numba_form(_nb._mi_from_table if HAS_NUMBA else None)),
}
_CURVE_FORMS = FORMS["mi_curves"]

# ----------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------


def _as_int_ids(values: np.ndarray, what: str) -> np.ndarray:
    """1-D int64 copy of id values; a clear error for NaN, non-integers and non-numbers."""
    if values.size == 0:
        return values.astype(np.int64).reshape(-1)
    kind = values.dtype.kind
    if kind in "iu":
        if kind == "u" and values.dtype.itemsize == 8 and values.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{what}: ids above 2**63 - 1 are not supported; re-number them")
        return values.astype(np.int64, copy=False)
    if kind == "b":
        return values.astype(np.int64)
    if kind == "f":
        if not np.isfinite(values).all():
            raise ValueError(f"{what} contain NaN or infinity; ids must be finite integers")
        as_int = values.astype(np.int64)
        if not np.array_equal(as_int, values):
            raise ValueError(f"{what} contain non-integer values; ids must be integers "
                             f"(e.g. indices into the descriptor list)")
        return as_int
    raise TypeError(f"{what} must be integer ids (got dtype {values.dtype}); map labels such as "
                    f"strings to integer ids first, e.g. their index in the descriptor list")


def _to_numpy(seq) -> np.ndarray:
    if isinstance(seq, torch.Tensor):
        if seq.is_cuda:
            raise RuntimeError("the MI kernels run on the CPU: move the id tensors to the CPU")
        return seq.detach().numpy()
    return np.asarray(seq)


def _flatten_ragged(seqs, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A sequence of 1-D id sequences -> (values int64, offsets int64 of length B + 1)."""
    if isinstance(seqs, (np.ndarray, torch.Tensor)) and seqs.ndim == 2:  # rectangular batch
        arr = _to_numpy(seqs)
        lengths = np.full(arr.shape[0], arr.shape[1], dtype=np.int64)
        values = _as_int_ids(arr.reshape(-1), what)
    else:
        if isinstance(seqs, (np.ndarray, torch.Tensor)) and seqs.ndim != 2 and seqs.dtype != object:
            raise ValueError(f"{what}: expected a list of 1-D id sequences (one per image) or a "
                             f"2-D array, got an array of shape {tuple(seqs.shape)}")
        seqs = list(seqs)
        if all(type(s) in (list, tuple) for s in seqs):
            lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
            values = np.asarray(list(itertools.chain.from_iterable(seqs)))
            if values.ndim != 1:
                raise ValueError(f"{what}: each image's ids must be a flat 1-D sequence")
        else:
            parts = [_to_numpy(s) for s in seqs]
            for b, p in enumerate(parts):
                if p.ndim != 1:
                    raise ValueError(f"{what}[{b}] must be a 1-D sequence of ids, got shape {p.shape}")
            lengths = np.fromiter((p.shape[0] for p in parts), dtype=np.int64, count=len(parts))
            values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        values = _as_int_ids(values, what)
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.ascontiguousarray(values), offsets


def _check_variant(variant: str) -> bool:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose 'reference' (the paper's MI as the "
                         f"reference code computes it) or 'textbook' (sklearn's contingency MI)")
    return variant == "textbook"


# ----------------------------------------------------------------------------------------
# Public API: mutual-knowledge MI curves
# ----------------------------------------------------------------------------------------


def mi_curves_flat(vision_values, vision_offsets, language_values, language_offsets, *,
                   variant: str = "reference", backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The batched kernel on pre-flattened inputs (the fastest entry point).

    Args:
        vision_values: (sum N_b,) int64, image b's vision ids in importance order at
            ``vision_values[vision_offsets[b]:vision_offsets[b + 1]]``.
        vision_offsets: (B + 1,) int64, non-decreasing, starting at 0.
        language_values, language_offsets: the same for the language ids (M_b per image).
        variant: "reference" (paper Eq. 1 as the reference computes it) or "textbook".
        backend: None or "numba" (the only form).

    Returns:
        (values, offsets): (sum (N_b + 1),) float64 and (B + 1,) int64; image b's curve is
        ``values[offsets[b]:offsets[b + 1]]``.
    """
    textbook = _check_variant(variant)
    form = choose_backend("mi_curves", (), backend=backend)
    return _curves_flat(vision_values, vision_offsets, language_values, language_offsets, textbook, form)


def _curves_flat(vision_values, vision_offsets, language_values, language_offsets, textbook, form):
    xv = np.ascontiguousarray(vision_values, dtype=np.int64)
    xo = np.ascontiguousarray(vision_offsets, dtype=np.int64)
    yv = np.ascontiguousarray(language_values, dtype=np.int64)
    yo = np.ascontiguousarray(language_offsets, dtype=np.int64)
    for vals, offs, what in ((xv, xo, "vision"), (yv, yo, "language")):
        if vals.ndim != 1 or offs.ndim != 1 or offs.shape[0] < 1:
            raise ValueError(f"{what}: values and offsets must be 1-D, offsets of length B + 1")
        if offs[0] != 0 or offs[-1] != vals.shape[0] or np.any(np.diff(offs) < 0):
            raise ValueError(f"{what}_offsets must start at 0, never decrease and end at "
                             f"len({what}_values) = {vals.shape[0]}")
    if xo.shape[0] != yo.shape[0]:
        raise ValueError(f"{xo.shape[0] - 1} images of vision ids but {yo.shape[0] - 1} of "
                         f"language ids: pass one pair per image")
    n_images = xo.shape[0] - 1
    out_offsets = xo + np.arange(n_images + 1, dtype=np.int64)
    out = np.empty(out_offsets[-1], dtype=np.float64)
    if n_images:
        _CURVE_FORMS[form].fn(xv, xo, yv, yo, textbook, out)
    return out, out_offsets


def mi_curves(vision_ids, language_ids, *, variant: str = "reference",
              backend: str | None = None) -> list[np.ndarray]:
    """MI-dynamics curves for many images in one parallel Numba call.

    Args:
        vision_ids: B sequences of integer ids (lists, numpy arrays or CPU torch tensors; or
            one 2-D (B, N) array), image b's vision concepts in importance order (N_b each,
            ragged).
        language_ids: B sequences of integer ids, image b's language concepts (M_b each).
        variant: "reference" (default): the paper's MI exactly as the reference computes it
            (``ln N + ln M - ln(1/k + 1e-9)`` for k >= 1 matching pairs, 0 for none);
            "textbook": sklearn's contingency MI of the same N x M table.
        backend: None or "numba" (the only form).

    Returns:
        B float64 arrays, curve b of shape (N_b + 1,): MI after removing the first t vision
        concepts (replaced by an id no language concept has), t = 0..N_b.
    """
    if not isinstance(vision_ids, (np.ndarray, torch.Tensor)):
        vision_ids = list(vision_ids)
    if not isinstance(language_ids, (np.ndarray, torch.Tensor)):
        language_ids = list(language_ids)
    sample = [vision_ids, language_ids] + list(vision_ids[:1]) + list(language_ids[:1])
    form = choose_backend("mi_curves", [s for s in sample if isinstance(s, torch.Tensor)], backend=backend)
    xv, xo = _flatten_ragged(vision_ids, "vision_ids")
    yv, yo = _flatten_ragged(language_ids, "language_ids")
    if xo.shape[0] != yo.shape[0]:
        raise ValueError(f"{xo.shape[0] - 1} vision id lists but {yo.shape[0] - 1} language id "
                         f"lists: pass one of each per image")
    values, offsets = _curves_flat(xv, xo, yv, yo, _check_variant(variant), form)
    bounds = offsets.tolist()
    return [values[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def paper_mutual_info(vision_ids, language_ids, *, variant: str = "reference") -> float:
    """MI of one image's vision ids (N,) and language ids (M,): ``mi_curves`` point t = 0."""
    return float(mi_curves([vision_ids], [language_ids], variant=variant)[0][0])


def dataset_curve(curves, *, dtype=np.float64) -> np.ndarray:
    """Zero-pad the curves to the longest and average point-wise: (max_b len(curve_b),).

    The reference does this in float32 (``torch.FloatTensor``); pass ``dtype=np.float32`` to
    get its precision, the default float64 is the exact mean.
    """
    curves = [c if isinstance(c, np.ndarray) and c.ndim == 1 else _to_numpy(c).reshape(-1)
              for c in curves]
    if not curves:
        raise ValueError("dataset_curve needs at least one curve")
    lengths = np.fromiter(map(len, curves), dtype=np.int64, count=len(curves))
    flat = np.concatenate(curves).astype(np.float64, copy=False)
    if flat.dtype.kind != "f" or not np.isfinite(flat).all():
        raise ValueError("a curve contains NaN or infinity (or is not numeric)")
    width = int(lengths.max())
    if width == 0:
        raise ValueError("dataset_curve of empty curves: a curve has N + 1 >= 1 points")
    padded = np.zeros((len(curves), width), dtype=dtype)
    mask = np.arange(width)[None, :] < lengths[:, None]
    padded[mask] = flat
    return padded.mean(axis=0, dtype=dtype)


def curve_auc(curve) -> float:
    """Area under an MI curve as the paper defines it: the mean of its points."""
    c = _to_numpy(curve).astype(np.float64, copy=False).reshape(-1)
    if c.shape[0] == 0:
        raise ValueError("curve_auc of an empty curve: a curve has N + 1 >= 1 points")
    if not np.isfinite(c).all():
        raise ValueError("the curve contains NaN or infinity")
    return float(c.mean())


# ----------------------------------------------------------------------------------------
# Public API: scikit-learn's mutual_info_score
# ----------------------------------------------------------------------------------------


class InvalidParameterError(ValueError, TypeError):
    """A parameter of the wrong type, as scikit-learn's `InvalidParameterError` (which is
    both a ValueError and a TypeError, so either `except` catches it)."""


def _is_array_like(x) -> bool:
    """scikit-learn's "array-like": has a length, a shape or __array__, and is not a scalar
    (a string is a scalar)."""
    if isinstance(x, (str, bytes)) or np.isscalar(x) or isinstance(x, numbers.Number):
        return False
    return hasattr(x, "__len__") or hasattr(x, "shape") or hasattr(x, "__array__")


def _labels_array(labels, name: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} must be 1D: shape is ()")
    if not _is_array_like(labels):
        raise InvalidParameterError(f"The '{name}' parameter of mutual_info_score must be an array-like or None. "
                                    f"Got {labels!r} instead.")
    arr = _to_numpy(labels)
    if arr.dtype.kind == "c":
        raise ValueError(f"Complex data not supported ({name})")
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise ValueError(f"Input contains NaN ({name}).")
        if np.isinf(arr).any():
            raise ValueError(f"Input contains infinity or a value too large for {arr.dtype!r} ({name}).")
    return arr


def _target_type(arr: np.ndarray) -> str:
    """scikit-learn's `type_of_target` for 1-D labels: continuous, binary or multiclass."""
    if arr.dtype.kind == "f" and arr.size and not np.array_equal(arr, np.floor(arr)):
        return "continuous"
    return "binary" if np.unique(arr).size <= 2 else "multiclass"


def _warn_continuous(lt: np.ndarray, lp: np.ndarray) -> None:
    continuous = [a.dtype.kind == "f" and a.size and not np.array_equal(a, np.floor(a)) for a in (lt, lp)]
    if any(continuous):
        warnings.warn(f"Clustering metrics expects discrete values but received {_target_type(lt)} values "
                      f"for label, and {_target_type(lp)} values for target", UserWarning, stacklevel=3)


def _codes(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes 0..K-1 (some possibly unused) for 1-D labels, and K."""
    kind = arr.dtype.kind
    if kind == "f":
        as_int = arr.astype(np.int64)
        if np.array_equal(as_int, arr):
            arr, kind = as_int, "i"
    if kind == "b":
        arr, kind = arr.astype(np.uint8), "u"
    if kind in "iu" and arr.size:
        lo, hi = arr.min(), arr.max()
        if int(hi) - int(lo) <= 4 * arr.size + 1024:  # dense range: codes are the offsets from the minimum
            # subtract in the labels' own dtype (uint64 labels above 2**63 do not fit int64; arr >= lo)
            return (arr - lo).astype(np.int64), int(hi) - int(lo) + 1
    _, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    return inverse, int(inverse.max()) + 1 if inverse.size else 0


def mutual_info_score(labels_true, labels_pred, *, contingency=None) -> float:
    """Mutual information (natural log) between two clusterings: scikit-learn's contract.

    Args:
        labels_true: (n_samples,) labels (any hashable dtype numpy can sort; ints, strings).
        labels_pred: (n_samples,) labels.
        contingency: optional (n_classes, n_clusters) table of counts (dense array, or a
            scipy sparse matrix); when given, the labels are ignored (pass None).

    Returns:
        MI as a Python float, equal to ``sklearn.metrics.mutual_info_score`` (to ~1e-12).

    Errors as scikit-learn's for labels that are not 1-D, have different lengths, contain
    NaN/inf or complex numbers; continuous labels warn. Empty labels raise a ValueError
    (scikit-learn fails with "math domain error"); a contingency table must hold
    non-negative integer counts, not all zero.
    """
    if contingency is None:
        lt = _labels_array(labels_true, "labels_true")
        lp = _labels_array(labels_pred, "labels_pred")
        if lt.ndim == 1 and lp.ndim == 1:
            _warn_continuous(lt, lp)
        for arr, name in ((lt, "labels_true"), (lp, "labels_pred")):
            if arr.ndim != 1:
                raise ValueError(f"{name} must be 1D: shape is {arr.shape!r}")
        if lt.shape[0] != lp.shape[0]:
            raise ValueError("Found input variables with inconsistent numbers of samples: "
                             f"[{lt.shape[0]}, {lp.shape[0]}]")
        if lt.shape[0] == 0:
            raise ValueError("mutual_info_score of empty labelings is undefined: pass at least "
                             "one sample")
        ct, n_rows = _codes(lt)
        cp, n_cols = _codes(lp)
        dense_limit = max(8 * ct.shape[0], 1 << 16)
        form = choose_backend("mutual_info_score")
        return float(FORMS["mutual_info_score"][form].fn(ct, cp, n_rows, n_cols, dense_limit))

    table = contingency
    if not _is_array_like(table) and not hasattr(table, "toarray"):
        raise InvalidParameterError(f"The 'contingency' parameter of mutual_info_score must be an array-like, "
                                    f"a sparse matrix or None. Got {table!r} instead.")
    if hasattr(table, "toarray"):  # scipy sparse
        table = table.toarray()
    table = _to_numpy(table)
    if table.ndim != 2:
        raise ValueError(f"contingency must be a 2-D table of counts, got shape {table.shape}")
    if table.dtype.kind not in "iubf":
        raise TypeError(f"contingency must hold numbers, got dtype {table.dtype}")
    if table.dtype.kind == "f":
        if not np.isfinite(table).all():
            raise ValueError("contingency contains NaN or infinity; it must hold counts")
        if not np.array_equal(table, np.floor(table)):
            raise ValueError("contingency holds non-integer values; it must hold counts")
    if table.size and table.min() < 0:
        raise ValueError("contingency holds negative values; it must hold counts >= 0")
    if table.size and float(table.sum(dtype=np.float64)) >= 2.0 ** 62:
        raise ValueError(f"contingency counts sum to {float(table.sum(dtype=np.float64)):.3g}, beyond int64 "
                         f"arithmetic (2**62); these are not sample counts")
    table = np.ascontiguousarray(table, dtype=np.int64)
    if table.size == 0 or not table.any():
        raise ValueError("contingency is empty or all zeros: mutual information is undefined")
    form = choose_backend("mutual_info_contingency")
    return float(FORMS["mutual_info_contingency"][form].fn(table))


def numba_threads() -> int:
    """Threads the parallel kernels use (NUMBA_NUM_THREADS); 0 without numba."""
    return numba.get_num_threads() if HAS_NUMBA else 0
