"""MI kernels vs their baselines (pytest-benchmark).

    FASTINTERP_BENCH_PRESET=quick|full python -m pytest benchmarks/bench_mi.py --benchmark-only

Cases:
* MI dynamics for many images (N ~ 15 vision concepts in importance order, M = 50 language
  concepts from a 4,229-descriptor vocabulary): ``mi_curves`` + ``dataset_curve`` +
  ``curve_auc`` (one parallel Numba call) vs the reference's per-image Python loops
  (``fastinterp.reference.mi``: N + 1 O(N * M) MI evaluations per image, then the padded
  float32 mean and the AUC). The reference runs on a subset of the images and its time is
  scaled per image to the full set (stated in extra_info), after checking its curves equal
  ours.
* ``mutual_info_score`` vs ``sklearn.metrics.mutual_info_score`` on the same labelings.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.presets import preset
from fastinterp.kernels import mi
from fastinterp.reference import mi as ref

SIZES = {
    "quick": {"images": 5_000, "ref_images": 200, "n_range": (10, 20), "m": 50, "vocab": 4229,
              "labels": [10_000, 200_000]},
    "full": {"images": 50_000, "ref_images": 2_000, "n_range": (10, 20), "m": 50, "vocab": 4229,
             "labels": [10_000, 1_000_000, 10_000_000]},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]


def make_images(count: int, seed: int = 0):
    """Vision ids (unique, importance order; about half of them among the language ids) and
    language ids (M distinct descriptor indices) per image."""
    rng = np.random.default_rng(seed)
    lo, hi = S["n_range"]
    vision, language = [], []
    for _ in range(count):
        y = rng.choice(S["vocab"], size=S["m"], replace=False)
        n = int(rng.integers(lo, hi + 1))
        shared = rng.choice(y, size=n // 2, replace=False)
        other = rng.choice(S["vocab"], size=n, replace=False)
        x = list(dict.fromkeys(np.concatenate([shared, other]).tolist()))[:n]
        rng.shuffle(x)
        vision.append(x)
        language.append(y.tolist())
    return vision, language


_REFERENCE = {}  # the reference's seconds per image, measured in test_mi_dynamics


@pytest.fixture(scope="module")
def images():
    return make_images(S["images"])


def ours_pipeline(vision, language):
    curves = mi.mi_curves(vision, language)
    curve = mi.dataset_curve(curves)
    return curves, curve, mi.curve_auc(curve)


def reference_pipeline(vision, language):
    curves = [ref.mi_curve_reference(x, y) for x, y in zip(vision, language)]
    curve = ref.dataset_curve_reference(curves)
    return curves, curve, ref.curve_auc_reference(curve)


def test_mi_dynamics(benchmark, images):
    vision, language = images
    n_ref = min(S["ref_images"], len(vision))
    ours_pipeline(vision[:10], language[:10])  # compile (or load the cache) outside the timing

    t0 = time.perf_counter()
    ref_curves, ref_curve, ref_auc = reference_pipeline(vision[:n_ref], language[:n_ref])
    ref_s = time.perf_counter() - t0
    sub_curves, sub_curve, sub_auc = ours_pipeline(vision[:n_ref], language[:n_ref])
    for a, b in zip(sub_curves, ref_curves):  # validate the baseline against ours before timing
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sub_curve, ref_curve, rtol=1e-6)
    assert abs(sub_auc - ref_auc) < 1e-5

    curves, curve, auc = benchmark.pedantic(ours_pipeline, args=(vision, language), rounds=5,
                                            iterations=1, warmup_rounds=1)
    ours_s = benchmark.stats.stats.median
    ref_full_s = ref_s / n_ref * len(vision)
    _REFERENCE["seconds_per_image"] = ref_s / n_ref
    benchmark.extra_info.update({
        "images": len(vision),
        "mean_vision_concepts": float(np.mean([len(x) for x in vision])),
        "language_concepts": S["m"],
        "reference_images_timed": n_ref,
        "reference_seconds_on_subset": ref_s,
        "reference_seconds_scaled_to_all_images": ref_full_s,
        "reference_scaling": "per image (linear in the number of images)",
        "ours_images_per_s": len(vision) / ours_s,
        "reference_images_per_s": n_ref / ref_s,
        "speedup_vs_reference": ref_full_s / ours_s,
        "auc": auc,
        "numba_threads": mi.numba_threads(),
    })
    assert len(curves) == len(vision) and np.isfinite(curve).all()


def test_mi_dynamics_array_inputs(benchmark, images):
    """The same curves with the language ids as one (B, M) int array (what stacking the
    per-class top-M indices gives) and the vision ids as int arrays: no Python-int lists
    to convert, so this is closer to the kernel's own speed."""
    vision, language = images
    vision_arrays = [np.asarray(x, dtype=np.int64) for x in vision]
    language_array = np.asarray(language, dtype=np.int64)
    expected = mi.mi_curves(vision[:50], language[:50])
    curves, curve, auc = benchmark.pedantic(ours_pipeline, args=(vision_arrays, language_array),
                                            rounds=20, iterations=1, warmup_rounds=1)
    for a, b in zip(curves[:50], expected):
        np.testing.assert_array_equal(a, b)
    ours_s = benchmark.stats.stats.median
    benchmark.extra_info.update({"images": len(vision), "ours_images_per_s": len(vision) / ours_s})
    if "seconds_per_image" in _REFERENCE:  # same run, reference timed in test_mi_dynamics
        benchmark.extra_info["speedup_vs_reference"] = _REFERENCE["seconds_per_image"] * len(vision) / ours_s


@pytest.mark.parametrize("n", S["labels"])
def test_mutual_info_score(benchmark, n):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1000, n)
    b = (a // 10 + rng.integers(0, 5, n)) % 100  # related labelings: 1,000 classes, 100 clusters
    mi.mutual_info_score(a[:100], b[:100])  # compile outside the timing
    sk_rounds = 5 if n <= 1_000_000 else 2
    t0 = time.perf_counter()
    for _ in range(sk_rounds):
        expected = sklearn_metrics.mutual_info_score(a, b)
    sk_s = (time.perf_counter() - t0) / sk_rounds
    # sub-millisecond calls: many rounds, so the median is stable enough for the regression gate
    got = benchmark.pedantic(mi.mutual_info_score, args=(a, b), rounds=30 if n <= 1_000_000 else 2,
                             iterations=1, warmup_rounds=1)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    ours_s = benchmark.stats.stats.median
    benchmark.extra_info.update({"samples": n, "sklearn_seconds": sk_s,
                                 "ours_samples_per_s": n / ours_s,
                                 "speedup_vs_sklearn": sk_s / ours_s})
