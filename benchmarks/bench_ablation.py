"""Single-head ablations: fastinterp's masked_forward vs separate pruned forwards.

    FASTINTERP_BENCH_PRESET=quick|full python -m pytest benchmarks/bench_ablation.py --benchmark-only -s

Case: every single-head ablation of the last 4 layers (48 for ViT-B-16: 4 x 12 heads) over
a batch of images. Ours: `fastinterp.ablation.single_head_ablations` (one pass: the
unmasked prefix once, each ablation's own layer corrected by the head's contribution, only
the later layers re-run on the expanded batch). Baseline: the CCS reference's pruning,
one full `encode_image` per head with its query rows and out_proj columns zeroed
(`fastinterp.reference.ablation`; zeroed in place and restored, so no model copy is timed:
the cheapest form of the baseline). The baseline's embeddings are checked against ours
before anything is timed; the speedup is in extra_info. Target: >= 4x.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.presets import preset
import fastinterp
from fastinterp.ablation import single_head_ablations
from fastinterp.reference import ablation as ref

SIZES = {
    "quick": {"model": fastinterp.TINY_MODEL, "images": 8, "last_layers": 4, "rounds": 3},
    "full": {"model": "ViT-B-16", "images": 16, "last_layers": 4, "rounds": 1},
}
PRESET = preset(SIZES)
S = SIZES[PRESET]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, _, _ = fastinterp.load_clip(S["model"])
    info = fastinterp.vit_info(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(S["images"], 3, *info.image_size, generator=g)
    layers = list(range(info.layers - S["last_layers"], info.layers))
    return model, info, images, layers


def baseline(model, images, heads):
    return torch.stack([ref.pruned_encode(model, images, [h], copy_model=False) for h in heads])


def test_single_head_ablations(benchmark, setup):
    model, info, images, layers = setup
    ours, heads = single_head_ablations(model, images, layers)  # warm-up, and the outputs to validate
    t0 = time.perf_counter()
    expect = baseline(model, images, heads)
    ref_s = time.perf_counter() - t0
    scale = expect.abs().max().item()
    err = (ours - expect).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale) * 10, f"ours differs from the reference pruning by {err} (scale {scale})"

    result = benchmark.pedantic(single_head_ablations, args=(model, images, layers), rounds=S["rounds"],
                                iterations=1, warmup_rounds=0)
    torch.testing.assert_close(result[0], ours)
    ours_s = benchmark.stats.stats.min
    n = len(heads)
    benchmark.extra_info.update({
        "preset": PRESET, "model": S["model"], "images": S["images"], "ablations": n,
        "reference_s": round(ref_s, 3), "ours_s": round(ours_s, 3), "speedup": round(ref_s / ours_s, 2),
        "max_abs_diff": err, "embedding_scale": scale,
        "ablated_images_per_s_ours": round(n * S["images"] / ours_s, 1),
        "ablated_images_per_s_reference": round(n * S["images"] / ref_s, 1),
        "torch_threads": torch.get_num_threads(),
    })
    print(f"\n[bench_ablation {PRESET}] {n} single-head ablations x {S['images']} images of {S['model']}: "
          f"reference {ref_s:.2f} s, ours {ours_s:.2f} s, speedup {ref_s / ours_s:.2f}x, max |diff| {err:.2e}")
