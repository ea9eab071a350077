"""`fastinterp.sinkhorn` against POT's `ot.sinkhorn` on the calls POT's own Bregman tests make
(its test file is not in the wheel; these tests are written from reading it and POT's docs):
every call gives POT's result, POT's warnings and POT's log, whether our Numba kernel or POT
itself (for the cases the kernel does not cover) computed it."""
import warnings
from itertools import product

import numpy as np
import pytest
import torch

ot = pytest.importorskip("ot")

from fastinterp import sinkhorn  # noqa: E402
from fastinterp.kernels.dispatch import last_backend  # noqa: E402

METHODS = ["sinkhorn", "sinkhorn_log", "greenkhorn", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling"]


def _run(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _to_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _close(ours, theirs, rtol=1e-9, atol=1e-12):
    assert type(ours) is type(theirs) or (isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray))
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    elif isinstance(theirs, np.ndarray):
        assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    np.testing.assert_allclose(_to_np(ours), _to_np(theirs), rtol=rtol, atol=atol)


def same_as_pot(*args, rtol=1e-9, atol=1e-12, **kwargs):
    """Run both; the results, the UserWarnings and (with log=True) the log must agree.
    Returns the form that ran ours."""
    theirs, w_theirs = _run(ot.sinkhorn, *args, **kwargs)
    ours, w_ours = _run(sinkhorn, *args, **kwargs)
    form = last_backend.get("sinkhorn")
    if kwargs.get("log") or (len(args) > 8 and args[8]):
        (ours, log_ours), (theirs, log_theirs) = ours, theirs
        for key in log_theirs:
            if key == "err":
                np.testing.assert_allclose([float(e) for e in log_ours[key]], [float(e) for e in log_theirs[key]],
                                           rtol=1e-6, atol=1e-12)
            elif key == "niter":
                assert int(log_ours[key]) == int(log_theirs[key])
            else:
                _close(log_ours[key], log_theirs[key], rtol=1e-7, atol=1e-10)
    _close(ours, theirs, rtol=rtol, atol=atol)
    assert w_ours == w_theirs
    return form


def _points(n, seed=0, m=None):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 2)
    y = x if m is None else rng.randn(m, 2)
    return ot.utils.unif(n), ot.utils.unif(len(y)), ot.dist(x, y)


@pytest.mark.parametrize("verbose, warn", list(product([True, False], [True, False])))
def test_plain_call_verbose_and_warn(verbose, warn, capsys):
    u, _, M = _points(60)
    assert same_as_pot(u, u, M, 1, stopThr=1e-10, verbose=verbose, warn=warn) == "numba"
    for method in ("sinkhorn", "sinkhorn_log"):
        capsys.readouterr()
        sinkhorn(u, u, M, 1, method=method, stopThr=1e-10, verbose=verbose, warn=warn)
        printed = capsys.readouterr().out
        ot.sinkhorn(u, u, M, 1, method=method, stopThr=1e-10, verbose=verbose, warn=warn)
        assert printed == capsys.readouterr().out  # verbose prints POT's table
    same_as_pot(u, u, M, 1, stopThr=0, numItermax=1)  # POT's non-convergence warning


@pytest.mark.parametrize("method", METHODS)
def test_convergence_warning_every_method(method):
    n = 40
    a1, a2 = ot.datasets.make_1D_gauss(n, m=12, s=4), ot.datasets.make_1D_gauss(n, m=16, s=4)
    M = ot.utils.dist0(n)
    with pytest.warns(UserWarning):
        sinkhorn(a1, a2, M, 1.0, method=method, stopThr=0, numItermax=1)
    same_as_pot(a1, a2, M, 1.0, method=method, stopThr=0, numItermax=1, rtol=1e-7)


def test_unknown_method_is_a_value_error():
    u, _, M = _points(5)
    with pytest.raises(ValueError):
        ot.sinkhorn(u, u, M, 0.1, method="new_method")
    with pytest.raises(ValueError, match="new_method"):
        sinkhorn(u, u, M, 0.1, method="new_method")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_empty_weights(method):
    u, _, M = _points(30, seed=1)
    same_as_pot(u, u, M, 1, method=method, stopThr=1e-10, rtol=1e-7, atol=1e-10)
    same_as_pot([], [], M, 1, method=method, stopThr=1e-10, log=True, rtol=1e-7, atol=1e-10)


def test_kernel_forms_give_pots_log():
    u, v, M = _points(25, seed=2, m=17)
    assert same_as_pot(u, v, M, 0.5, method="sinkhorn", log=True) == "numba"
    assert same_as_pot(u, v, M, 0.05, method="sinkhorn_log", log=True, rtol=1e-8) == "numba"


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_stabilized", "sinkhorn_log"])
def test_several_histograms_b_give_pots_losses(method):
    rng = np.random.RandomState(0)
    n = 10
    x = rng.randn(n, 2)
    u = ot.utils.unif(n)
    b = rng.rand(n, 3)
    b = b / b.sum(0, keepdims=True)
    M = ot.dist(x, x)
    same_as_pot(u, b, M, 0.1, method=method, stopThr=1e-10, log=True)
    loss = sinkhorn(u, b, M, 0.1, method=method, stopThr=1e-10, warn=False)
    assert loss.shape == (3,)


def test_pots_positional_order_and_solver_keywords():
    u, v, M = _points(20, seed=3, m=12)
    # POT's order: (a, b, M, reg, method, numItermax, stopThr, verbose, log, warn, warmstart)
    same_as_pot(u, v, M, 0.3, "sinkhorn_log", 500, 1e-8, False, True, True, None, rtol=1e-8)
    same_as_pot(u, v, M, 0.3, "sinkhorn", 200)
    # keywords of POT's solvers go to POT
    same_as_pot(u, v, M, 1e-2, method="sinkhorn_stabilized", tau=10.0, print_period=5)
    same_as_pot(u, v, M, 0.5, method="sinkhorn", print_period=5)


def test_negative_costs_as_pot():
    u, v, M = _points(15, seed=4, m=9)
    assert same_as_pot(u, v, M - 3.0, 0.5) == "numba"
    same_as_pot(u, v, -M, 0.5, method="sinkhorn_log")
    same_as_pot(u, v, M - 1e4, 1.0, method="sinkhorn_log")


def test_unequal_masses_warn_and_run_as_pot():
    u, v, M = _points(12, seed=5, m=8)
    same_as_pot(u, 2 * v, M, 1.0)
    same_as_pot(u, 0.5 * v, M, 1.0, method="sinkhorn_log", log=True)


def test_warmstart_zero_weights_ints_and_lists():
    u, v, M = _points(10, seed=6, m=7)
    _, lg = ot.sinkhorn(u, v, M, 0.5, log=True)
    warm = (np.log(lg["u"]), np.log(lg["v"]))
    same_as_pot(u, v, M, 0.5, warmstart=warm, log=True)
    a = u.copy()
    a[0], a[1] = 0.0, a[1] + a[0]
    same_as_pot(a, v, M, 0.5)
    same_as_pot([0.5, 0.5], [0.5, 0.5], [[0, 1], [1, 0]], 1)
    same_as_pot(u, v, M, 0.5, numItermax=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"])
def test_torch_inputs_keep_type_and_dtype(dtype, method):
    u, v, M = _points(30, seed=7, m=20)
    ub, vb, Mb = (torch.tensor(x, dtype=dtype) for x in (u, v, M))
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else {}
    same_as_pot(ub, vb, Mb, 1.0, method=method, stopThr=1e-10, **tol)


def test_torch_autograd_gives_pots_differentiable_plan():
    u, v, M = _points(8, seed=8, m=6)
    grads = []
    for fn in (ot.sinkhorn, sinkhorn):
        Mt = torch.tensor(M, requires_grad=True)
        at = torch.tensor(u, requires_grad=True)
        plan = fn(at, torch.tensor(v), Mt, 0.5)
        assert plan.requires_grad
        (plan * Mt).sum().backward()
        grads.append((Mt.grad.clone(), at.grad.clone(), plan.detach()))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("args, kwargs, match", [
    (([], [], [[0.0, np.nan], [1.0, 0.0]], 1.0), {}, "NaN"),
    (([], [], np.ones((2, 2)), 0.0), {}, "reg"),
    (([np.nan, 0.5], [0.5, 0.5], np.ones((2, 2)), 1.0), {}, "NaN"),
    (([1.5, -0.5], [0.5, 0.5], np.ones((2, 2)), 1.0), {}, "negative"),
    (([], [], np.ones((2, 2)) - 1e4, 1.0), {}, "overflows"),  # POT: an infinite plan
])
def test_where_pot_returns_nan_we_refuse(args, kwargs, match):
    """POT returns NaN (or a plan from NaN potentials) with at most a warning; here a clear error."""
    with pytest.raises(ValueError, match=match):
        sinkhorn(*args, **kwargs)
