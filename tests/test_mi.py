"""Mutual information kernels (kernels/mi.py) against scikit-learn and the reference semantics
(fastinterp/reference/mi.py, SPEC.md 3.3)."""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastinterp
from fastinterp.kernels import mi
from fastinterp.reference import mi as ref

sklearn_metrics = pytest.importorskip("sklearn.metrics")
sk_mis = sklearn_metrics.mutual_info_score

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.lists(st.integers(0, 12), min_size=0, max_size=9)  # small alphabet: matches and duplicates


# ---------------------------------------------------------------- sklearn's mutual_info_score


@SETTINGS
@given(n=st.integers(1, 300), k1=st.integers(1, 12), k2=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_mutual_info_score_equals_sklearn(n, k1, k2, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k1, n)
    b = rng.integers(-3, k2, n)
    assert mi.mutual_info_score(a, b) == pytest.approx(sk_mis(a, b), abs=1e-12, rel=1e-12)


@pytest.mark.parametrize("make", [
    lambda rng: (rng.integers(0, 10**12, 2000), rng.integers(0, 40, 2000)),       # sparse range: sort path
    lambda rng: (rng.integers(0, 3000, 2000), rng.integers(0, 3000, 2000)),       # big table: sort path
    lambda rng: (np.array(list("abcabcaabz")), rng.integers(0, 3, 10)),            # strings
    lambda rng: (rng.integers(0, 4, 50).astype(float), rng.integers(0, 4, 50)),     # integral floats
    lambda rng: (rng.random(30) < 0.5, rng.integers(0, 3, 30)),                     # booleans
    lambda rng: (torch.tensor(rng.integers(0, 5, 40)), torch.tensor(rng.integers(0, 5, 40))),
    lambda rng: ([7] * 20, list(rng.integers(0, 5, 20))),                           # one cluster -> 0
    lambda rng: ([1], [2]),
])
def test_mutual_info_score_inputs(make):
    a, b = make(np.random.default_rng(0))
    expected = sk_mis(np.asarray(a), np.asarray(b))
    assert mi.mutual_info_score(a, b) == pytest.approx(expected, abs=1e-12, rel=1e-12)
    assert fastinterp.mutual_info_score is mi.mutual_info_score


def test_mutual_info_score_continuous_warns_like_sklearn():
    a, b = [1.5, 2.5, 2.5, 0.5], [1, 1, 2, 2]
    with pytest.warns(UserWarning, match="discrete values"):
        ours = mi.mutual_info_score(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == pytest.approx(sk_mis(a, b), abs=1e-12)


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_mutual_info_score_contingency_equals_sklearn(rows, cols, seed):
    table = np.random.default_rng(seed).integers(0, 5, (rows, cols))
    table[0, 0] += 1  # never all zeros
    assert mi.mutual_info_score(None, None, contingency=table) == pytest.approx(
        sk_mis(None, None, contingency=table), abs=1e-12, rel=1e-12)


@pytest.mark.parametrize("a, b, exc, match", [
    ([1, 2, 3], [1, 2], ValueError, r"inconsistent numbers of samples: \[3, 2\]"),
    (np.zeros((2, 3)), np.zeros((2, 3)), ValueError, "labels_true must be 1D"),
    ([0, 1], np.zeros((2, 1)), ValueError, "labels_pred must be 1D"),
    ([0.0, np.nan, 1.0], [1, 2, 3], ValueError, "NaN"),
    ([0.0, np.inf, 1.0], [1, 2, 3], ValueError, "infinity"),
    (None, None, ValueError, "1D"),
    (1, 1, ValueError, "array-like"),
    ([1j, 2], [1, 2], ValueError, "Complex"),
    ([], [], ValueError, "empty"),
])
def test_mutual_info_score_bad_input(a, b, exc, match):
    with pytest.raises(exc, match=match):
        mi.mutual_info_score(a, b)


@pytest.mark.parametrize("table, match", [
    (np.array([[1, -2], [3, 4]]), "negative"),
    (np.array([[0, 0], [0, 0]]), "all zeros"),
    (np.array([1, 2]), "2-D"),
    (np.array([[1.5, 2.0], [3.0, 4.0]]), "non-integer"),
    (np.array([[np.nan, 2.0], [3.0, 4.0]]), "NaN"),
])
def test_mutual_info_score_bad_contingency(table, match):
    with pytest.raises(ValueError, match=match):
        mi.mutual_info_score(None, None, contingency=table)


# ---------------------------------------------------------------- the paper's MI and its curves


def test_closed_form_against_formula():
    """ln N + ln M - ln(1/k + 1e-9) for k matches (duplicates count), 0 for none."""
    x, y = [3, 5, 5, 9], [5, 1, 3, 5, 7]  # matches: 3-3, 5-5 x2, 5-5 x2 -> k = 5
    k = 5
    expected = math.log(4) + math.log(5) - math.log(1 / k + 1e-9)
    assert mi.paper_mutual_info(x, y) == pytest.approx(expected, abs=1e-12)
    assert ref.paper_mi_reference(x, y) == pytest.approx(expected, abs=1e-12)
    assert abs(expected - (math.log(4) + math.log(5) + math.log(k))) < 1e-7  # ~ ln N + ln M + ln k
    assert mi.paper_mutual_info([1, 2], [3, 4]) == 0.0


@SETTINGS
@given(pairs=st.lists(st.tuples(ids, ids), min_size=1, max_size=12))
def test_curves_equal_reference(pairs):
    X = [p[0] for p in pairs]
    Y = [p[1] for p in pairs]
    for variant in ("reference", "textbook"):
        curves = mi.mi_curves(X, Y, variant=variant)
        assert len(curves) == len(pairs)
        for x, y, c in zip(X, Y, curves):
            expected = ref.mi_curve_reference(x, y, variant=variant)
            assert c.dtype == np.float64 and c.shape == (len(x) + 1,)
            np.testing.assert_allclose(c, expected, rtol=0, atol=1e-12)
            assert c[-1] == 0.0  # every vision concept removed: nothing matches


@SETTINGS
@given(x=ids, y=ids)
def test_textbook_variant_equals_sklearn_contingency(x, y):
    table = np.array([[1 if a == b else 0 for b in y] for a in x], dtype=np.int64).reshape(len(x), len(y))
    if table.sum() == 0:
        assert mi.paper_mutual_info(x, y, variant="textbook") == 0.0
        return
    assert mi.paper_mutual_info(x, y, variant="textbook") == pytest.approx(
        sk_mis(None, None, contingency=table), abs=1e-12)
    assert ref.textbook_mi_reference(x, y) == pytest.approx(sk_mis(None, None, contingency=table), abs=1e-12)


def test_curves_edge_cases():
    curves = mi.mi_curves([[], [4, 4], [1, 2, 3], [7]], [[1, 2], [], [9, 8], [7, 7, 7]])
    assert [c.tolist() for c in curves[:3]] == [[0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    expected = ref.mi_curve_reference([7], [7, 7, 7])
    np.testing.assert_allclose(curves[3], expected, atol=1e-12)
    assert curves[3][0] == pytest.approx(math.log(1) + math.log(3) - math.log(1 / 3 + 1e-9), abs=1e-12)
    assert mi.mi_curves([], []) == []


def test_curves_input_forms_agree():
    rng = np.random.default_rng(1)
    X = rng.integers(0, 30, (20, 6))
    Y = rng.integers(0, 30, (20, 10))
    expected = mi.mi_curves(X.tolist(), Y.tolist())
    for xs, ys in [(X, Y), (list(X), list(Y)), (torch.from_numpy(X), torch.from_numpy(Y)),
                   ([torch.from_numpy(r) for r in X], [tuple(r) for r in Y.tolist()]),
                   (X.astype(np.float32), Y.astype(np.int32))]:
        got = mi.mi_curves(xs, ys)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    values, offsets = mi.mi_curves_flat(X.reshape(-1), np.arange(21) * 6, Y.reshape(-1), np.arange(21) * 10)
    np.testing.assert_array_equal(values, np.concatenate(expected))
    assert offsets.tolist() == list(range(0, 141, 7))


def test_curves_many_images_parallel_matches_reference_subset():
    rng = np.random.default_rng(2)
    X = [rng.choice(60, size=rng.integers(0, 16), replace=False) for _ in range(3000)]
    Y = [rng.choice(60, size=rng.integers(1, 51), replace=False) for _ in range(3000)]
    curves = mi.mi_curves(X, Y)
    for b in range(0, 3000, 97):
        np.testing.assert_allclose(curves[b], ref.mi_curve_reference(X[b], Y[b]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("X, Y, exc, match", [
    ([[1, 2]], [[1], [2]], ValueError, "one of each per image"),
    ([[1.5, 2]], [[1]], ValueError, "non-integer"),
    ([[np.nan, 2]], [[1]], ValueError, "NaN"),
    ([["a", "b"]], [[1]], TypeError, "integer ids"),
    ([[[1, 2]]], [[1]], ValueError, "1-D"),
])
def test_curves_bad_input(X, Y, exc, match):
    with pytest.raises(exc, match=match):
        mi.mi_curves(X, Y)


def test_curves_bad_variant_and_backend():
    with pytest.raises(ValueError, match="variant"):
        mi.mi_curves([[1]], [[1]], variant="nmi")
    with pytest.raises(ValueError, match="no 'triton' form"):
        mi.mi_curves([[1]], [[1]], backend="triton")


# ---------------------------------------------------------------- dataset curve and AUC


@SETTINGS
@given(curves=st.lists(st.lists(st.floats(0, 10), min_size=1, max_size=8), min_size=1, max_size=10))
def test_dataset_curve_and_auc(curves):
    width = max(len(c) for c in curves)
    exact = [sum((c[t] if t < len(c) else 0.0) for c in curves) / len(curves) for t in range(width)]
    ours = mi.dataset_curve(curves)
    np.testing.assert_allclose(ours, exact, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mi.dataset_curve(curves, dtype=np.float32), ref.dataset_curve_reference(curves),
                               rtol=1e-6, atol=1e-5)
    for c in curves:
        assert mi.curve_auc(c) == pytest.approx(ref.curve_auc_reference(c), rel=1e-12, abs=1e-12)
    assert mi.curve_auc(ours) == pytest.approx(sum(exact) / width, rel=1e-12, abs=1e-12)


def test_dataset_curve_of_mi_curves_matches_reference_pipeline():
    rng = np.random.default_rng(3)
    X = [list(rng.choice(40, size=rng.integers(1, 12), replace=False)) for _ in range(40)]
    Y = [list(rng.choice(40, size=20, replace=False)) for _ in range(40)]
    ref_curves = [ref.mi_curve_reference(x, y) for x, y in zip(X, Y)]
    ours = mi.dataset_curve(mi.mi_curves(X, Y))
    np.testing.assert_allclose(ours, mi.dataset_curve(ref_curves), atol=1e-12, rtol=0)
    np.testing.assert_allclose(ours, ref.dataset_curve_reference(ref_curves), rtol=1e-6)
    assert mi.curve_auc(ours) == pytest.approx(ref.curve_auc_reference(list(ours)), rel=1e-12)


def test_dataset_curve_and_auc_errors():
    with pytest.raises(ValueError, match="at least one"):
        mi.dataset_curve([])
    with pytest.raises(ValueError, match="NaN"):
        mi.dataset_curve([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="empty"):
        mi.curve_auc([])
    with pytest.raises(ValueError, match="NaN"):
        mi.curve_auc([0.0, float("inf")])
