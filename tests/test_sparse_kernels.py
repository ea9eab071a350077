"""kernels/pursuit.py (Triton under TRITON_INTERPRET=1 vs torch) and kernels/nnls.py (exact NNLS)."""
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastinterp import sparse
from fastinterp.kernels import available_backends, last_backend
from fastinterp.kernels import nnls as nn
from fastinterp.kernels import pursuit
from fastinterp.reference import sparse as ref

needs_triton = pytest.mark.skipif(not available_backends()["triton"], reason="Triton (GPU or interpreter) unavailable")


def _dictionary(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(m, d, generator=g), dim=-1)


def _dense_select(q, g, masked, mask_value, use_abs, q2=None, g2=None):
    """The selection step written densely: (B, M) scores, mask, argmax."""
    scores = q @ g.T
    if q2 is not None:
        scores = scores + q2 @ g2.T
    raw = scores.clone()
    val = scores.abs() if use_abs else scores
    for b in range(q.shape[0]):
        for j in masked[b].tolist():
            if j >= 0:
                val[b, j] = mask_value
                raw[b, j] = mask_value
    idx = val.argmax(dim=1)
    rows = torch.arange(q.shape[0])
    return idx, val[rows, idx], raw[rows, idx]


@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("mask_value", [float("-inf"), 0.0])
@pytest.mark.parametrize("chunk", [None, 13, 64])
def test_torch_selection_matches_dense(use_abs, mask_value, chunk):
    g = _dictionary(150, 24, 0)
    q = torch.randn(33, 24, generator=torch.Generator().manual_seed(1))
    masked = torch.randint(-1, 150, (33, 4), generator=torch.Generator().manual_seed(2))
    got = pursuit.select_atoms(q, g, masked, mask_value=mask_value, use_abs=use_abs, chunk_size=chunk,
                               backend="torch")
    want = _dense_select(q, g, masked, mask_value, use_abs)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=1e-6) and torch.allclose(got[2], want[2], atol=1e-6)


@needs_triton
@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("mask_value", [float("-inf"), 0.0])
@pytest.mark.parametrize("b,m,d", [(1, 5, 3), (17, 70, 20), (40, 129, 33)])
def test_triton_selection_matches_torch(use_abs, mask_value, b, m, d):
    g = _dictionary(m, d, 3)
    q = torch.randn(b, d, generator=torch.Generator().manual_seed(4))
    masked = torch.randint(-1, m, (b, 3), generator=torch.Generator().manual_seed(5))
    got = pursuit.select_atoms(q, g, masked, mask_value=mask_value, use_abs=use_abs, backend="triton")
    assert last_backend["pursuit_select"] == "triton"
    want = pursuit.select_atoms(q, g, masked, mask_value=mask_value, use_abs=use_abs, backend="torch")
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=1e-5) and torch.allclose(got[2], want[2], atol=1e-5)


@needs_triton
def test_triton_selection_second_dictionary_and_no_mask():
    g = _dictionary(90, 20, 6)
    g2 = torch.randn(90, 7, generator=torch.Generator().manual_seed(7))
    q = torch.randn(9, 20, generator=torch.Generator().manual_seed(8))
    q2 = torch.randn(9, 7, generator=torch.Generator().manual_seed(9))
    got = pursuit.select_atoms(q, g, None, q2=q2, dictionary2=g2, backend="triton")
    want = _dense_select(q, g, torch.empty(9, 0, dtype=torch.long), float("-inf"), False, q2, g2)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[2], want[2], atol=1e-5)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_the_lowest_index(backend):
    # atoms 3, 40 and 77 are identical: the best score is tied between them
    g = _dictionary(100, 16, 10)
    g[40] = g[3]
    g[77] = g[3]
    q = g[3:4].repeat(5, 1)
    masked = torch.tensor([[-1], [3], [40], [3], [77]])
    idx, _, _ = pursuit.select_atoms(q, g, masked, backend=backend, chunk_size=32)
    assert idx.tolist() == [3, 40, 3, 40, 3]
    # all-zero query: every score ties at 0 -> atom 0, or the first unmasked one
    idx, _, raw = pursuit.select_atoms(torch.zeros(2, 16), g, torch.tensor([[-1], [0]]), backend=backend)
    assert idx.tolist() == [0, 1] and raw.abs().max() == 0
    # MP's rule: masked atoms score 0 and win when everything else is negative
    q = -g[5:6]
    g_neg = torch.cat([g[5:6], -g[5:6], -g[5:6]])  # scores -1, 1, 1 with atom 1 and 2 masked
    idx, val, raw = pursuit.select_atoms(q, g_neg, torch.tensor([[1, 2]]), mask_value=0.0, backend=backend)
    assert int(idx) == 1 and float(val) == 0.0 and float(raw) == 0.0


@needs_triton
@pytest.mark.parametrize("coh,positive,selection", [(0.3, True, "signed"), (0.0, False, "signed"),
                                                     (0.0, False, "abs"), (0.5, False, "abs")])
def test_pursuit_triton_backend_matches_torch(coh, positive, selection):
    g = _dictionary(120, 24, 11)
    x = F.normalize(torch.randn(30, 24, generator=torch.Generator().manual_seed(12)), dim=-1)
    a = sparse.comp_topk(x, g, k=4, coh=coh, positive=positive, selection=selection, backend="triton")
    b = sparse.comp_topk(x, g, k=4, coh=coh, positive=positive, selection=selection, backend="torch")
    assert torch.equal(a[1], b[1])
    assert torch.allclose(a[0], b[0], atol=1e-5)


@needs_triton
def test_mp_triton_backend_matches_reference():
    g = _dictionary(80, 16, 13)
    x = F.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(14)), dim=-1)
    for positive in (False, True):
        ours = sparse.matching_pursuit(x, g, max_sparsity=5, positive=positive, backend="triton")
        theirs = ref.matching_pursuit(x, g, max_sparsity=5, positive=positive)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_aot_specs_describe_the_kernel():
    if not pursuit.AOT_SPECS:
        pytest.skip("Triton not installed")
    names = set()
    for spec in pursuit.AOT_SPECS:
        params = list(inspect.signature(spec["fn"].fn).parameters)
        assert list(spec["signature"]) == params
        for arg, kind in spec["signature"].items():
            assert (kind == "constexpr") == (arg in spec["constexprs"])
        assert spec["num_warps"] in (1, 2, 4, 8) and spec["num_stages"] >= 1
        names.add(spec["name"])
    assert len(names) == len(pursuit.AOT_SPECS) == 12


def test_topk_atoms_matches_torch_topk():
    g = _dictionary(300, 16, 15)
    q = torch.randn(11, 16, generator=torch.Generator().manual_seed(16))
    for chunk in (None, 5, 40):
        val, idx = pursuit.topk_atoms(q, g, 7, chunk_size=chunk)
        want_val, want_idx = (q @ g.T).topk(7, dim=1)
        assert torch.allclose(val, want_val, atol=1e-6)
        assert torch.equal(idx, want_idx)


# ----------------------------------------------------------------------------- NNLS
def _random_nnls(b, d, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, d, k, generator=g, dtype=dtype)
    y = torch.randn(b, d, generator=g, dtype=dtype)
    return a, y


@pytest.mark.parametrize("k,d", [(1, 4), (3, 10), (5, 8), (8, 30), (10, 12)])
def test_nnls_matches_scipy(k, d):
    scipy_opt = pytest.importorskip("scipy.optimize")
    a, y = _random_nnls(200, d, k, seed=k)
    ours = nn.lstsq(a, y, positive=True)
    want = torch.tensor(np.stack([scipy_opt.nnls(a[i].numpy(), y[i].numpy())[0] for i in range(200)]))
    assert (ours >= 0).all()
    assert torch.allclose(ours, want, atol=1e-9)


def test_nnls_kkt_conditions_on_coherent_atoms():
    # strongly correlated unit atoms, as COMP produces
    g = torch.Generator().manual_seed(17)
    base = torch.randn(300, 32, 1, generator=g, dtype=torch.float64)
    a = F.normalize(base + 0.15 * torch.randn(300, 32, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.randn(300, 32, generator=g, dtype=torch.float64)
    gram = a.transpose(1, 2) @ a
    h = (a.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    c = nn.nnls_gram(gram, h)
    w = h - (gram @ c.unsqueeze(-1)).squeeze(-1)
    assert (c >= 0).all()
    assert (w[c == 0] <= 1e-9).all()
    assert w[c > 0].abs().max() < 1e-9


def test_nnls_matches_reference_projected_descent():
    a, y = _random_nnls(500, 40, 5, seed=18, dtype=torch.float32)
    a = F.normalize(a, dim=1)
    ours = nn.lstsq(a, y, positive=True)
    theirs = ref.nnls(a, y)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_nnls_degenerate_systems():
    # duplicated column, zero column, zero target
    a, y = _random_nnls(6, 10, 4, seed=19)
    a[0, :, 1] = a[0, :, 0]
    a[1, :, 2] = 0
    y[2] = 0
    c = nn.lstsq(a, y, positive=True)
    assert torch.isfinite(c).all() and (c >= 0).all()
    assert c[2].abs().max() == 0
    scipy_opt = pytest.importorskip("scipy.optimize")
    for i in range(6):
        want = scipy_opt.nnls(a[i].numpy(), y[i].numpy())[0]
        assert abs(float(torch.linalg.vector_norm(a[i] @ c[i] - y[i])) - float(np.linalg.norm(a[i].numpy() @ want - y[i].numpy()))) < 1e-9


def test_unconstrained_solve_matches_lstsq():
    a, y = _random_nnls(50, 20, 6, seed=20)
    ours = nn.lstsq(a, y)
    want = torch.linalg.lstsq(a, y.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(ours, want, atol=1e-10)
    assert nn.lstsq(a[0], y[0]).shape == (6,)


def test_coordinate_descent_reaches_the_active_set_optimum():
    a, y = _random_nnls(100, 12, 5, seed=21)
    gram = a.transpose(1, 2) @ a
    h = (a.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    cd = nn.nnls_coordinate_descent(gram, h, max_sweeps=5000, tol=1e-14)
    exact = nn.nnls_gram(gram, h)
    assert torch.allclose(cd, exact, atol=1e-7)


def test_nnls_input_errors():
    with pytest.raises(ValueError, match=r"\(B, K, K\)"):
        nn.nnls_gram(torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"h must have shape"):
        nn.nnls_gram(torch.zeros(2, 3, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="A must be"):
        nn.lstsq(torch.zeros(2, 3, 4), torch.zeros(3, 3))
    assert nn.nnls_gram(torch.zeros(0, 3, 3), torch.zeros(0, 3)).shape == (0, 3)


def test_nnls_warm_start_reaches_the_same_optimum():
    a, y = _random_nnls(300, 10, 6, seed=22)
    gram = a.transpose(1, 2) @ a
    h = (a.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    cold = nn.nnls_gram(gram, h)
    # warm start from the optimum of the first 5 variables, with the 6th added at 0
    prev = nn.nnls_gram(gram[:, :5, :5], h[:, :5])
    x0 = torch.cat([prev, torch.zeros(300, 1, dtype=prev.dtype)], dim=1)
    passive0 = torch.cat([prev > 0, torch.ones(300, 1, dtype=torch.bool)], dim=1)
    warm = nn.nnls_gram(gram, h, x0=x0, passive0=passive0)
    assert torch.allclose(warm, cold, atol=1e-10)
    # any feasible start works, even a poor one
    junk = nn.nnls_gram(gram, h, x0=torch.rand(300, 6, dtype=torch.float64),
                        passive0=torch.rand(300, 6) > 0.5)
    assert torch.allclose(junk, cold, atol=1e-9)
    with pytest.raises(ValueError, match="give both"):
        nn.nnls_gram(gram, h, x0=x0)


@needs_triton
def test_pursuit_triton_with_coherence_dictionary_matches_torch():
    g = _dictionary(100, 20, 23)
    c = _dictionary(100, 6, 24)
    x = F.normalize(torch.randn(12, 20, generator=torch.Generator().manual_seed(25)), dim=-1)
    kw = dict(max_sparsity=4, coh=0.5, coh_dictionary=c)
    a = sparse.coherent_orthogonal_matching_pursuit(x, g, backend="triton", **kw)
    b = sparse.coherent_orthogonal_matching_pursuit(x, g, backend="torch", **kw)
    assert torch.equal(a != 0, b != 0)
    assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- bf16 screening
needs_screen = pytest.mark.skipif(not pursuit._bf16_screen_available(torch.device("cpu")),
                                  reason="this CPU has no native bf16 (screening disabled)")


@needs_screen
@pytest.mark.parametrize("scale,kind", [(1.0, "randn"), (1e3, "randn"), (1e-3, "randn"), (1.0, "positive"),
                                        (1.0, "sparse")])
def test_screen_error_bound_holds(scale, kind):
    g = torch.Generator().manual_seed(30)
    d = 200
    q = torch.randn(64, d, generator=g) * scale
    atoms = torch.randn(3000, d, generator=g)
    if kind == "positive":
        q, atoms = q.abs(), atoms.abs()
    if kind == "sparse":
        q[:, 20:] = 0
    atoms = F.normalize(atoms, dim=1)
    q_b = q.to(torch.bfloat16)
    cache = pursuit._prepare_screen(atoms, 1000, {})
    const, w = pursuit._screen_bounds(q, q_b, d, cache["err"], cache["norm_b"])
    approx = (q_b @ cache["bf16"].T).double()
    exact = q.double() @ atoms.double().T
    assert ((approx - exact).abs() <= const.double().unsqueeze(1) + w * approx.abs()).all()


@needs_screen
@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("chunk", [None, 700])
def test_screened_selection_matches_exact(use_abs, chunk):
    g = _dictionary(5000, 64, 31)
    q = torch.randn(200, 64, generator=torch.Generator().manual_seed(32))
    q[0] = 0  # all scores tie at 0: too many candidates -> exact fallback, lowest index
    q[1] = g[17]  # exact hit
    masked = torch.randint(-1, 5000, (200, 5), generator=torch.Generator().manual_seed(33))
    masked[1, 0] = -1
    a = pursuit.select_atoms(q, g, masked, use_abs=use_abs, chunk_size=chunk, screen=True, backend="torch")
    b = pursuit.select_atoms(q, g, masked, use_abs=use_abs, chunk_size=chunk, screen=False, backend="torch")
    assert torch.equal(a[0], b[0])
    assert torch.allclose(a[1], b[1], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-5)
    assert int(a[0][1]) == 17


@needs_screen
def test_screened_ties_go_to_the_lowest_index():
    g = _dictionary(4096, 32, 34)
    g[1000] = g[10]
    g[3000] = g[10]
    q = g[10:11].repeat(3, 1) * 2.0
    masked = torch.tensor([[-1], [10], [1000]])
    idx, _, _ = pursuit.select_atoms(q, g, masked, screen=True, backend="torch", chunk_size=512)
    assert idx.tolist() == [10, 1000, 10]


@needs_screen
def test_screened_comp_matches_reference_2048_signals(monkeypatch):
    g = _dictionary(3000, 48, 35)
    x = F.normalize(torch.randn(2048, 48, generator=torch.Generator().manual_seed(36)), dim=-1)
    ours = sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=0.3)  # screened (M >= 2048)
    theirs = ref.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=5, coh=0.3)
    same = ((ours != 0) == (theirs != 0)).all(dim=1)
    assert same.float().mean() >= 0.999
    assert (ours - theirs)[same].abs().max() < 1e-4
    screened = sparse.comp_topk(x, g, k=5, coh=0.3)
    monkeypatch.setenv(pursuit.SCREEN_ENV, "0")
    exact = sparse.comp_topk(x, g, k=5, coh=0.3)
    assert (screened[1] == exact[1]).all(dim=1).float().mean() >= 0.999


@needs_triton
def test_triton_fp16_dictionary_storage_matches_torch():
    """fp16 storage: the kernel rounds q to fp16 for the tensor-core dot and accumulates in
    fp32; the torch path on the same rounded q agrees. (bf16 arithmetic is wrong in the
    Triton interpreter, so bf16 storage is only compiled, not run, here.)"""
    g = _dictionary(150, 40, 40).to(torch.float16)
    q = torch.randn(20, 40, generator=torch.Generator().manual_seed(41))
    a = pursuit.select_atoms(q, g, None, backend="triton")
    b = pursuit.select_atoms(q.half().float(), g, None, backend="torch", screen=False)
    assert torch.equal(a[0], b[0])
    assert torch.allclose(a[2], b[2], atol=1e-4)
