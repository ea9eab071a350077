"""Batched Sinkhorn vs POT and vs the mutual-knowledge reference loop (pytest-benchmark).

    FASTINTERP_BENCH_PRESET=quick|full python -m pytest benchmarks/bench_sinkhorn.py --benchmark-only

Cases (all problems 5 x 300: parts x descriptors, as in the textual-concept step):
* ``sinkhorn_batched`` (one parallel Numba call over all problems) vs ``ot.sinkhorn`` called
  per problem, same a, b, M, reg, numItermax, stopThr; two regimes: the reference's cost
  (2.5 * (max S - S), reg 1: converges in a few tens of iterations) and a sharper one
  (uniform random cost, reg 0.05: a few hundred iterations). POT runs on a subset of the
  problems; its time is scaled per problem to the full set (stated in extra_info), after
  checking its plans equal ours on that subset.
* ``sinkhorn_fixed`` (batched) vs the reference's loop (``fastinterp.reference.mi.
  sinkhorn_reference``: torch, 1000 iterations of row then column normalisation).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from benchmarks.presets import preset
from fastinterp.kernels import sinkhorn as sk
from fastinterp.kernels.mi import numba_threads
from fastinterp.reference.mi import sinkhorn_reference

SIZES = {
    "quick": {"problems": 2_000, "pot_problems": 200, "fixed_problems": 200, "ref_problems": 10,
              "shape": (5, 300)},
    "full": {"problems": 50_000, "pot_problems": 2_000, "fixed_problems": 5_000, "ref_problems": 50,
             "shape": (5, 300)},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]

REGIMES = {
    "reference_cost_reg1": 1.0,  # M = 2.5 (max S - S): the reference's exp(2.5 S), shifted to be >= 0
    "random_cost_reg0.05": 0.05,
}


def similarities(count: int, seed: int) -> np.ndarray:
    """(count, n, m) cosine-like similarities between part and descriptor embeddings."""
    n, m = S["shape"]
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0.22, 0.04, (count, n, m)), -1.0, 1.0)


def costs(regime: str, count: int) -> np.ndarray:
    if regime == "reference_cost_reg1":
        sim = similarities(count, 0)
        return 2.5 * (sim.max(axis=(1, 2), keepdims=True) - sim)
    return np.random.default_rng(1).random((count,) + S["shape"])


def pot_solve(M, reg):
    import ot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [ot.sinkhorn([], [], Mp, reg) for Mp in M]


@pytest.mark.parametrize("regime", list(REGIMES))
def test_sinkhorn_batched_vs_pot(benchmark, regime):
    pytest.importorskip("ot")
    reg = REGIMES[regime]
    M = costs(regime, S["problems"])
    mats = list(M)  # the ragged (list) form: what a per-image pipeline produces
    n_pot = min(S["pot_problems"], len(mats))
    sk.sinkhorn_batched(None, None, mats[:4], reg, warn=False)  # compile / load the cache

    t0 = time.perf_counter()
    pot_plans = pot_solve(mats[:n_pot], reg)
    pot_s = time.perf_counter() - t0
    ours_sub, lg = sk.sinkhorn_batched(None, None, mats[:n_pot], reg, log=True, warn=False)
    for a, b in zip(ours_sub, pot_plans):  # validate the baseline against ours
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)

    def run():
        return sk.sinkhorn_batched(None, None, mats, reg, log=True, warn=False)

    plans, info = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    ours_s = benchmark.stats.stats.median
    pot_full_s = pot_s / n_pot * len(mats)
    benchmark.extra_info.update({
        "problems": len(mats), "shape": list(S["shape"]), "reg": reg,
        "mean_iterations": float(np.mean(info["niter"] + 1)),
        "pot_problems_timed": n_pot, "pot_seconds_on_subset": pot_s,
        "pot_seconds_scaled_to_all_problems": pot_full_s,
        "pot_scaling": "per problem (linear in the number of problems)",
        "ours_problems_per_s": len(mats) / ours_s, "pot_problems_per_s": n_pot / pot_s,
        "speedup_vs_pot": pot_full_s / ours_s, "numba_threads": numba_threads(),
    })
    assert len(plans) == len(mats)


def test_sinkhorn_batched_padded(benchmark):
    """The same solve from one padded (B, 5, 300) array: no per-problem Python objects."""
    M = costs("reference_cost_reg1", S["problems"])
    sk.sinkhorn_batched(None, None, M[:4], 1.0, warn=False)
    out = benchmark.pedantic(sk.sinkhorn_batched, args=(None, None, M, 1.0), kwargs={"warn": False},
                             rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"problems": M.shape[0],
                                 "ours_problems_per_s": M.shape[0] / benchmark.stats.stats.median})
    assert out.shape == M.shape


def test_sinkhorn_batched_padded_reused_out(benchmark):
    """The padded solve writing into a preallocated plan buffer (out=), as in a sweep: the
    kernel's own throughput, without the first-touch cost of a fresh B * n * m buffer (large
    on this sandboxed machine: about 5 s per GB)."""
    M = costs("reference_cost_reg1", S["problems"])
    buf = np.empty(M.shape)
    sk.sinkhorn_batched(None, None, M, 1.0, warn=False, out=buf)
    benchmark.pedantic(sk.sinkhorn_batched, args=(None, None, M, 1.0),
                       kwargs={"warn": False, "out": buf}, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"problems": M.shape[0],
                                 "ours_problems_per_s": M.shape[0] / benchmark.stats.stats.median})
    np.testing.assert_array_equal(buf[7], sk.sinkhorn([], [], M[7], 1.0))


def test_sinkhorn_fixed_vs_reference_loop(benchmark):
    sim = similarities(S["fixed_problems"], 2)
    n_ref = min(S["ref_problems"], sim.shape[0])
    sk.sinkhorn_fixed(sim[:2])
    t0 = time.perf_counter()
    ref_plans = [sinkhorn_reference(torch.from_numpy(s).float()) for s in sim[:n_ref]]  # float32, as the reference
    ref_s = time.perf_counter() - t0
    ours_sub = sk.sinkhorn_fixed(sim[:n_ref])
    for a, b in zip(ours_sub, ref_plans):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-6)
    plans = benchmark.pedantic(sk.sinkhorn_fixed, args=(sim,), rounds=3, iterations=1)
    ours_s = benchmark.stats.stats.median
    ref_full_s = ref_s / n_ref * sim.shape[0]
    benchmark.extra_info.update({
        "problems": sim.shape[0], "iterations": 1000, "reference_problems_timed": n_ref,
        "reference_seconds_on_subset": ref_s, "reference_seconds_scaled_to_all_problems": ref_full_s,
        "ours_problems_per_s": sim.shape[0] / ours_s, "speedup_vs_reference": ref_full_s / ours_s,
        "torch_threads": torch.get_num_threads(), "numba_threads": numba_threads(),
    })
    assert plans.shape == sim.shape
