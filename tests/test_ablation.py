"""masked_forward against the reference pruning (zeroed weights, full re-run) and hooks."""
import copy

import pytest
import torch

import fastinterp
from fastinterp.ablation import (
    check_masks,
    head_output_means,
    head_set_masks,
    masked_forward,
    parse_head,
    single_head_ablations,
)
from fastinterp.kernels.head_mask import AOT_SPECS, masked_head_projection
from fastinterp.reference import ablation as ref

L, H = 4, 4


@pytest.fixture(scope="module")
def model(tiny_clip):
    return tiny_clip[0]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 64, generator=g)


@pytest.fixture(scope="module")
def text(model):
    g = torch.Generator().manual_seed(2)
    return torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)


def _logits(model, emb, text):
    return model.logit_scale.exp() * torch.nn.functional.normalize(emb, dim=-1) @ text.T


def _random_head_sets(seed, n_sets):
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        k = int(torch.randint(0, 6, (1,), generator=g))
        flat = torch.randperm(L * H, generator=g)[:k].tolist()
        sets.append([(i // H, i % H) for i in flat])
    return sets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_ablation_equals_reference_pruning(model, images, text, seed):
    sets = [[]] + _random_head_sets(seed, 5)
    masks = head_set_masks(model, sets)
    emb = masked_forward(model, images, masks)
    assert emb.shape == (len(sets), 3, 32)
    for c, heads in enumerate(sets):
        expect = ref.pruned_encode(model, images, heads)
        torch.testing.assert_close(emb[c], expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_logits(model, emb[c], text), _logits(model, expect, text), atol=1e-5, rtol=1e-5)


def test_all_ones_is_the_unmasked_model(model, images):
    emb = masked_forward(model, images, torch.ones(2, L, H))
    with torch.no_grad():
        expect = model.encode_image(images, normalize=False)
    torch.testing.assert_close(emb[0], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[1], expect, atol=1e-5, rtol=1e-5)


def test_query_rows_do_not_matter_once_out_columns_are_zero(model, images):
    """Zeroed query rows make the head's attention uniform, but with its out_proj columns
    zeroed its output is removed either way: pruning == zeroing the head output."""
    heads = [(1, 2), (3, 0)]
    only_out = copy.deepcopy(model)
    with torch.no_grad():
        for layer, head in heads:
            attn = only_out.visual.transformer.resblocks[layer].attn
            attn.out_proj.weight[:, head * 16:(head + 1) * 16] = 0
        a = only_out.encode_image(images, normalize=False)
    b = ref.pruned_encode(model, images, heads)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # and the uniform attention really happens: zeroing only the query rows changes the output
    only_q = copy.deepcopy(model)
    with torch.no_grad():
        attn = only_q.visual.transformer.resblocks[1].attn
        attn.in_proj_weight[2 * 16:3 * 16] = 0
        attn.in_proj_bias[2 * 16:3 * 16] = 0
        c = only_q.encode_image(images, normalize=False)
        d = model.encode_image(images, normalize=False)
    assert (c - d).abs().max() > 1e-4


def test_soft_masks_match_hooks(model, images):
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, L, H, generator=g)
    masks[0, :2] = 1  # first masked layer 2
    emb = masked_forward(model, images, masks)
    for c in range(3):
        torch.testing.assert_close(emb[c], ref.hooked_encode(model, images, masks[c]), atol=1e-5, rtol=1e-5)


def test_head_means_and_mean_ablation_match_hooks(model, images):
    means = head_output_means(model, images)
    assert means.shape == (L, 65, H, 16)
    torch.testing.assert_close(means, ref.hooked_head_means(model, images), atol=1e-5, rtol=1e-5)
    # batches given as an iterable give the same mean
    torch.testing.assert_close(head_output_means(model, [images[:1], images[1:]]), means, atol=1e-6, rtol=1e-6)
    g = torch.Generator().manual_seed(4)
    masks = torch.ones(4, L, H)
    masks[1, 3, 2] = 0
    masks[2, 0, 1] = 0
    masks[2, 2, 3] = 0
    masks[3] = torch.rand(L, H, generator=g)
    emb = masked_forward(model, images, masks, mode="mean", means=means)
    for c in range(4):
        torch.testing.assert_close(emb[c], ref.hooked_encode(model, images, masks[c], means=means),
                                   atol=1e-5, rtol=1e-5)
    # mean-ablating a head differs from zeroing it
    zero = masked_forward(model, images, masks[1:2])
    assert (zero[0] - emb[1]).abs().max() > 1e-5


def test_triton_agrees_with_torch(model, images):
    means = head_output_means(model, images)
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(3, L, H, generator=g).round()
    masks[0, 0] = 1
    for mode in ("zero", "mean"):
        a = masked_forward(model, images[:2], masks, mode=mode, means=means, backend="torch")
        b = masked_forward(model, images[:2], masks, mode=mode, means=means, backend="triton")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared,with_y,with_bias", [(False, False, True), (True, True, False), (False, True, True)])
def test_kernel_triton_vs_torch(shared, with_y, with_bias):
    g = torch.Generator().manual_seed(6)
    C, R, Hh, hd, D, T = 3, 20, 3, 20, 24, 5
    x = torch.randn(1 if shared else C, R, Hh, hd, generator=g)
    a = torch.rand(C, Hh, generator=g)
    a[1, 0] = 0  # a skipped head
    w = torch.randn(D, Hh * hd, generator=g)
    bias = torch.randn(D, generator=g) if with_bias else None
    y = torch.randn(T, Hh, hd, generator=g) if with_y else None
    b = (1 - a) if with_y else None
    out_t = masked_head_projection(x, a, w, bias, y=y, b=b, backend="torch")
    out_k = masked_head_projection(x, a, w, bias, y=y, b=b, backend="triton")
    # direct formula
    xs = x.expand(C, -1, -1, -1)
    mixed = xs * a[:, None, :, None]
    if with_y:
        mixed = mixed + b[:, None, :, None] * y.repeat(R // T, 1, 1)[None]
    expect = mixed.reshape(C, R, -1) @ w.T + (bias if with_bias else 0)
    torch.testing.assert_close(out_t, expect, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_k, expect, atol=1e-4, rtol=1e-5)


def test_aot_specs_shape():
    assert AOT_SPECS, "the Triton kernel must expose AOT_SPECS"
    for spec in AOT_SPECS:
        assert set(spec) == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
        assert set(spec["constexprs"]) <= set(spec["signature"])
        assert all(spec["signature"][k] == "constexpr" for k in spec["constexprs"])


def test_single_head_fast_path_equals_full_reruns(model, images):
    emb, heads = single_head_ablations(model, images, layers=[-2, -1])
    assert heads == [(2, h) for h in range(H)] + [(3, h) for h in range(H)]
    assert emb.shape == (8, 3, 32)
    for i, hd in enumerate(heads):
        with ref.zeroed_heads(model, [hd]):
            with torch.no_grad():
                expect = model.encode_image(images, normalize=False)
        torch.testing.assert_close(emb[i], expect, atol=1e-5, rtol=1e-5)
    # the weights are restored afterwards
    torch.testing.assert_close(masked_forward(model, images, torch.ones(1, L, H))[0],
                               ref.pruned_encode(model, images, []), atol=1e-5, rtol=1e-5)


def test_config_chunks_give_the_same_answer(model, images, monkeypatch):
    import fastinterp.ablation as ablation

    masks = head_set_masks(model, _random_head_sets(7, 5))
    full = masked_forward(model, images, masks)
    torch.testing.assert_close(masked_forward(model, images, masks, config_chunk=2), full, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(ablation, "ACTIVATION_BUDGET_BYTES", 1)  # automatic chunking down to 1
    torch.testing.assert_close(masked_forward(model, images, masks), full, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="config_chunk"):
        masked_forward(model, images, masks, config_chunk=0)


def test_parse_head():
    assert parse_head("L11.H3") == (11, 3)
    assert parse_head("l2h0") == (2, 0)
    assert parse_head("4:5") == (4, 5)
    assert parse_head((1, 2)) == (1, 2)
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        parse_head("head seven")


def test_bad_input(model, images):
    with pytest.raises(IndexError, match="layer 4 is out of range"):
        head_set_masks(model, [[(4, 0)]])
    with pytest.raises(IndexError, match="head 9 is out of range"):
        head_set_masks(model, [["L1.H9"]])
    with pytest.raises(ValueError, match=r"needs \(C, 4, 4\)"):
        masked_forward(model, images, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        masked_forward(model, images, torch.full((1, L, H), float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        masked_forward(model, images, torch.full((1, L, H), 1.5))
    with pytest.raises(ValueError, match="no configuration"):
        check_masks(torch.ones(0, L, H), L, H)
    with pytest.raises(ValueError, match="needs means="):
        masked_forward(model, images, torch.ones(1, L, H), mode="mean")
    with pytest.raises(ValueError, match="means must have shape"):
        masked_forward(model, images, torch.ones(1, L, H), mode="mean", means=torch.zeros(L, 3, H, 16))
    with pytest.raises(ValueError, match="mode="):
        masked_forward(model, images, torch.ones(1, L, H), mode="resample")
    with pytest.raises(ValueError, match="model takes"):
        masked_forward(model, torch.zeros(1, 3, 32, 32), torch.ones(1, L, H))
    with pytest.raises(ValueError, match="no images"):
        masked_forward(model, torch.zeros(0, 3, 64, 64), torch.ones(1, L, H))


def test_non_vit_model_is_refused():
    class NotViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="needs a ViT"):
        masked_forward(NotViT(), torch.zeros(1, 3, 64, 64), torch.ones(1, L, H))


def test_dispatch_records_backend(model, images):
    from fastinterp.kernels import dispatch

    masked_forward(model, images[:1], head_set_masks(model, [[(3, 1)]]), backend="torch")
    assert dispatch.last_backend["masked_head_projection"] == "torch"


def test_model_unchanged_by_masked_forward(model, images):
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("visual.")}
    masked_forward(model, images[:1], head_set_masks(model, [[(0, 0), (3, 3)]]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert fastinterp.vit_info(model).heads == H


def test_average_pooled_tower_runs_every_token_of_the_last_block(model, images):
    """With pool_type='tok' the last block runs for the class token only; other poolings need
    every token: check both against the reference pruning."""
    avg = copy.deepcopy(model)
    avg.visual.pool_type = "avg"
    sets = [[], [(3, 2)], [(1, 0), (3, 3)]]
    emb = masked_forward(avg, images, head_set_masks(avg, sets))
    for c, heads in enumerate(sets):
        torch.testing.assert_close(emb[c], ref.pruned_encode(avg, images, heads), atol=1e-5, rtol=1e-5)
    assert (emb[0] - masked_forward(model, images, torch.ones(1, L, H))[0]).abs().max() > 1e-4
