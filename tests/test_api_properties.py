"""Property tests over the public API (issue 13): random shapes, dtypes, NaN/Inf, empty and
degenerate inputs. Every call must end in a clear error (ValueError / TypeError with a
message) or a finite, documented result -- never another exception, a hang or NaN."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from fastinterp import mutual_info_score, sinkhorn, sparse  # noqa: E402
from fastinterp.io import CorruptFileError, load_checked, load_tensor_checked  # noqa: E402
from fastinterp.kernels.mi import curve_auc, dataset_curve, mi_curves  # noqa: E402
from fastinterp.kernels.sinkhorn import sinkhorn_batched, sinkhorn_fixed  # noqa: E402
from fastinterp.llm import parse_judgement, parse_label, parse_score  # noqa: E402

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ValueError, TypeError)

special_floats = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, -1e300, np.nan, np.inf, -np.inf])
floats = st.one_of(st.floats(-1e3, 1e3, allow_nan=False), special_floats)


def _clear_or(fn, check):
    """Run fn; a clear error must carry a message; otherwise check the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn()
        except CLEAR as err:
            assert str(err).strip(), f"{type(err).__name__} without a message"
            return None
    check(out)
    return out


def _finite(x):
    arr = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    assert np.isfinite(arr).all(), arr


labels = st.one_of(
    hnp.arrays(st.sampled_from([np.int64, np.int8, np.uint64, np.bool_]), st.integers(0, 12)),
    hnp.arrays(np.float64, st.integers(0, 12), elements=floats),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=12),
    hnp.arrays(np.int64, st.tuples(st.integers(0, 3), st.integers(0, 3))),
    st.sampled_from([None, 3, "abc", 2.5]),
)


@settings(**SETTINGS)
@given(labels, labels)
def test_mutual_info_score(lt, lp):
    out = _clear_or(lambda: mutual_info_score(lt, lp), _finite)
    if out is not None:
        assert out >= 0.0


@settings(**SETTINGS)
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 4), st.integers(0, 4)), elements=floats))
def test_mutual_info_contingency(table):
    _clear_or(lambda: mutual_info_score(None, None, contingency=table), _finite)


costs = hnp.arrays(np.float64, st.tuples(st.integers(0, 5), st.integers(0, 5)), elements=floats)
weights = st.one_of(st.just([]), hnp.arrays(np.float64, st.integers(0, 6), elements=floats))


@settings(**SETTINGS)
@given(weights, weights, costs, st.one_of(floats, st.just(0.1)),
       st.sampled_from(["sinkhorn", "sinkhorn_log", "reference", "greenkhorn", "nope"]),
       st.sampled_from([np.float64, np.float32]), st.booleans())
def test_sinkhorn(a, b, M, reg, method, dtype, as_torch):
    args = [np.asarray(x, dtype=dtype) for x in (a, b, M)]
    if as_torch:
        args = [torch.from_numpy(x) for x in args]
    _clear_or(lambda: sinkhorn(*args, reg, method=method, numItermax=50), _finite)


@settings(**SETTINGS)
@given(st.lists(costs, max_size=4), st.one_of(floats, st.just(1.0)), st.sampled_from(["sinkhorn", "reference"]))
def test_sinkhorn_batched_and_fixed(Ms, reg, method):
    _clear_or(lambda: sinkhorn_batched(None, None, Ms, reg, 50, method=method), lambda out: [_finite(p) for p in out])
    _clear_or(lambda: sinkhorn_fixed(Ms, iters=20), lambda out: [_finite(p) for p in out])


@settings(**SETTINGS)
@given(st.integers(0, 4), st.integers(1, 6), st.integers(1, 12), st.integers(-1, 14),
       st.one_of(floats, st.just(0.3)), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from([None, "nan_x", "inf_x", "nan_g", "zero_g", "big_x"]))
def test_comp_topk(B, D, M, k, coh, dtype, fault):
    g = torch.Generator().manual_seed(B * 1000 + D * 100 + M)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    G = F.normalize(torch.randn(M, D, generator=g, dtype=dtype), dim=-1)
    if fault == "nan_x" and B:
        x[0, 0] = float("nan")
    elif fault == "inf_x" and B:
        x[-1, -1] = float("inf")
    elif fault == "nan_g":
        G[0, 0] = float("nan")
    elif fault == "zero_g":
        G[0] = 0.0
    elif fault == "big_x":
        x = x * 1e37

    def check(out):
        scores, idx = out
        _finite(scores)
        assert scores.shape == idx.shape == (B, k)
        assert ((idx >= 0) & (idx < M)).all() and all(len(set(r)) == k for r in idx.tolist())

    _clear_or(lambda: sparse.comp_topk(x, G, k=k, coh=coh), check)


ragged = st.lists(st.lists(st.integers(-3, 6), max_size=6), max_size=5)


@settings(**SETTINGS)
@given(ragged, ragged)
def test_mi_curves(vision, language):
    curves = _clear_or(lambda: mi_curves(vision, language), lambda cs: [_finite(c) for c in cs])
    if curves:
        _clear_or(lambda: curve_auc(dataset_curve(curves)), _finite)


@settings(**SETTINGS)
@given(st.text(max_size=60))
def test_reply_parsers(text):
    _clear_or(lambda: parse_label(text), lambda out: isinstance(out, str) and out)
    _clear_or(lambda: parse_judgement(text), lambda out: out in (0, 1))
    _clear_or(lambda: parse_score(text), lambda out: 1 <= out <= 5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_loading_random_bytes(tmp_path, blob):
    path = tmp_path / "f.pt"
    path.write_bytes(blob)
    for load in (load_checked, load_tensor_checked):
        with pytest.raises(CorruptFileError, match="f.pt"):
            load(path)
