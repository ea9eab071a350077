"""The model zoo: every open_clip config's image tower either passes each method's invariant
or is refused with a TypeError (never a silent wrong answer), and docs/model_support.md is
the table of that walk (regenerate with `python tests/model_zoo.py --write`).

The whole walk takes a few minutes on 2 cores; FASTINTERP_ZOO=quick checks one config per
family only (and skips the table comparison)."""
import os

import pytest
import torch

import model_zoo

QUICK = ["ViT-B-32", "coca_ViT-B-32", "ViT-M-16-alt", "ViT-L-14-CLIPA", "RN50", "ViT-B-16-SigLIP",
         "vit_medium_patch16_gap_256", "MobileCLIP2-L-14", "vit_relpos_medium_patch16_cls_224", "EVA02-B-16",
         "convnext_tiny"]


@pytest.fixture(scope="module")
def quick_results():
    return {n: model_zoo.check_model(n) for n in QUICK}


def test_standard_layerscale_clipa_and_timm_token_vits_support_every_method(quick_results):
    for name in ("ViT-B-32", "ViT-M-16-alt", "ViT-L-14-CLIPA", "MobileCLIP2-L-14"):
        assert set(quick_results[name].values()) == {"exact"}, (name, quick_results[name])


def test_pooler_towers_are_exact_where_linear_and_refuse_the_rest(quick_results):
    for name in ("coca_ViT-B-32", "ViT-B-16-SigLIP", "vit_medium_patch16_gap_256"):
        r = quick_results[name]
        assert r["masked_forward"] == r["mean_ablation"] == r["sith_vo"] == r["mutual"] == "exact", (name, r)
    coca, siglip, gap = (quick_results[n] for n in ("coca_ViT-B-32", "ViT-B-16-SigLIP", "vit_medium_patch16_gap_256"))
    assert coca["textspan"] == gap["textspan"] == "exact"  # linear given the pooler's weights / each token's std
    assert "attn_pool" in coca["sith_project"]
    assert "MAP head" in siglip["textspan"] and "'map'" in siglip["sith_project"]
    assert "normalises every token" in gap["sith_project"]


def test_unreadable_towers_are_refused_by_every_method(quick_results):
    for name in ("RN50", "vit_relpos_medium_patch16_cls_224", "EVA02-B-16", "convnext_tiny"):
        r = quick_results[name]
        assert all(v.startswith("refused") for v in r.values()), (name, r)
    assert "ModifiedResNet" in quick_results["RN50"]["masked_forward"]
    assert "Eva" in quick_results["EVA02-B-16"]["masked_forward"]


def test_view_describes_poolings():
    from fastinterp.vit import vit_view

    for name, pooling, linear in (("ViT-B-32", "tok", True), ("coca_ViT-B-32", "attn_pool", False),
                                  ("ViT-L-14-CLIPA", "avg", True), ("ViT-B-16-SigLIP", "map", False)):
        model, _ = model_zoo.build_tower(name)
        view = vit_view(model)
        assert (view.pooling, view.linear_readout) == (pooling, linear), name
        x = model_zoo._images(model)
        h = view.embed(x)
        for block in view.blocks:
            h = block.mlp_residual(h + block.ls_1(model_zoo._attn(block, h)))
        with torch.no_grad():
            assert torch.allclose(view.finish(h), model.encode_image(x), atol=1e-5), name


@pytest.mark.skipif(os.environ.get("FASTINTERP_ZOO") == "quick", reason="FASTINTERP_ZOO=quick")
def test_whole_model_list_and_support_table():
    """Every config: invariants hold or a refusal; the table in docs/ is this walk's."""
    text = model_zoo.table(model_zoo.walk())  # raises AssertionError on any wrong answer
    current = model_zoo.TABLE.read_text() if model_zoo.TABLE.exists() else ""
    assert text == current, ("docs/model_support.md is stale (new open_clip configs or a changed method): "
                             "regenerate it with `python tests/model_zoo.py --write`")
