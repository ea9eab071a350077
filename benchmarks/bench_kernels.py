"""Kernels not covered by the other files, and the sweeps the report plots (pytest-benchmark).

    python -m pytest benchmarks/bench_kernels.py --benchmark-only --preset quick|full

Cases (ours and its baselines on the same inputs in the same run; every baseline's output is
validated on every call, and an invalid one is reported as invalid in extra_info, never
timed as a result):

* ``test_l2_normalize_rows[N]``: the foundation kernel ``fastinterp.kernels.l2_normalize_rows``
  (torch form on the CPU) vs ``torch.nn.functional.normalize``; rows/s and GB/s.
* ``test_l2_normalize_rows_cuda``: the Triton form vs ``F.normalize`` on a CUDA device
  (``gpu`` marker: skipped, saying so, without CUDA).
* ``test_pursuit_sweep[algo-form-M]``: OMP (signed rule, least squares), NNOMP (signed,
  NNLS) and COMP (coh 0.3, NNLS) -- SITH's three pursuit methods -- in the sparse form
  (``comp_topk``: (B, K) scores and indices, never a (B, M) matrix) and the dense form
  (``coherent_orthogonal_matching_pursuit``: (B, M) codes), across dictionary sizes M,
  vs the reference semantics ``fastinterp.reference.sparse`` (dense scores, the loop
  written from the spec; computed once per (algo, M), shared by both forms; skipped above
  ``ref_max_M`` in the full preset, stated in extra_info). GFLOP/s counts the K selection
  matmuls (2 B M D each); the report divides it by this machine's matmul rate measured in
  the same run (benchmarks/machine.py). Peak RSS of our call alone is recorded.
* ``test_pursuit_cuda[M]``: the Triton selection kernel on a CUDA device vs the torch form
  there (``gpu`` marker).
* ``test_sinkhorn_single[n-m]``: one problem, ``fastinterp.kernels.sinkhorn.sinkhorn`` vs POT
  ``ot.sinkhorn`` (same a, b, M, reg, numItermax, stopThr); problems/s.
* ``test_head_mask_sweep[images]``: a head-masking sweep (C random pruned head sets, each
  zero-ablating 8 heads) with ``fastinterp.ablation.masked_forward`` (one pass for all
  configurations) vs the reference pruning (``fastinterp.reference.ablation.pruned_encode``,
  one forward per configuration), at several numbers of images; images/s (configurations x
  images per second).
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastinterp
from benchmarks.machine import PeakMemory, timed
from benchmarks.presets import preset
from fastinterp import sparse
from fastinterp.kernels import l2_normalize_rows
from fastinterp.kernels import pursuit as pursuit_kernels
from fastinterp.reference import sparse as ref_sparse

SIZES = {
    "quick": {"norm_rows": [20_000, 200_000], "norm_dim": 512,
              "pursuit_B": 128, "pursuit_D": 512, "pursuit_M": [10_000, 40_000], "K": 5, "ref_max_M": 40_000,
              "sinkhorn": [(5, 300), (100, 100)], "sinkhorn_reg": 0.1,
              "mask_model": fastinterp.TINY_MODEL, "mask_images": [2, 8], "mask_configs": 8, "rounds": 2},
    # B=256 keeps the 1,000,000-atom cases at ~half a minute a call; signals/s does not depend on B here.
    "full": {"norm_rows": [100_000, 1_000_000], "norm_dim": 768,
             "pursuit_B": 256, "pursuit_D": 768, "pursuit_M": [10_000, 100_000, 1_000_000], "K": 5,
             "ref_max_M": 100_000,
             "sinkhorn": [(5, 300), (300, 300), (1000, 1000)], "sinkhorn_reg": 0.1,
             "mask_model": "ViT-B-16", "mask_images": [4, 16], "mask_configs": 8, "rounds": 2},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]
# Same convention as bench_pursuit / bench_sith: 1 intra-op thread by default on the shared
# development machine; FASTINTERP_BENCH_THREADS=0 keeps torch's default.
THREADS = int(os.environ.get("FASTINTERP_BENCH_THREADS", "1"))
if THREADS > 0:
    torch.set_num_threads(THREADS)



def record_baseline(info: dict, name: str, ok: bool, why: str, seconds: float | None, ours_s: float):
    """Baseline bookkeeping: a valid output gets its time and our speed-up over it; an
    invalid one only its status."""
    info[f"{name}_status"] = "ok" if ok else f"invalid: {why}"
    if ok and seconds is not None:
        info[f"{name}_s"] = round(seconds, 5)
        info[f"speedup_vs_{name}"] = round(seconds / ours_s, 3)


# ----------------------------------------------------------------------------- l2 normalise
@pytest.mark.parametrize("n", S["norm_rows"])
def test_l2_normalize_rows(benchmark, n):
    d = S["norm_dim"]
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    l2_normalize_rows(x[:8])
    out = benchmark.pedantic(l2_normalize_rows, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    ours_s = benchmark.stats.stats.min  # best of 5 against the baseline's best of 5
    times = []
    info = {"preset": PRESET, "rows": n, "dim": d, "threads": torch.get_num_threads(),
            "rows_per_s": round(n / ours_s, 1), "ours_gb_per_s": round(2 * x.numel() * 4 / ours_s / 1e9, 2)}
    for _ in range(5):
        expect, t = timed(F.normalize, x, dim=1)
        times.append(t)
    err = float((out - expect).abs().max())
    record_baseline(info, "torch_F_normalize", err < 1e-6, f"max |diff| {err:.2e}", min(times), ours_s)
    info["max_abs_diff"] = err
    benchmark.extra_info.update(info)


@pytest.mark.gpu
def test_l2_normalize_rows_cuda(benchmark):
    n, d = S["norm_rows"][-1], S["norm_dim"]
    x = torch.randn(n, d, device="cuda")

    def ours():
        out = l2_normalize_rows(x, backend="triton")
        torch.cuda.synchronize()
        return out

    ours()
    out = benchmark.pedantic(ours, rounds=10, iterations=1, warmup_rounds=2)
    ours_s = benchmark.stats.stats.median

    def theirs():
        y = F.normalize(x, dim=1)
        torch.cuda.synchronize()
        return y

    theirs()
    expect, t = min((timed(theirs) for _ in range(10)), key=lambda r: r[1])
    err = float((out - expect).abs().max())
    info = {"preset": PRESET, "rows": n, "dim": d, "device": torch.cuda.get_device_name(0),
            "rows_per_s": round(n / ours_s, 1), "ours_gb_per_s": round(2 * x.numel() * 4 / ours_s / 1e9, 2)}
    record_baseline(info, "torch_F_normalize", err < 1e-6, f"max |diff| {err:.2e}", t, ours_s)
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- pursuit sweep
ALGOS = {  # name: (coh, positive); all with SITH's signed selection rule
    "omp": (0.0, False),
    "nnomp": (0.0, True),
    "comp": (0.3, True),
}
_PROBLEMS: dict = {}
_REFERENCE: dict = {}


def pursuit_problem(m: int):
    """Unit-norm fp32 signals (B, D) and dictionary (M, D); cached per M for the module."""
    if m not in _PROBLEMS:
        _PROBLEMS.clear()  # keep one dictionary alive at a time (M up to 1,000,000)
        _REFERENCE.clear()
        g = torch.Generator().manual_seed(m)
        b, d = S["pursuit_B"], S["pursuit_D"]
        dictionary = torch.empty(m, d)
        dictionary.normal_(generator=g)
        dictionary /= torch.linalg.vector_norm(dictionary, dim=1, keepdim=True)
        x = torch.randn(b, d, generator=g)
        x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
        _PROBLEMS[m] = (x, dictionary)
    return _PROBLEMS[m]


def reference_codes(algo: str, m: int):
    """(dense reference codes (B, M), seconds), computed once per (algo, M)."""
    if (algo, m) not in _REFERENCE:
        x, g = pursuit_problem(m)
        coh, positive = ALGOS[algo]
        _REFERENCE[(algo, m)] = timed(ref_sparse.coherent_orthogonal_matching_pursuit, x, g,
                                      max_sparsity=S["K"], coh=coh, positive=positive)
    return _REFERENCE[(algo, m)]


def codes_agree(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[bool, str, float]:
    """Same nonzero supports on >= 99.9 % of the rows, values within 1e-4 there."""
    same = ((ours != 0) == (theirs != 0)).all(dim=1)
    frac = float(same.float().mean())
    diff = float((ours - theirs)[same].abs().max()) if bool(same.any()) else float("inf")
    if not torch.isfinite(theirs).all():
        return False, "non-finite codes", frac
    ok = frac >= 0.999 and diff < 1e-4
    return ok, f"{frac:.3%} rows with our support, max |diff| {diff:.2e}", frac


@pytest.mark.parametrize("m", S["pursuit_M"])
@pytest.mark.parametrize("form", ["sparse", "dense"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_pursuit_sweep(benchmark, algo, form, m):
    x, g = pursuit_problem(m)
    b, d, k = x.shape[0], x.shape[1], S["K"]
    coh, positive = ALGOS[algo]
    if form == "sparse":
        def ours():
            return sparse.comp_topk(x, g, k=k, coh=coh, positive=positive)
    else:
        def ours():
            return sparse.coherent_orthogonal_matching_pursuit(x, g, max_sparsity=k, coh=coh, positive=positive)
    ours()  # dictionary validation cache, warm-up
    with PeakMemory() as mem:
        out = benchmark.pedantic(ours, rounds=S["rounds"], iterations=1, warmup_rounds=0)
    ours_s = benchmark.stats.stats.min
    flops = k * 2.0 * b * m * d
    info = {"preset": PRESET, "algo": algo, "form": form, "B": b, "D": d, "M": m, "K": k, "coh": coh,
            "positive": positive, "threads": torch.get_num_threads(), "ours_s": round(ours_s, 5),
            "signals_per_s": round(b / ours_s, 1), "ours_gflops": round(flops / ours_s / 1e9, 2),
            "ours_peak_rss_mib": mem.mib, "dense_codes_mib": round(b * m * 4 / 2 ** 20, 1),
            # bf16 screening does fewer fp32 flops than counted: the fraction of matmul can exceed 1
            "bf16_screen": pursuit_kernels._bf16_screen_available(x.device) and m >= pursuit_kernels.SCREEN_MIN_ATOMS}
    dense = out if form == "dense" else torch.zeros(b, m).scatter_(1, out[1], out[0])
    if m <= S["ref_max_M"]:
        theirs, ref_s = reference_codes(algo, m)
        ok, why, frac = codes_agree(dense, theirs)
        record_baseline(info, "reference", ok, why, ref_s, ours_s)
        info["reference_agreement_rows"] = frac
        if ok:
            info["reference_gflops"] = round(flops / ref_s / 1e9, 2)
    else:
        info["reference_status"] = f"not run: M > ref_max_M = {S['ref_max_M']} (dense (B, M) scores, minutes)"
    benchmark.extra_info.update(info)
    assert out[1].shape == (b, k) if form == "sparse" else out.shape == (b, m)


@pytest.mark.gpu
@pytest.mark.parametrize("m", S["pursuit_M"])
def test_pursuit_cuda(benchmark, m):
    x, g = (t.cuda() for t in pursuit_problem(m))
    b, d, k = x.shape[0], x.shape[1], S["K"]

    def run(backend):
        out = sparse.comp_topk(x, g, k=k, coh=0.3, backend=backend)
        torch.cuda.synchronize()
        return out

    run("triton")
    scores, ids = benchmark.pedantic(run, args=("triton",), rounds=5, iterations=1, warmup_rounds=1)
    ours_s = benchmark.stats.stats.median
    run("torch")
    (t_scores, t_ids), torch_s = min((timed(run, "torch") for _ in range(3)), key=lambda r: r[1])
    same = float((ids.sort(1).values == t_ids.sort(1).values).all(1).float().mean())
    flops = k * 2.0 * b * m * d
    info = {"preset": PRESET, "algo": "comp", "form": "sparse", "device": torch.cuda.get_device_name(0),
            "B": b, "D": d, "M": m, "K": k, "signals_per_s": round(b / ours_s, 1),
            "ours_gflops": round(flops / ours_s / 1e9, 2)}
    record_baseline(info, "torch_backend", same >= 0.999, f"{same:.3%} rows with the same atoms", torch_s, ours_s)
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- Sinkhorn, one problem
@pytest.mark.parametrize("shape", S["sinkhorn"], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sinkhorn_single(benchmark, shape):
    ot = pytest.importorskip("ot")
    from fastinterp.kernels import sinkhorn as sk

    n, m = shape
    reg = S["sinkhorn_reg"]
    cost = np.random.default_rng(n * m).random((n, m))
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    sk.sinkhorn(a, b, cost, reg, warn=False)  # compile / load the cache
    plan = benchmark.pedantic(sk.sinkhorn, args=(a, b, cost, reg), kwargs={"warn": False},
                              rounds=20, iterations=1, warmup_rounds=1)  # tens of us: many rounds
    ours_s = benchmark.stats.stats.median
    info = {"preset": PRESET, "n": n, "m": m, "reg": reg, "problems_per_s": round(1.0 / ours_s, 1)}
    times, pot_plan = [], None
    for _ in range(5):  # validated on every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pot_plan, t = timed(ot.sinkhorn, a, b, cost, reg)
        ok = bool(np.isfinite(pot_plan).all()) and np.allclose(pot_plan, plan, rtol=0, atol=1e-9)
        if not ok:
            break
        times.append(t)
    err = float(np.abs(pot_plan - plan).max()) if np.isfinite(pot_plan).all() else float("nan")
    record_baseline(info, "pot", ok, f"max |plan diff| {err:.2e} (or non-finite)", min(times) if ok else None,
                    ours_s)
    info["max_abs_plan_diff_vs_pot"] = err
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- head-masking sweep
@pytest.fixture(scope="module")
def mask_setup():
    torch.manual_seed(0)
    model = fastinterp.load_clip(S["mask_model"])[0]
    model.eval()
    info = fastinterp.vit_info(model)
    rng = np.random.default_rng(0)
    all_heads = [(layer, head) for layer in range(info.layers) for head in range(info.heads)]
    sets = [[all_heads[i] for i in rng.choice(len(all_heads), size=min(8, len(all_heads)), replace=False)]
            for _ in range(S["mask_configs"])]
    images = torch.randn(max(S["mask_images"]), 3, *info.image_size, generator=torch.Generator().manual_seed(1))
    return model, info, sets, images


@pytest.mark.parametrize("n_images", S["mask_images"])
def test_head_mask_sweep(benchmark, mask_setup, n_images):
    from fastinterp.ablation import head_set_masks, masked_forward
    from fastinterp.reference import ablation as ref_ablation

    model, info, sets, all_images = mask_setup
    images = all_images[:n_images]
    masks = head_set_masks(model, sets)
    with torch.no_grad():
        masked_forward(model, images[:1], masks[:2])  # warm-up
        out = benchmark.pedantic(masked_forward, args=(model, images, masks), rounds=S["rounds"], iterations=1,
                                 warmup_rounds=0)
        ours_s = benchmark.stats.stats.min
        t0 = time.perf_counter()
        expect = torch.stack([ref_ablation.pruned_encode(model, images, heads, copy_model=False) for heads in sets])
        ref_s = time.perf_counter() - t0
    scale = float(expect.abs().max())
    err = float((out - expect).abs().max())
    n_eval = len(sets) * n_images
    info_ = {"preset": PRESET, "model": S["mask_model"], "images": n_images, "configurations": len(sets),
             "heads_ablated_per_configuration": len(sets[0]), "threads": torch.get_num_threads(),
             "ours_s": round(ours_s, 4), "ours_images_per_s": round(n_eval / ours_s, 1),
             "max_abs_diff": err, "embedding_scale": scale}
    ok = bool(torch.isfinite(expect).all()) and err <= 1e-4 * max(1.0, scale)
    record_baseline(info_, "reference", ok, f"max |diff| {err:.2e} (scale {scale:.2e})", ref_s, ours_s)
    if ok:
        info_["reference_images_per_s"] = round(n_eval / ref_s, 1)
    benchmark.extra_info.update(info_)
