"""Property tests (hypothesis) and input validation for fastinterp.sparse."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastinterp import sparse
from fastinterp.reference import sparse as ref

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_b=12, max_d=16, max_m=24):
    b = draw(st.integers(0, max_b))
    d = draw(st.integers(1, max_d))
    m = draw(st.integers(1, max_m))
    k = draw(st.integers(1, min(m, 6)))
    seed = draw(st.integers(0, 2**31 - 1))
    dup = draw(st.booleans())  # duplicated atoms: exact ties in every score
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    if dup and m >= 2:
        dictionary[m // 2] = dictionary[0]
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, dictionary, k


def _well_conditioned(g, k):
    """Parity with the reference needs a unique, well-conditioned refit: the reference NNLS
    (100 sweeps of coordinate descent) stops short of the optimum on nearly (anti)parallel
    atoms, and duplicated atoms or k > d make the coefficients non-unique."""
    if k > g.shape[1]:
        return False
    cos = (g @ g.T).abs() - torch.eye(g.shape[0], dtype=g.dtype)
    return bool(cos.max() < 0.9) if g.shape[0] > 1 else True


def _assert_optimal_refit(x, g, scores, indices, positive):
    """The coefficients are the exact (NN)LS optimum of x on the selected atoms (KKT)."""
    a = g[indices]  # (B, K, D)
    w = torch.einsum("bkd,bd->bk", a, x - torch.einsum("bk,bkd->bd", scores, a))  # -gradient / 2
    scale = 1e-7 * (1 + x.abs().amax())
    if positive:
        assert (scores >= 0).all()
        assert (w[scores > 0].abs() <= scale).all()
        assert (w[scores == 0] <= scale).all()
    else:
        assert (w.abs() <= scale).all()


@SETTINGS
@given(problems(), st.sampled_from([0.0, 0.3]), st.booleans(), st.sampled_from(["signed", "abs"]))
def test_comp_invariants_and_reference_parity(problem, coh, positive, selection):
    x, g, k = problem
    scores, indices = sparse.comp_topk(x, g, k=k, coh=coh, positive=positive, selection=selection)
    b = x.shape[0]
    assert scores.shape == indices.shape == (b, k)
    assert scores.dtype == x.dtype and indices.dtype == torch.int64
    if b == 0:
        return
    assert ((indices >= 0) & (indices < g.shape[0])).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct atoms
    assert (scores.diff(dim=1) <= 0).all()  # sorted descending
    if positive:
        assert (scores >= 0).all()
    # the coefficients are the (NN)LS optimum on the ORIGINAL x: no better point nearby
    recon = sparse.decode(scores, indices, g)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    dense = torch.zeros(b, g.shape[0], dtype=x.dtype).scatter_(1, indices, scores)
    theirs = ref.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=k, coh=coh, positive=positive,
                                                      selection=selection)
    _assert_optimal_refit(x, g, scores, indices, positive)
    # float64, exact ties broken identically (lowest index): the reference's codes
    if _well_conditioned(g, k):
        assert torch.allclose(dense, theirs, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(problems(), st.booleans())
def test_dense_forms_match_reference(problem, positive):
    x, g, k = problem
    if k > g.shape[1]:
        k = g.shape[1]
    ours = sparse.orthogonal_matching_pursuit(x, g, max_sparsity=k, positive=positive)
    assert ours.shape == (x.shape[0], g.shape[0])
    theirs = ref.orthogonal_matching_pursuit(x, g, max_sparsity=k, positive=positive)
    if _well_conditioned(g, k):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    mp = sparse.matching_pursuit(x, g, max_sparsity=k, positive=positive)
    assert torch.allclose(mp, ref.matching_pursuit(x, g, max_sparsity=k, positive=positive), atol=1e-9)


@SETTINGS
@given(problems())
def test_too_many_atoms_is_an_error(problem):
    x, g, _ = problem
    m = g.shape[0]
    with pytest.raises(ValueError, match="exceeds the number of dictionary atoms"):
        sparse.comp_topk(x, g, k=m + 1)
    with pytest.raises(ValueError, match="exceeds the number of dictionary atoms"):
        sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=m + 1)


@SETTINGS
@given(problems(max_b=6), st.integers(0, 5), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_non_finite_input_is_an_error(problem, where, bad):
    x, g, k = problem
    if x.shape[0] == 0:
        x = torch.ones(1, g.shape[1], dtype=x.dtype)
    x = x.clone()
    x.view(-1)[where % x.numel()] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse.comp_topk(x, g, k=k)
    g = g.clone()
    g.view(-1)[where % g.numel()] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        sparse.orthogonal_matching_pursuit(torch.zeros(1, g.shape[1], dtype=g.dtype), g, max_sparsity=k)


def _unit(m, d, dtype=torch.float32):
    return F.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(0), dtype=dtype), dim=-1)


def test_empty_inputs():
    g = _unit(10, 4)
    s, i = sparse.comp_topk(torch.zeros(0, 4), g, k=3)
    assert s.shape == i.shape == (0, 3)
    assert sparse.orthogonal_matching_pursuit(torch.zeros(0, 4), g, max_sparsity=2).shape == (0, 10)
    assert sparse.matching_pursuit(torch.zeros(0, 4), g, max_sparsity=2).shape == (0, 10)
    assert sparse.topk_nnls(torch.zeros(0, 4), g, max_sparsity=2).shape == (0, 10)
    with pytest.raises(ValueError, match="dictionary is empty"):
        sparse.comp_topk(torch.zeros(2, 4), torch.zeros(0, 4), k=1)
    with pytest.raises(ValueError, match="dictionary is empty"):
        sparse.comp_topk(torch.zeros(2, 0), torch.zeros(3, 0), k=1)


def test_unit_norm_is_required_or_normalize():
    g = _unit(20, 8) * 2.0
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="unit L2 norm.*normalize=True"):
        sparse.comp_topk(x, g, k=3)
    a = sparse.comp_topk(x, g, k=3, coh=0.3, normalize=True)
    b = sparse.comp_topk(x, g / 2.0, k=3, coh=0.3)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)
    z = g.clone()
    z[4] = 0
    with pytest.raises(ValueError, match="atom 4 is all zeros"):
        sparse.comp_topk(x, z, k=3, normalize=True)
    # in-place edits of an already-checked dictionary are noticed
    ok = _unit(20, 8)
    sparse.comp_topk(x, ok, k=2)
    ok[3] *= 3
    with pytest.raises(ValueError, match="atom 3 has norm 3"):
        sparse.comp_topk(x, ok, k=2)


def test_shape_dtype_device_and_argument_errors():
    g = _unit(20, 8)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="dimension 7 but dictionary atoms have dimension 8"):
        sparse.comp_topk(torch.randn(5, 7), g, k=2)
    with pytest.raises(ValueError, match=r"x must be \(B, D\)"):
        sparse.comp_topk(torch.randn(2, 5, 8), g, k=2)
    with pytest.raises(ValueError, match="dictionary must be 2-D"):
        sparse.comp_topk(x, g[0], k=2)
    with pytest.raises(TypeError, match="x is torch.float64 but dictionary is torch.float32"):
        sparse.comp_topk(x.double(), g, k=2)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        sparse.comp_topk(x.half(), g.half(), k=2)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        sparse.comp_topk(x.long(), g, k=2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sparse.comp_topk(x.numpy(), g, k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sparse.comp_topk(x, g, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        sparse.comp_topk(x, g, k=2.0)
    with pytest.raises(ValueError, match="selection="):
        sparse.comp_topk(x, g, k=2, selection="max")
    with pytest.raises(ValueError, match="coh must be a finite number"):
        sparse.comp_topk(x, g, k=2, coh=float("nan"))
    with pytest.raises(ValueError, match="coh_dictionary has 3 atoms but dictionary has 20"):
        sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=2, coh_dictionary=torch.randn(3, 4))
    with pytest.raises(ValueError, match="backend="):
        sparse.comp_topk(x, g, k=2, backend="cuda")
    with pytest.raises(ValueError, match="kernel 'pursuit_select' has no 'numba' form"):
        sparse.comp_topk(x, g, k=2, backend="numba")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        sparse.comp_topk(x, g, k=2, chunk_size=0)
    with pytest.raises(ValueError, match="tol must be"):
        sparse.matching_pursuit(x, g, max_sparsity=2, tol=-1.0)
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        with pytest.raises(ValueError, match="move both to one device"):
            sparse.comp_topk(x.cuda(), g, k=2)
    meta = torch.empty(5, 8, device="meta")
    with pytest.raises((ValueError, NotImplementedError, RuntimeError)):
        sparse.comp_topk(meta, g, k=2)


def test_validation_cache_never_trusts_a_different_tensor():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(5):  # freed dictionaries: a later tensor may reuse their address
        g = _unit(20, 8)
        sparse.comp_topk(x, g, k=2)
        del g
    with pytest.raises(ValueError, match="unit L2 norm"):
        sparse.comp_topk(x, _unit(20, 8) * 2.0, k=2)
    view = _unit(20, 8)
    sparse.comp_topk(x, view, k=2)
    with pytest.raises(ValueError, match="unit L2 norm"):
        sparse.comp_topk(x, view * 1.5, k=2)
