"""Sinkhorn kernels (kernels/sinkhorn.py) against POT and the mutual-knowledge reference loop
(fastinterp/reference/mi.py: sinkhorn_reference)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastinterp
from fastinterp.kernels import sinkhorn as sk
from fastinterp.reference.mi import sinkhorn_reference

ot = pytest.importorskip("ot")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def problem(rng, n, m, uniform=False):
    M = rng.random((n, m)) * rng.uniform(0.5, 3.0)
    if uniform:
        return np.full(n, 1.0 / n), np.full(m, 1.0 / m), M
    a = rng.random(n) + 0.05
    b = rng.random(m) + 0.05
    return a / a.sum(), b / b.sum(), M


def pot(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ot.sinkhorn(*args, **kw)


@SETTINGS
@given(n=st.integers(1, 8), m=st.integers(1, 12), reg=st.floats(0.03, 3.0), seed=st.integers(0, 2**31 - 1),
       method=st.sampled_from(["sinkhorn", "sinkhorn_log"]), iters=st.sampled_from([1, 7, 100, 1000]))
def test_equals_pot_same_iterations(n, m, reg, seed, method, iters):
    a, b, M = problem(np.random.default_rng(seed), n, m)
    ours, log_ours = sk.sinkhorn(a, b, M, reg, numItermax=iters, method=method, log=True, warn=False)
    theirs, log_pot = pot(a, b, M, reg, method=method, numItermax=iters, log=True)
    assert log_ours["niter"] == log_pot["niter"]
    np.testing.assert_allclose(log_ours["err"], log_pot["err"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-15)
    assert fastinterp.sinkhorn is sk.sinkhorn


def test_pot_example_and_defaults():
    expected = np.array([[0.36552929, 0.13447071], [0.13447071, 0.36552929]])  # POT's docstring example
    np.testing.assert_allclose(sk.sinkhorn([.5, .5], [.5, .5], [[0., 1.], [1., 0.]], 1), expected, atol=1e-8)
    rng = np.random.default_rng(0)
    _, _, M = problem(rng, 4, 6)
    np.testing.assert_allclose(sk.sinkhorn([], [], M, 0.2), pot([], [], M, 0.2), atol=1e-12)
    # POT's positional order puts the method fifth
    np.testing.assert_allclose(sk.sinkhorn([], [], M, 0.2, "sinkhorn_log"),
                               pot([], [], M, 0.2, "sinkhorn_log"), atol=1e-12)


def test_log_dict_and_warmstart_like_pot():
    a, b, M = problem(np.random.default_rng(1), 5, 7)
    for method in ("sinkhorn", "sinkhorn_log"):
        P, lg = sk.sinkhorn(a, b, M, 0.1, method=method, log=True)
        Q, lq = pot(a, b, M, 0.1, method=method, log=True)
        for key in ("u", "v"):
            np.testing.assert_allclose(lg[key], lq[key], rtol=1e-9)
        warm = (np.log(lg["u"]) * 0.9, np.log(lg["v"]) * 0.9)
        P2, l2 = sk.sinkhorn(a, b, M, 0.1, method=method, log=True, warmstart=warm)
        Q2, lq2 = pot(a, b, M, 0.1, method=method, log=True, warmstart=warm)
        assert l2["niter"] == lq2["niter"]
        np.testing.assert_allclose(P2, Q2, atol=1e-12)


def test_torch_in_torch_out_and_float32():
    a, b, M = problem(np.random.default_rng(2), 5, 9)
    P = sk.sinkhorn(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(M), 0.3)
    assert isinstance(P, torch.Tensor) and P.dtype == torch.float64
    np.testing.assert_allclose(P.numpy(), pot(a, b, M, 0.3), atol=1e-12)
    P32 = sk.sinkhorn(a.astype(np.float32), b.astype(np.float32), M.astype(np.float32), 0.3, warn=False)
    assert P32.dtype == np.float32
    np.testing.assert_allclose(P32, pot(a, b, M, 0.3), atol=1e-6)


def test_small_reg_log_domain_stays_finite():
    rng = np.random.default_rng(3)
    a, b, M = problem(rng, 6, 8, uniform=True)
    M = 1.0 + 0.005 * M  # every exp(-M / 1e-3) underflows to 0; the log domain is unaffected
    with pytest.warns(UserWarning, match="numerical errors"):
        plain = sk.sinkhorn(a, b, M, 1e-3)
    assert plain.sum() == 0.0  # the plain form has lost all mass (POT's too)
    np.testing.assert_array_equal(plain, pot(a, b, M, 1e-3))
    P, lg = sk.sinkhorn(a, b, M, 1e-3, method="sinkhorn_log", numItermax=5000, log=True)
    assert np.isfinite(P).all() and np.isfinite(lg["log_u"]).all() and lg["status"] == sk.CONVERGED
    np.testing.assert_allclose(P.sum(1), a, atol=1e-12)
    np.testing.assert_allclose(P.sum(0), b, atol=1e-9)
    Q, lq = pot(a, b, M, 1e-3, method="sinkhorn_log", numItermax=5000, log=True)
    assert lg["niter"] == lq["niter"]
    np.testing.assert_allclose(P, Q, atol=1e-7)


def test_non_convergence_warns():
    a, b, M = problem(np.random.default_rng(4), 5, 5)
    with pytest.warns(UserWarning, match="did not converge"):
        sk.sinkhorn(a, b, M, 0.01, numItermax=3)


# ---------------------------------------------------------------- batched


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 25),
       method=st.sampled_from(["sinkhorn", "sinkhorn_log", "reference"]))
def test_batched_equals_per_problem(seed, count, method):
    rng = np.random.default_rng(seed)
    probs = [problem(rng, int(rng.integers(1, 6)), int(rng.integers(1, 15)), uniform=method == "reference")
             for _ in range(count)]
    regs = rng.uniform(0.05, 1.0, count)
    A = None if method == "reference" else [p[0] for p in probs]
    Bm = None if method == "reference" else [p[1] for p in probs]
    plans, lg = sk.sinkhorn_batched(A, Bm, [p[2] for p in probs], regs, numItermax=300, method=method,
                                    log=True, warn=False)
    for k, ((a, b, M), P) in enumerate(zip(probs, plans)):
        single, ls = sk.sinkhorn(a, b, M, regs[k], numItermax=300, method=method, log=True, warn=False)
        np.testing.assert_array_equal(P, single)
        assert lg["niter"][k] == ls["niter"]
        if method != "reference":
            ref_plan, lp = pot(a, b, M, regs[k], numItermax=300, method=method, log=True)
            assert lg["niter"][k] == lp["niter"]
            np.testing.assert_allclose(P, ref_plan, atol=1e-7)


def test_batched_padded_with_shapes_and_torch():
    rng = np.random.default_rng(5)
    B, n, m = 12, 5, 30
    M3 = rng.random((B, n, m))
    shapes = np.stack([rng.integers(1, n + 1, B), rng.integers(1, m + 1, B)], 1)
    a2 = rng.random((B, n)) + 0.1
    b2 = rng.random((B, m)) + 0.1
    for p, (r, c) in enumerate(shapes):
        a2[p, :r] /= a2[p, :r].sum()
        b2[p, :c] /= b2[p, :c].sum()
    out = sk.sinkhorn_batched(a2, b2, torch.from_numpy(M3), 0.2, shapes=shapes)
    assert isinstance(out, torch.Tensor) and out.shape == (B, n, m)
    for p, (r, c) in enumerate(shapes):
        np.testing.assert_allclose(out[p, :r, :c].numpy(), pot(a2[p, :r], b2[p, :c], M3[p, :r, :c], 0.2), atol=1e-12)
        assert float(out[p].sum()) == pytest.approx(1.0) and float(out[p, r:, :].abs().sum()) == 0.0
    full = sk.sinkhorn_batched(None, None, M3, 0.2)
    buf = np.full(M3.shape, np.nan)
    assert sk.sinkhorn_batched(None, None, M3, 0.2, out=buf) is buf
    np.testing.assert_array_equal(buf, full)
    sk.sinkhorn_batched(a2, b2, M3, 0.2, shapes=shapes, out=buf)
    np.testing.assert_array_equal(buf, out.numpy())
    with pytest.raises(ValueError, match="out must be"):
        sk.sinkhorn_batched(None, None, M3, 0.2, out=np.zeros((B, n, m), dtype=np.float32))
    np.testing.assert_array_equal(full[3], sk.sinkhorn([], [], M3[3], 0.2))
    assert sk.sinkhorn_batched(None, None, [], 0.2) == []



def test_padding_is_never_read_and_bad_costs_inside_are_found():
    """Padded problems narrower than the buffer are read row by row (strided); full-width ones
    in one pass: both must ignore the padding and both must see a bad entry in their block."""
    rng = np.random.default_rng(6)
    M3 = rng.random((3, 4, 50))
    shapes = np.array([[4, 50], [3, 20], [2, 7]])
    padded = M3.copy()
    padded[1, :, 20:] = np.nan
    padded[1, 3, :] = -1.0
    padded[2, 2:, :] = np.inf
    padded[2, :, 7:] = -5.0
    out = sk.sinkhorn_batched(None, None, padded, 0.5, shapes=shapes)
    for p, (r, c) in enumerate(shapes):
        np.testing.assert_allclose(out[p, :r, :c], pot([], [], M3[p, :r, :c], 0.5), atol=1e-12)
    for p, (i, j) in ((0, (3, 49)), (1, (2, 19)), (2, (1, 6))):
        bad = padded.copy()
        bad[p, i, j] = np.nan
        with pytest.raises(ValueError, match=rf"NaN or infinity \(problems \[{p}\]\)"):
            sk.sinkhorn_batched(None, None, bad, 0.5, shapes=shapes)
        bad[p, i, j] = -1.0
        with pytest.raises(ValueError, match=rf"negative costs \(problems \[{p}\]\)"):
            sk.sinkhorn_batched(None, None, bad, 0.5, shapes=shapes)

# ---------------------------------------------------------------- the reference's fixed loop


@pytest.mark.parametrize("shape", [(5, 40), (3, 3), (1, 7), (6, 1)])
def test_fixed_equals_reference_loop(shape):
    S = np.random.default_rng(6).uniform(-0.2, 0.4, shape)
    ours = sk.sinkhorn_fixed(S)
    expected = sinkhorn_reference(torch.from_numpy(S)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)
    # torch float32 in, float32 out, close to the reference's own float32 run
    ours32 = sk.sinkhorn_fixed(torch.from_numpy(S).float())
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), sinkhorn_reference(torch.from_numpy(S).float()).numpy(),
                               rtol=1e-4, atol=1e-6)
    # the same loop through the POT-style entry point: cost -2.5 S, reg 1
    np.testing.assert_allclose(sk.sinkhorn([], [], -2.5 * S, 1.0, method="reference"), expected,
                               rtol=1e-12, atol=1e-15)


def test_fixed_batched_forms_and_pot_equivalence():
    rng = np.random.default_rng(7)
    Ss = [rng.uniform(0.0, 0.4, (5, int(k))) for k in rng.integers(2, 30, 6)]
    plans = sk.sinkhorn_fixed(Ss, scale=2.5, epsilon=0.5, iters=50)
    for S, P in zip(Ss, plans):
        np.testing.assert_allclose(P, sinkhorn_reference(torch.from_numpy(S), 2.5, 0.5, 50).numpy(), rtol=1e-12)
        # after convergence the reference plan is POT's uniform-marginal plan scaled by m (columns sum to 1)
        Pc = sk.sinkhorn_fixed(S)
        np.testing.assert_allclose(Pc / S.shape[1], pot([], [], -2.5 * S, 1.0, stopThr=1e-14), atol=1e-9)
    S3 = np.stack([rng.uniform(0.0, 0.4, (4, 9)) for _ in range(3)])
    np.testing.assert_allclose(sk.sinkhorn_fixed(S3)[1], sk.sinkhorn_fixed(S3[1]), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (([], [], [[0.0, np.nan], [1.0, 0.0]], 1.0), {}, ValueError, "NaN"),
    (([], [], [[0.0, np.inf], [1.0, 0.0]], 1.0), {}, ValueError, "NaN or infinity"),
    (([], [], [[0.0, -1.0], [1.0, 0.0]], 1.0), {"allow_negative_cost": False}, ValueError, "negative costs"),
    (([0.5, 0.5], [1.0], np.ones((2, 2)), 1.0), {}, ValueError, "shape mismatch"),
    (([1.0], [0.5, 0.5], np.ones((2, 2)), 1.0), {}, ValueError, "shape mismatch"),
    (([1.5, -0.5], [0.5, 0.5], np.ones((2, 2)), 1.0), {}, ValueError, "negative entries"),
    (([np.nan, 0.5], [0.5, 0.5], np.ones((2, 2)), 1.0), {}, ValueError, "NaN"),
    (([], [], np.ones(3), 1.0), {}, ValueError, "2-D"),
    (([], [], np.ones((2, 2)), 0.0), {}, ValueError, "reg"),
    (([], [], np.ones((2, 2)), float("nan")), {}, ValueError, "reg"),
    (([], np.ones((2, 3, 1)) / 2, np.ones((2, 2)), 1.0), {}, ValueError, "1-D"),
    ((None, [], np.ones((2, 2)), 1.0), {}, TypeError, "a is None"),
    (([], [], np.ones((2, 2)), 1.0), {"method": "nope"}, ValueError, "choose one of"),
    (([], [], np.ones((2, 2)), 1.0), {"numItermax": -1}, ValueError, "numItermax"),
    (([0.9, 0.1], [0.5, 0.5], np.ones((2, 2)), 1.0), {"method": "reference"}, ValueError, "uniform"),
    (([], [], np.ones((2, 2)), 1.0), {"backend": "triton"}, ValueError, "no 'triton' form"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sk.sinkhorn(*args, **kwargs)


def test_negative_costs_allowed_on_request():
    a, b, M = problem(np.random.default_rng(8), 3, 4)
    P = sk.sinkhorn(a, b, M - 2.0, 0.5, allow_negative_cost=True)
    np.testing.assert_allclose(P, pot(a, b, M - 2.0, 0.5), atol=1e-12)
    np.testing.assert_allclose(P, sk.sinkhorn(a, b, M, 0.5), atol=1e-9)  # shift-invariant


@pytest.mark.parametrize("kwargs, match", [
    ({"M": [np.ones((2, 2)), np.array([[0.0, np.nan]])]}, r"NaN or infinity \(problems \[1\]\)"),
    ({"M": [np.ones((2, 2)), -np.ones((2, 2))]}, r"negative costs \(problems \[1\]\)"),
    ({"M": [np.ones((2, 2))], "a": [np.array([0.5, 0.5])], "b": [np.array([0.2, 0.2])]}, "different mass"),
    ({"M": [np.ones((2, 2)), np.ones((2, 2))], "a": [np.array([0.5, 0.5])]}, "1 marginals for 2 problems"),
    ({"M": [np.ones(3)]}, "2-D"),
    ({"M": np.ones((2, 3, 4)), "shapes": np.array([[3, 4], [4, 4]])}, "within"),
    ({"M": [np.ones((2, 2))], "reg": np.array([1.0, 2.0])}, "one value per problem"),
])
def test_batched_bad_input(kwargs, match):
    args = {"a": None, "b": None, "reg": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sk.sinkhorn_batched(args["a"], args["b"], args["M"], args["reg"], shapes=args.get("shapes"))
