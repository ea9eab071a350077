"""fastinterp.sparse against the reference semantics (fastinterp.reference.sparse), SPEC 1.5."""
import pytest
import torch
import torch.nn.functional as F

from fastinterp import sparse
from fastinterp.reference import sparse as ref


def _problem(b, d, m, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=-1)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return x, dictionary


def _agreement(ours, theirs):
    """Fraction of rows with identical supports, and max |difference| over those rows."""
    same = ((ours != 0) == (theirs != 0)).all(dim=1)
    diff = (ours - theirs).abs().amax(dim=1)
    return same.float().mean().item(), diff[same].max().item()


def _support_agreement(ours_codes, theirs_codes, k):
    """Same selected sets (rows' top-k supports incl. zero coefficients are not visible in dense
    codes, so compare nonzero patterns)."""
    return _agreement(ours_codes, theirs_codes)


@pytest.mark.parametrize("coh", [0.3, 0.0, 1.0])
def test_comp_matches_reference_2048_signals(coh):
    x, g = _problem(2048, 48, 600, seed=1)
    ours = sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=coh)
    theirs = ref.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=coh)
    frac, diff = _agreement(ours, theirs)
    assert frac >= 0.999
    assert diff < 1e-4
    assert ours.shape == (2048, 600) and ours.dtype == torch.float32


@pytest.mark.parametrize("positive", [False, True])
def test_omp_matches_reference(positive):
    x, g = _problem(1024, 32, 400, seed=2)
    ours = sparse.orthogonal_matching_pursuit(x, g, max_sparsity=6, positive=positive)
    theirs = ref.orthogonal_matching_pursuit(x, g, max_sparsity=6, positive=positive)
    frac, diff = _agreement(ours, theirs)
    assert frac >= 0.999
    assert diff < 1e-4
    if positive:
        assert (ours >= 0).all()
    else:
        assert ((ours != 0).sum(dim=1) == 6).all()


def test_comp_selects_exactly_k_atoms_including_zero_coefficients():
    x, g = _problem(256, 16, 120, seed=3)
    scores, indices = sparse.comp_topk(x, g, k=8, coh=0.3, positive=True)
    assert scores.shape == indices.shape == (256, 8)
    # all K atoms are distinct (selected atoms are excluded), scores sorted descending
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (scores.diff(dim=1) <= 0).all()
    assert (scores >= 0).all()
    # with NNLS in 16 dims and 8 atoms some coefficients are exactly 0: still selected
    assert (scores == 0).any()


@pytest.mark.parametrize("coh,positive", [(0.3, True), (0.0, True), (0.0, False), (0.5, False)])
def test_dense_and_sparse_forms_agree(coh, positive):
    x, g = _problem(300, 24, 200, seed=4)
    dense = sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=coh, positive=positive)
    scores, indices = sparse.comp_topk(x, g, k=5, coh=coh, positive=positive)
    rebuilt = torch.zeros_like(dense).scatter_(1, indices, scores)
    assert torch.equal(rebuilt, dense)
    if positive:
        top_scores, _ = torch.topk(dense, 5, dim=1)
        assert torch.equal(top_scores, scores)
        nz = scores > 0
        top_idx = torch.topk(dense, 5, dim=1).indices
        assert torch.equal(top_idx[nz], indices[nz])


def test_comp_reconstruction_is_least_squares_on_original_x():
    x, g = _problem(64, 20, 90, seed=5, dtype=torch.float64)
    scores, indices = sparse.comp_topk(x, g, k=4, coh=0.3, positive=False)
    recon = sparse.decode(scores, indices, g)
    residual = x - recon
    # normal equations: residual orthogonal to every selected atom
    ortho = torch.einsum("bd,bkd->bk", residual, g[indices])
    assert ortho.abs().max() < 1e-10
    # and decode equals the dense product
    dense = torch.zeros(64, 90, dtype=torch.float64).scatter_(1, indices, scores)
    assert torch.allclose(recon, dense @ g, atol=1e-12)


def test_separate_coherence_dictionary_matches_reference():
    x, g = _problem(512, 32, 300, seed=6)
    coh_dict = F.normalize(torch.randn(300, 12, generator=torch.Generator().manual_seed(7)), dim=-1)
    ours = sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=0.4, coh_dictionary=coh_dict)
    theirs = ref.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=0.4, coh_dictionary=coh_dict)
    frac, diff = _agreement(ours, theirs)
    assert frac >= 0.999 and diff < 1e-4
    plain = sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=0.4)
    assert not torch.equal(plain != 0, ours != 0)  # the coherence dictionary changes choices


@pytest.mark.parametrize("positive", [False, True])
def test_matching_pursuit_matches_reference(positive):
    x, g = _problem(512, 32, 300, seed=8)
    ours = sparse.matching_pursuit(x, g, max_sparsity=7, positive=positive)
    theirs = ref.matching_pursuit(x, g, max_sparsity=7, positive=positive)
    frac, diff = _agreement(ours, theirs)
    assert frac >= 0.999 and diff < 1e-5


def test_matching_pursuit_tolerance_stops_per_signal():
    x, g = _problem(40, 16, 60, seed=9)
    # signals equal to an atom times 2: one step leaves a zero residual, then stop
    x[:10] = 2.0 * g[:10]
    ours = sparse.matching_pursuit(x, g, max_sparsity=6, tol=1e-5)
    theirs = ref.matching_pursuit(x, g, max_sparsity=6, tol=1e-5)
    assert ((ours[:10] != 0).sum(dim=1) == 1).all()
    assert torch.allclose(ours[:10].gather(1, torch.arange(10).unsqueeze(1)), torch.full((10, 1), 2.0), atol=1e-5)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # without max_sparsity it runs until tol
    full = sparse.matching_pursuit(x[:3], g, max_sparsity=None, tol=0.5)
    assert (torch.linalg.vector_norm(x[:3] - full @ g, dim=1) < 0.5).all()
    with pytest.raises(ValueError, match="max_sparsity or tol"):
        sparse.matching_pursuit(x, g, max_sparsity=None, tol=None)


@pytest.mark.parametrize("positive", [True, False])
def test_topk_nnls_matches_reference(positive):
    x, g = _problem(256, 24, 150, seed=10)
    ours = sparse.topk_nnls(x, g, max_sparsity=5, positive=positive)
    theirs = ref.topk_nnls(x, g, max_sparsity=5, positive=positive)
    frac, diff = _agreement(ours, theirs)
    assert frac >= 0.999 and diff < 1e-4


def test_one_dimensional_input_squeezes():
    x, g = _problem(1, 16, 50, seed=11)
    codes = sparse.orthogonal_matching_pursuit(x[0], g, max_sparsity=3)
    assert codes.shape == (50,)
    assert torch.equal(codes, sparse.orthogonal_matching_pursuit(x, g, max_sparsity=3)[0])
    scores, indices = sparse.comp_topk(x[0], g, k=3, coh=0.3)
    assert scores.shape == indices.shape == (3,)
    assert sparse.decode(scores, indices, g).shape == (16,)


def test_signed_rule_differs_from_abs_rule():
    # a signal anti-aligned with atom 0: signed argmax never takes atom 0 first, abs does
    x, g = _problem(1, 16, 40, seed=12)
    x = -g[0:1].clone()
    s_idx = sparse.comp_topk(x, g, k=1, positive=False)[1]
    a_scores, a_idx = sparse.comp_topk(x, g, k=1, positive=False, selection="abs")
    assert int(a_idx) == 0 and torch.allclose(a_scores, torch.tensor([-1.0]), atol=1e-6)
    assert int(s_idx) != 0


def test_abs_rule_matches_sklearn_orthogonal_mp():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, g = _problem(200, 32, 120, seed=13, dtype=torch.float64)
    ours = sparse.orthogonal_matching_pursuit(x, g, max_sparsity=6, selection="abs")
    theirs = sklearn.orthogonal_mp(g.T.numpy(), x.T.numpy(), n_nonzero_coefs=6)  # (M, B)
    theirs = torch.from_numpy(theirs.T)
    frac, diff = _agreement(ours, theirs)
    assert frac >= 0.995
    assert diff < 1e-8


@pytest.mark.parametrize("method,expected", [("comp-0.3", ("comp", 0.3)), ("comp-1", ("comp", 1.0)),
                                             ("comp-0.05", ("comp", 0.05)), ("omp", ("omp", 0.0)),
                                             ("NNOMP", ("omp", 0.0)), ("mp", ("mp", 0.0)),
                                             ("topk", ("topk", 0.0))])
def test_parse_method(method, expected):
    assert sparse.parse_method(method) == expected


@pytest.mark.parametrize("method", ["comp", "comp-", "lasso", "comp-x", "", "omp-0.3"])
def test_parse_method_rejects_unknown(method):
    with pytest.raises(ValueError, match="unknown sparse-coding method"):
        sparse.parse_method(method)


def test_sparse_code_routes_like_sith_decompose():
    x, g = _problem(128, 24, 160, seed=14)
    # comp-0.3: topk of the dense non-negative COMP codes
    s, i = sparse.sparse_code(x, g, method="comp-0.3", sparsity=5)
    dense = ref.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=0.3, positive=True)
    assert torch.allclose(torch.zeros_like(dense).scatter_(1, i, s), dense, atol=1e-5)
    # omp is NON-NEGATIVE OMP in SITH's script
    s, i = sparse.sparse_code(x, g, method="omp", sparsity=5)
    dense = ref.orthogonal_matching_pursuit(x, g, max_sparsity=5, positive=True)
    assert (s >= 0).all()
    assert torch.allclose(torch.zeros_like(dense).scatter_(1, i, s), dense, atol=1e-5)
    # mp: topk of the dense non-negative MP codes
    s, i = sparse.sparse_code(x, g, method="mp", sparsity=5)
    dense = ref.matching_pursuit(x, g, max_sparsity=5, positive=True)
    t_s, _ = dense.topk(5, dim=1)
    assert torch.allclose(s, t_s, atol=1e-6)
    # topk: indices in similarity order, NNLS coefficients aligned with them
    s, i = sparse.sparse_code(x, g, method="topk", sparsity=5)
    assert torch.equal(i, (x @ g.T).topk(5, dim=1).indices)
    coefs = ref.nnls(g[i].transpose(1, 2), x)
    assert torch.allclose(s, coefs, atol=1e-5)
    # positive override
    s, i = sparse.sparse_code(x, g, method="omp", sparsity=5, positive=False)
    dense = ref.orthogonal_matching_pursuit(x, g, max_sparsity=5, positive=False)
    assert torch.allclose(torch.zeros_like(dense).scatter_(1, i, s), dense, atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        sparse.sparse_code(x, g, method="lasso", sparsity=5)


def test_decode_validates():
    _, g = _problem(1, 8, 10)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        sparse.decode(torch.ones(2, 3), torch.full((2, 3), 10), g)
    with pytest.raises(ValueError, match="both be"):
        sparse.decode(torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.long), g)
    with pytest.raises(TypeError, match="integer"):
        sparse.decode(torch.ones(2, 3), torch.zeros(2, 3), g)
    with pytest.raises(ValueError, match="NaN"):
        sparse.decode(torch.full((2, 3), float("nan")), torch.zeros(2, 3, dtype=torch.long), g)


def test_half_precision_dictionary_storage():
    x, g = _problem(128, 32, 200, seed=15)
    g16 = g.to(torch.float16)
    s16, i16 = sparse.comp_topk(x, g16, k=4, coh=0.3)
    s32, i32 = sparse.comp_topk(x, g16.float(), k=4, coh=0.3)
    assert torch.equal(i16, i32)
    assert torch.allclose(s16, s32, atol=1e-6)
    assert s16.dtype == torch.float32


def test_chunk_size_does_not_change_result():
    x, g = _problem(100, 16, 257, seed=16)
    a = sparse.comp_topk(x, g, k=5, coh=0.3)
    for chunk in (1, 7, 64, 256, 10_000):
        b = sparse.comp_topk(x, g, k=5, coh=0.3, chunk_size=chunk)
        assert torch.equal(a[1], b[1])
        assert torch.allclose(a[0], b[0], atol=1e-6)
