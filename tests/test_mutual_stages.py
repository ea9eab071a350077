"""The mutual-knowledge pipeline's work outside the CLIP forwards: the foreground's partial
eigensolver equals the dense one, and the per-stage time breakdown adds up."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastinterp import mutual
from fastinterp import vision as V


def _features(n, d, seed, rank=6):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g, dtype=torch.float64)
    coef = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, rank, dtype=torch.float64)
    return coef @ basis + 0.3 + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n,d", [(300, 128), (100, 200), (784, 96), (65, 65)])
def test_lanczos_second_singular_vector_equals_the_dense_one(n, d):
    X = _features(n, d, seed=n + d)
    u = V.second_singular_vector(X)
    ref = V._second_singular_vector_dense(F.normalize(X, dim=-1))
    sign = np.sign(u @ ref)
    assert np.abs(u - sign * ref).max() < 1e-10
    np.testing.assert_array_equal(V.orient_minority_positive(u) > 0, V.orient_minority_positive(ref) > 0)
    U, _, _ = np.linalg.svd(F.normalize(X, dim=-1).numpy(), full_matrices=False)
    assert abs(abs(float(u @ U[:, 1])) - 1.0) < 1e-9


def test_one_signed_vector_keeps_the_dense_sign(monkeypatch):
    """Where u1 has one sign the sign rule keeps the solver's sign (all or no foreground),
    so the dense solver's is used, as before."""
    import scipy.sparse.linalg as sla

    X = _features(100, 200, seed=3)
    monkeypatch.setattr(sla, "eigsh", lambda op, **k: (np.array([1.0, 2.0]), np.ones((op.shape[0], 2))))
    np.testing.assert_array_equal(V.second_singular_vector(X),
                                  V._second_singular_vector_dense(F.normalize(X, dim=-1)))


def test_vit_b_sized_batches_need_no_full_eigendecomposition(monkeypatch):
    """4 images x 196 patches x 768: only two singular pairs are computed (no eigh)."""
    X = _features(784, 768, seed=0)

    def no_eigh(*a, **k):
        raise AssertionError("a full eigh was computed")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    u = V.second_singular_vector(X)
    A = F.normalize(X, dim=-1).numpy()
    s = np.linalg.norm(A.T @ u)
    assert abs(np.linalg.norm(u) - 1) < 1e-12 and np.linalg.norm(A @ (A.T @ u) - s ** 2 * u) < 1e-9 * s ** 2


def test_stage_timings_nest_exclusively():
    t = {}
    with V.stage(t, "outer"):
        time.sleep(0.02)
        with V.stage(t, "inner"):
            time.sleep(0.03)
        with V.stage(None, "ignored"):
            pass
    assert set(t) == {"outer", "inner"} and 0.015 < t["outer"] < 0.03 + 0.02 and t["inner"] >= 0.025


def test_explain_reports_every_stage(tiny_clip, tmp_path):
    from PIL import Image

    model, preprocess, tokenizer = tiny_clip
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    bank = mutual.demo_descriptors()
    timings = {}
    t0 = time.perf_counter()
    plain = mutual.explain(model, preprocess, tokenizer, images, ["cat", "dog"], bank, parts="both",
                           cache_dir=tmp_path)
    timed = mutual.explain(model, preprocess, tokenizer, images, ["cat", "dog"], bank, parts="both",
                           cache_dir=tmp_path, timings=timings)
    wall = time.perf_counter() - t0
    assert timed.records == plain.records
    expected = {"text_embeddings", "preprocess", "clip_forward_images", "foreground", "crf", "parts",
                "clip_forward_parts", "language", "descriptor_selection", "sinkhorn", "mi", "records"}
    assert expected <= set(timings), sorted(expected - set(timings))
    assert all(v >= 0 for v in timings.values()) and sum(timings.values()) <= wall
