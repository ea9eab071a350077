"""TextSpan for all heads at once vs the reference loop (pytest-benchmark).

    FASTINTERP_BENCH_PRESET=quick|full python -m pytest benchmarks/bench_textspan.py --benchmark-only

The CCS setting: the heads of the last 4 layers of a ViT-B (4 x 12 = 48 heads), random
contributions with d = 512 (each head: a random mean plus independent coordinates with a
decaying spread, so the rank-80 subspace is well defined), unit random texts, rank 80,
5 texts per head. "full": 10,000 images and 3,498 texts (the paper's text bank size).

Ours: `fastinterp.textspan.textspan` over all heads (fp32 input: fp32 Gram matrices, the
rest fp64). Baseline: `fastinterp.reference.textspan.textspan_reference` (numpy loop, per
head an SVD and per step the images x texts projection, in the input's fp32 as the
original code), timed on `ref_heads` heads and scaled per head to all heads (stated in
extra_info), after checking that it picks the same texts as ours on those heads.

A second case times the decomposition (`head_contributions`, all layers, random weights)
against `decompose_reference` (the reference hook's per-layer (B, N, N, H, D) tensor), on
the tiny model (quick) or ViT-B-16 (full), the reference on fewer images, scaled per image.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import torch

from benchmarks.presets import preset
from fastinterp.reference.textspan import textspan_reference
from fastinterp.textspan import textspan

SIZES = {
    "quick": {"images": 1_000, "layers": 2, "heads": 4, "dim": 512, "texts": 800, "n_texts": 5, "rank": 80,
              "ref_heads": 1, "decomp_model": "fastinterp-tiny-ViT", "decomp_images": 32, "decomp_ref_images": 8},
    "full": {"images": 10_000, "layers": 4, "heads": 12, "dim": 512, "texts": 3_498, "n_texts": 5, "rank": 80,
             "ref_heads": 2, "decomp_model": "ViT-B-16", "decomp_images": 16, "decomp_ref_images": 1},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K, L, H, d, M = S["images"], S["layers"], S["heads"], S["dim"], S["texts"]
    scales = torch.logspace(0, -2, d)  # spread per coordinate: 1 .. 0.01
    perm = torch.stack([torch.randperm(d, generator=g) for _ in range(L * H)]).view(L, H, d)
    C = torch.randn(K, L, H, d, generator=g) * scales[perm] + 0.5 * torch.randn(L, H, d, generator=g)
    C = C / d ** 0.5
    T = torch.nn.functional.normalize(torch.randn(M, d, generator=g), dim=-1)
    return C.float(), T.float()


def test_textspan_all_heads_vs_reference_loop(benchmark):
    C, T = make_problem()
    K, L, H, d = C.shape
    n_heads = L * H
    ref_heads = [(i // H, i % H) for i in range(min(S["ref_heads"], n_heads))]
    Cn, Tn = C.numpy(), T.numpy()
    t0 = time.perf_counter()
    ref_idx, _ = textspan_reference(Cn, Tn, S["n_texts"], S["rank"], heads=ref_heads)
    ref_s = time.perf_counter() - t0

    def run():
        return textspan(C, T, n_texts=S["n_texts"], rank=S["rank"])

    idx = benchmark.pedantic(run, rounds=3 if PRESET == "quick" else 2, iterations=1, warmup_rounds=0)
    for layer, head in ref_heads:  # validate the baseline against ours on the heads it ran
        assert idx[layer, head].tolist() == ref_idx[layer, head].tolist(), (layer, head)
    ours_s = benchmark.stats.stats.median
    ref_full_s = ref_s / len(ref_heads) * n_heads
    gram_gflop = n_heads * 2 * K * d * d / 1e9
    benchmark.extra_info.update({
        "preset": PRESET, "images": K, "layers": L, "heads_per_layer": H, "heads": n_heads, "dim": d,
        "texts": T.shape[0], "n_texts": S["n_texts"], "rank": S["rank"],
        "reference_heads_timed": len(ref_heads), "reference_seconds_on_timed_heads": ref_s,
        "reference_seconds_scaled_to_all_heads": ref_full_s,
        "reference_scaling": "per head (the reference loops over heads independently)",
        "ours_seconds_all_heads": ours_s, "ours_heads_per_s": n_heads / ours_s,
        "reference_heads_per_s": len(ref_heads) / ref_s, "speedup_vs_reference": ref_full_s / ours_s,
        "ours_gram_gflop": gram_gflop, "ours_gram_gflop_per_s_lower_bound": gram_gflop / ours_s,
        "torch_threads": torch.get_num_threads(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    assert idx.shape == (L, H, S["n_texts"])


def test_head_contributions_vs_reference_decomposition(benchmark):
    import fastinterp
    from fastinterp.reference.textspan import decompose_reference
    from fastinterp.textspan import head_contributions

    torch.manual_seed(0)
    model = fastinterp.load_clip(S["decomp_model"])[0]
    info = fastinterp.vit_info(model)
    n, n_ref = S["decomp_images"], S["decomp_ref_images"]
    pixels = torch.randn(n, 3, *info.image_size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    attn, mlps, _ = decompose_reference(model, pixels[:n_ref])
    ref_s = time.perf_counter() - t0

    def run():
        return head_contributions(model, pixels, batch_size=8, progress=False)

    c = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    torch.testing.assert_close(attn.sum(2), c.heads[:n_ref], atol=1e-5, rtol=1e-4)  # validate the baseline
    ours_s = benchmark.stats.stats.median
    N = info.num_patches + 1
    ref_full_s = ref_s / n_ref * n
    benchmark.extra_info.update({
        "preset": PRESET, "model": S["decomp_model"], "images": n, "reference_images_timed": n_ref,
        "reference_seconds_scaled_to_all_images": ref_full_s, "reference_scaling": "per image",
        "ours_images_per_s": n / ours_s, "reference_images_per_s": n_ref / ref_s,
        "speedup_vs_reference": ref_full_s / ours_s,
        "reference_tensor_mib_per_image_per_layer": N * N * info.heads * info.width * 4 / 2 ** 20,
        "ours_attention_output_mib_per_image_per_layer": N * info.width * 4 / 2 ** 20,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
