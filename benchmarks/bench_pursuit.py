"""Sparse coding (SITH's COMP / OMP) vs its baselines (pytest-benchmark).

    FASTINTERP_BENCH_PRESET=quick|full python -m pytest benchmarks/bench_pursuit.py --benchmark-only

Cases (same inputs, same run; unit-norm random fp32 dictionaries and signals):
* ``test_comp[M]``: ``fastinterp.sparse.comp_topk`` (COMP, coh 0.3, NNLS, K = 5) vs the
  reference semantics ``fastinterp.reference.sparse.coherent_orthogonal_matching_pursuit``
  (dense (B, M) scores, two or three matmuls per step, coordinate-descent NNLS) vs the pure
  lower bound: K matmuls ``x @ G.T`` in torch. The reference's output is checked against
  ours (identical atom sets for >= 99.9 % of signals, scores within 1e-4) before its time
  is reported. GFLOP/s counts the K selection matmuls (2 B M D each) for every contender.
* ``test_omp_abs_peers``: textbook OMP (abs rule, least squares) vs scikit-learn's
  ``orthogonal_mp`` (per-signal loop; timed on a subset and scaled per signal, stated in
  extra_info) and SPAMS ``omp`` when installed (``pip install spams-bin``; its output is
  validated on every call and reported invalid, not timed, when it is wrong, e.g. all zero).
* ``test_memory_sparse_form``: ``comp_topk`` on a large dictionary (1,000,000 atoms in the
  full preset) in a fresh subprocess; the peak RSS above the pre-dictionary baseline must
  stay below the dictionary's own size + 1 GiB (VmHWM after resetting it through
  /proc/self/clear_refs; asserted).

Targets (CPU, same run): COMP >= 3x faster than the reference semantics and within 1.5x of
the lower bound; extra_info records the measured ratios and whether the targets were met.
On CPUs with native bf16, ``comp_topk`` screens in bf16 and rescores exactly (same
selections), so it can beat the fp32 "lower bound"; the exact-fp32 path
(FASTINTERP_PURSUIT_SCREEN=0) is timed too and reported as ``ours_exact_fp32_path_s``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from benchmarks.machine import timed
from benchmarks.presets import preset
from fastinterp import sparse
from fastinterp.kernels import pursuit
from fastinterp.reference import sparse as ref

SIZES = {
    "quick": {"B": 256, "D": 512, "M": [10_000], "K": 5, "coh": 0.3, "rounds": 2,
              "peer_B": 256, "peer_M": 4_000, "sk_signals": 8,
              "mem_B": 64, "mem_M": 200_000, "mem_D": 128},
    "full": {"B": 1024, "D": 768, "M": [50_000, 200_000], "K": 5, "coh": 0.3, "rounds": 1,
             "peer_B": 1024, "peer_M": 10_000, "sk_signals": 64,
             "mem_B": 64, "mem_M": 1_000_000, "mem_D": 768},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]
GIB = 1 << 30
# Every contender runs with the same intra-op thread count. The default, 1, is deliberate on
# the shared 2-core development machine: with several engineers' jobs running, OpenMP
# parallel regions wait for descheduled threads (a time slice each), which charges every
# small parallel op ~10-20 ms and measures the scheduler, not the algorithms. Set
# FASTINTERP_BENCH_THREADS=0 to keep torch's default on a dedicated machine.
THREADS = int(os.environ.get("FASTINTERP_BENCH_THREADS", "1"))
if THREADS > 0:
    torch.set_num_threads(THREADS)


def problem(b, d, m, seed=0):
    """Unit-norm fp32 signals (B, D) and dictionary (M, D), normalised in place."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.empty(m, d)
    dictionary.normal_(generator=g)
    dictionary /= torch.linalg.vector_norm(dictionary, dim=1, keepdim=True)
    x = torch.randn(b, d, generator=g)
    x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x, dictionary



def lower_bound(x, dictionary, k):
    """The pure cost of any pursuit: k matmuls of the signals against the dictionary."""
    for _ in range(k):
        out = x @ dictionary.T
    return out


def agreement(ids_a, scores_a, ids_b, scores_b):
    """(fraction of rows with identical atom sets, max |score diff| on those rows)."""
    sa, oa = ids_a.sort(dim=1)
    sb, ob = ids_b.sort(dim=1)
    same = (sa == sb).all(dim=1)
    diff = (scores_a.gather(1, oa) - scores_b.gather(1, ob)).abs().amax(dim=1)
    return float(same.float().mean()), float(diff[same].max()) if bool(same.any()) else float("inf")


def dense_support(codes, k):
    """The k selected atoms of dense codes: topk by |code| (zero coefficients included)."""
    idx = codes.abs().topk(k, dim=1).indices
    return idx, codes.gather(1, idx)


@pytest.mark.parametrize("m", S["M"])
def test_comp(benchmark, m):
    b, d, k, coh = S["B"], S["D"], S["K"], S["coh"]
    x, g = problem(b, d, m)
    flops = k * 2.0 * b * m * d
    sparse.comp_topk(x[:4], g, k=k, coh=coh)  # validation cache, warm-up

    ours_times, lb_times = [], []

    def ours():
        out, t = timed(sparse.comp_topk, x, g, k=k, coh=coh)
        ours_times.append(t)
        return out

    (scores, ids) = benchmark.pedantic(ours, rounds=S["rounds"], iterations=1, warmup_rounds=0)
    for _ in range(S["rounds"]):
        lb_times.append(timed(lower_bound, x, g, k)[1])
    # our exact-fp32 selection (bf16 screening off), for transparency
    saved = os.environ.get(pursuit.SCREEN_ENV)
    os.environ[pursuit.SCREEN_ENV] = "0"
    try:
        (e_scores, e_ids), exact_s = timed(sparse.comp_topk, x, g, k=k, coh=coh)
    finally:
        if saved is None:
            del os.environ[pursuit.SCREEN_ENV]
        else:
            os.environ[pursuit.SCREEN_ENV] = saved
    exact_same = float((e_ids == ids).all(dim=1).float().mean())
    ref_codes, ref_s = timed(ref.coherent_orthogonal_matching_pursuit, x, g, max_sparsity=k, coh=coh)
    # validate the baseline against ours. Dense codes hide zero NNLS coefficients, so
    # compare the nonzero supports and values.
    ours_dense = torch.zeros_like(ref_codes).scatter_(1, ids, scores)
    same = ((ours_dense != 0) == (ref_codes != 0)).all(dim=1)
    frac = float(same.float().mean())
    max_diff = float((ours_dense - ref_codes)[same].abs().max())
    assert frac >= 0.999 and max_diff < 1e-4, f"reference disagrees: {frac:.4%} rows, {max_diff:.2e}"

    ours_s, lb_s = min(ours_times), min(lb_times)
    benchmark.extra_info.update({
        "preset": PRESET, "B": b, "D": d, "M": m, "K": k, "coh": coh, "threads": torch.get_num_threads(),
        "bf16_screening": bool(pursuit._bf16_screen_available(x.device)) and m >= pursuit.SCREEN_MIN_ATOMS,
        "ours_s": round(ours_s, 4), "reference_s": round(ref_s, 4), "lower_bound_s": round(lb_s, 4),
        "ours_exact_fp32_path_s": round(exact_s, 4), "exact_path_same_atoms_rows": exact_same,
        "exact_path_speedup_vs_reference": round(ref_s / exact_s, 3),
        "exact_path_ratio_to_lower_bound": round(exact_s / lb_s, 3),
        "ours_gflops": round(flops / ours_s / 1e9, 2),
        "reference_gflops": round(flops / ref_s / 1e9, 2),
        "lower_bound_gflops": round(flops / lb_s / 1e9, 2),
        "speedup_vs_reference": round(ref_s / ours_s, 3),
        "ratio_to_lower_bound": round(ours_s / lb_s, 3),
        "target_3x_vs_reference_met": ref_s / ours_s >= 3.0,
        "target_1p5x_of_lower_bound_met": ours_s / lb_s <= 1.5,
        "reference_agreement_rows": frac, "reference_max_score_diff": max_diff,
        "signals_per_s": round(b / ours_s, 1),
    })


def _spams_omp(x64, g64, k):
    """SPAMS OMP, or a reason why it is not available / not valid."""
    try:
        import spams  # noqa: PLC0415
    except ImportError:
        return None, "not installed"
    xf = np.asfortranarray(x64.T)
    gf = np.asfortranarray(g64.T)
    t0 = time.perf_counter()
    codes = spams.omp(xf, gf, L=k, return_reg_path=False, numThreads=torch.get_num_threads())
    elapsed = time.perf_counter() - t0
    codes = np.asarray(codes.todense()).T  # (B, M)
    nnz = (codes != 0).sum(axis=1)
    if not np.isfinite(codes).all():
        return None, "invalid: non-finite codes"
    if (nnz == 0).any():
        return None, f"invalid: {(nnz == 0).sum()} all-zero codes"
    if (nnz > k).any():
        return None, "invalid: more than K nonzeros"
    resid = np.linalg.norm(x64 - codes @ g64, axis=1)
    if (resid > np.linalg.norm(x64, axis=1) + 1e-6).any():
        return None, "invalid: residual larger than the signal"
    return (codes, elapsed), "ok"


def test_omp_abs_peers(benchmark):
    sk = pytest.importorskip("sklearn.linear_model")
    b, d, m, k = S["peer_B"], S["D"], S["peer_M"], S["K"]
    x, g = problem(b, d, m, seed=1)
    flops = k * 2.0 * b * m * d
    sparse.comp_topk(x[:4], g, k=k, selection="abs", positive=False)

    ours_times = []

    def ours():
        out, t = timed(sparse.comp_topk, x, g, k=k, selection="abs", positive=False)
        ours_times.append(t)
        return out

    scores, ids = benchmark.pedantic(ours, rounds=S["rounds"], iterations=1, warmup_rounds=0)
    ours_s = min(ours_times)
    info = {"preset": PRESET, "B": b, "D": d, "M": m, "K": k, "threads": torch.get_num_threads(),
            "ours_s": round(ours_s, 4),
            "ours_gflops": round(flops / ours_s / 1e9, 2)}

    # scikit-learn: per-signal loop; time a subset, scale per signal
    n_sk = min(S["sk_signals"], b)
    x64, g64 = x.double().numpy(), g.double().numpy()
    sk_codes, sk_s = timed(sk.orthogonal_mp, g64.T, x64[:n_sk].T, n_nonzero_coefs=k)
    sk_codes = torch.from_numpy(np.ascontiguousarray(sk_codes.T))
    sk_ids, sk_scores = dense_support(sk_codes, k)
    frac, diff = agreement(ids[:n_sk], scores[:n_sk].double(), sk_ids, sk_scores)
    assert frac >= 0.99 and diff < 1e-4, f"sklearn disagrees: {frac:.3%}, {diff:.2e}"
    sk_full_s = sk_s * b / n_sk
    info.update({"sklearn_signals_timed": n_sk, "sklearn_s_scaled_to_B": round(sk_full_s, 4),
                 "speedup_vs_sklearn": round(sk_full_s / ours_s, 2), "sklearn_agreement_rows": frac})

    # SPAMS: validated on every call; an invalid output is reported, not timed
    result, status = _spams_omp(x64, g64, k)
    info["spams_status"] = status
    if result is not None:
        sp_codes, sp_s = result
        sp_ids, sp_scores = dense_support(torch.from_numpy(sp_codes), k)
        info.update({"spams_s": round(sp_s, 4), "speedup_vs_spams": round(sp_s / ours_s, 2),
                     # SPAMS' omp picks atoms by the decrease of the projected residual
                     # (order-recursive MP), not by |correlation|: supports differ in part
                     "spams_same_atom_sets": agreement(ids.double(), scores.double(), sp_ids.double(),
                                                       sp_scores)[0]})
    benchmark.extra_info.update(info)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from fastinterp import sparse
    b, d, m, k, threads = (int(v) for v in sys.argv[1:6])
    if threads > 0:
        torch.set_num_threads(threads)
    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    x = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
    sparse.comp_topk(x, torch.nn.functional.normalize(torch.randn(64, d), dim=-1), k=k)  # warm-up
    # reset the peak-RSS high-water mark (VmHWM) so it covers only what follows
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base_kib = status_kib("VmRSS")
    g = torch.empty(m, d)
    g.normal_()
    g /= torch.linalg.vector_norm(g, dim=1, keepdim=True)
    t0 = time.perf_counter()
    scores, ids = sparse.comp_topk(x, g, k=k, coh=0.3)
    elapsed = time.perf_counter() - t0
    peak_kib = status_kib("VmHWM")
    print(json.dumps({"base_kib": base_kib, "peak_kib": peak_kib, "seconds": elapsed,
                      "dictionary_bytes": g.numel() * g.element_size(), "shape": list(ids.shape),
                      "distinct": bool((ids.sort(dim=1).values.diff(dim=1) > 0).all())}))
""")


def test_memory_sparse_form(benchmark):
    b, d, m, k = S["mem_B"], S["mem_D"], S["mem_M"], S["K"]

    def run():
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(b), str(d), str(m), str(k), str(THREADS)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    res = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert res["shape"] == [b, k] and res["distinct"]
    extra = (res["peak_kib"] - res["base_kib"]) * 1024  # peak RSS (VmHWM) above the baseline
    bound = res["dictionary_bytes"] + GIB
    benchmark.extra_info.update({
        "preset": PRESET, "B": b, "D": d, "M": m, "K": k, "threads": torch.get_num_threads(),
        "dictionary_gib": round(res["dictionary_bytes"] / GIB, 3),
        "peak_above_baseline_gib": round(extra / GIB, 3),
        "peak_above_dictionary_mib": round((extra - res["dictionary_bytes"]) / 2**20, 1),
        "bound_gib": round(bound / GIB, 3), "comp_seconds": round(res["seconds"], 3),
        "dense_scores_would_need_gib": round(b * m * 4 / GIB, 3),
    })
    assert extra <= bound, f"peak {extra / GIB:.2f} GiB above baseline exceeds dictionary + 1 GiB"
