"""Head contributions, SITH and mutual-knowledge features on towers that do not read just
the class token (issue 11): CLIPA's average pool, CoCa's attentional pooler, timm towers
(class token / average pool, linear head), on small random-weight towers of their configs
(tests/model_zoo.py builds them). Each per-head term is also recomputed the slow way (every
token's term, in the readout's own order) to catch a wrong split that still sums right."""
import pytest
import torch
import torch.nn.functional as F

import model_zoo
from fastinterp.textspan import _linearise_direct, head_contributions
from fastinterp.vit import direct_terms, head_outputs, vit_view

TOL = 1e-5
POOLED = ["ViT-L-14-CLIPA", "coca_ViT-B-32", "MobileCLIP2-L-14", "vit_medium_patch16_gap_256"]


@pytest.fixture(scope="module")
def towers():
    return {n: model_zoo.build_tower(n)[0] for n in POOLED + ["ViT-B-32", "ViT-B-16-SigLIP"]}


def _per_token_terms(view, x):
    """[(layer, (B, N, H, D) each head's per-token output through LayerScale, bias split)], final residual."""
    h, out = view.embed(x), []
    for block in view.blocks:
        o = head_outputs(block, h)
        H, hd = block.heads, block.head_dim
        t = torch.einsum("bnhe,dhe->bnhd", o, block.out_weight.view(-1, H, hd))
        if block.out_bias is not None:
            t = t + block.out_bias / H
        t = block.ls_1(t)
        out.append(t)
        h = block.mlp_residual(h + t.sum(2))
    return out, h


def _ln(norm, v):
    g = norm.weight if norm.weight is not None else torch.ones(v.shape[-1])
    b = norm.bias if norm.bias is not None else torch.zeros(v.shape[-1])
    return g, b, v.mean(-1, keepdim=True), torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + norm.eps)


def _slow_head_term(model, view, x, layer, head, w):
    """One head's direct term, token by token, for CLIPA (mean then ln_post) and CoCa (ln_k per
    token, the pooler's attention weights from torch's own MultiheadAttention, ln_post, proj)."""
    terms, final = _per_token_terms(view, x)
    c = terms[layer][:, :, head]  # (B, N, D)
    v = model.visual
    if view.pooling == "avg":
        g, b, mu, s = _ln(v.ln_post, final[:, 1:].mean(1))
        y = g * (c[:, 1:].mean(1) - w * mu) / s + w * b
    else:
        pool, mha = v.attn_pool, v.attn_pool.attn
        g1, b1, mu1, s1 = _ln(pool.ln_k, final)
        y_tok = g1 * (c - w * mu1) / s1 + w * b1  # (B, N, D): ln_k's share of this head, per token
        kx = pool.ln_k(final)
        q = pool.ln_q(pool.query)[None].expand(x.shape[0], -1, -1)
        out, a = mha(q, kx, kx, need_weights=True, average_attn_weights=False)  # a (B, P, Q, N)
        E, P = mha.embed_dim, mha.num_heads
        wv = mha.v_proj_weight if not mha._qkv_same_embed_dim else mha.in_proj_weight[2 * E:]
        bv = mha.in_proj_bias[2 * E:]
        vals = (y_tok @ wv.T).view(*y_tok.shape[:2], P, E // P)  # (B, N, P, hp)
        pooled = torch.einsum("bpn,bnpe->bpe", a[:, :, 0], vals).flatten(1) @ mha.out_proj.weight.T
        pooled = pooled + w * (mha.out_proj.weight @ bv + mha.out_proj.bias)
        g2, b2, mu2, s2 = _ln(v.ln_post, out[:, 0])
        y = g2 * (pooled - w * mu2) / s2 + w * b2
    z = view.finish(final)
    return (y @ v.proj) / z.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("name", POOLED)
def test_head_contributions_sum_to_the_embedding(towers, name):
    model = towers[name]
    x = model_zoo._images(model)
    for layers in (None, [1]):
        c = head_contributions(model, x, layers=layers, progress=False)
        assert torch.allclose(c.total(), c.embedding, atol=TOL), name
        assert torch.allclose(c.embedding, F.normalize(model.encode_image(x), dim=-1), atol=TOL), name
    assert c.heads.shape == (2, 1, 4, model.encode_image(x).shape[-1])


@pytest.mark.parametrize("name", ["ViT-L-14-CLIPA", "coca_ViT-B-32"])
@torch.no_grad()
def test_each_head_term_equals_its_token_by_token_value(towers, name):
    model = towers[name]
    view, x = vit_view(model), model_zoo._images(model)
    c = head_contributions(model, x, progress=False)
    w = 1.0 / ((2 * view.info.layers + 1) * view.info.heads)
    for layer, head in ((0, 0), (1, 3)):
        slow = _slow_head_term(model, view, x, layer, head, w)
        assert torch.allclose(c.heads[:, layer, head], slow, atol=TOL), (name, layer, head)


@torch.no_grad()
def test_general_route_matches_the_class_token_route(towers):
    """The readout route (token weights + linear readout) on a class-token ViT gives the class-token
    path's terms head by head."""
    model = towers["ViT-B-32"]
    view, x = vit_view(model), model_zoo._images(model)
    c = head_contributions(model, x, layers=[1], progress=False)
    h, m, o, e = _linearise_direct(*direct_terms(view, x, {1}), view.info.layers)
    for got, want in ((h, c.heads), (m, c.mlps), (o, c.other), (e, c.embedding)):
        assert torch.allclose(got, want, atol=TOL)


def test_map_head_is_refused(towers):
    with pytest.raises(TypeError, match="MAP head"):
        head_contributions(towers["ViT-B-16-SigLIP"], torch.zeros(1, 3, 64, 64), progress=False)


@pytest.mark.parametrize("name", ["MobileCLIP2-L-14", "vit_medium_patch16_gap_256", "ViT-B-16-SigLIP"])
@torch.no_grad()
def test_sith_vo_on_timm_blocks(towers, name):
    from fastinterp.sith import vo_matrices, vo_svd

    model = towers[name]
    b = model.visual.trunk.blocks[0]
    D, H = b.attn.qkv.weight.shape[1], b.attn.num_heads
    hd = D // H
    w = vo_matrices(model, 0, fold_ln=False)
    gamma = getattr(b.ls1, "gamma", torch.ones(D))
    for h in range(H):  # explicit W_v[h]^T W_o[:, h]^T from timm's fused qkv and proj, LayerScale folded
        w_v = b.attn.qkv.weight[2 * D + h * hd:2 * D + (h + 1) * hd]
        w_o = gamma[:, None] * b.attn.proj.weight[:, h * hd:(h + 1) * hd]
        assert torch.allclose(w[h], w_v.T @ w_o.T, atol=1e-6)
    folded = vo_matrices(model, 0, center=False)  # ln_1 (norm1) folded: x_hat @ W == norm1 output @ W_unfolded
    y = torch.randn(3, D)
    y_hat = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + b.norm1.eps)
    lhs = torch.einsum("nd,hde->nhe", y_hat, folded)
    rhs = torch.einsum("nd,hde->nhe", y_hat * b.norm1.weight, w)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    u, s, vh = vo_svd(model, 0, center=False, fold_ln=False)
    assert torch.allclose(u @ torch.diag_embed(s) @ vh, w, atol=1e-5)


@torch.no_grad()
def test_sith_projection_on_timm_towers(towers):
    from fastinterp.sith import project

    model = towers["MobileCLIP2-L-14"]  # class token, timm's norm, its linear head
    view, x = vit_view(model), model_zoo._images(model)
    h = view.embed(x)
    for block in view.blocks:
        h = block.mlp_residual(h + block.ls_1(model_zoo._attn(block, h)))
    assert torch.allclose(project(model, h[:, 0]), F.normalize(model.encode_image(x), dim=-1), atol=TOL)
    with pytest.raises(TypeError, match="normalises every token before the average"):
        project(towers["vit_medium_patch16_gap_256"], h[:, 0])
    with pytest.raises(TypeError, match="'map'"):
        project(towers["ViT-B-16-SigLIP"], h[:, 0])


def test_sith_weight_edits_and_fidelity_refuse_timm_towers(towers):
    from fastinterp.sith import fidelity
    from fastinterp.sith import apply_multipliers

    model = towers["MobileCLIP2-L-14"]
    with pytest.raises(TypeError, match="timm towers by this method"):
        apply_multipliers(model, 0, {0: [0.5]})
    with pytest.raises(TypeError, match="timm towers by this method"):
        fidelity(model, 0, torch.zeros(4, 2, 1), torch.zeros(4, 2, 1, dtype=torch.long), torch.eye(32))


@pytest.mark.parametrize("name", ["MobileCLIP2-L-14", "ViT-B-16-SigLIP"])
@torch.no_grad()
def test_mutual_features_on_timm_towers(towers, name):
    from fastinterp.vision import patch_features

    model = towers[name]
    view, x = vit_view(model), model_zoo._images(model)
    tokens, emb = patch_features(model, x, facet="tokens", batch_size=1)
    keys, _ = patch_features(model, x, facet="keys")
    n, D = view.info.num_patches, view.info.width
    assert tokens.shape == keys.shape == (2, n, D)
    assert torch.allclose(emb, model.encode_image(x), atol=TOL)  # batch_size=1: batched rounding only
    h = view.embed(x)
    for block in view.blocks[:-1]:
        h = block.mlp_residual(h + block.ls_1(model_zoo._attn(block, h)))
    last = view.blocks[-1]
    assert torch.allclose(keys, (last.norm(h) @ last.qkv_weight[D:2 * D].T)[:, view.prefix_tokens:], atol=TOL)
    h = last.mlp_residual(h + last.ls_1(model_zoo._attn(last, h)))
    assert torch.allclose(tokens, h[:, view.prefix_tokens:], atol=TOL)


def test_sith_decompose_runs_on_a_timm_token_tower(towers):
    from fastinterp.sith import decompose

    torch.manual_seed(0)
    atoms = torch.randn(50, 32)
    out = decompose(towers["MobileCLIP2-L-14"], atoms, [1], rank=4, sparsity=3, progress=False)[1]
    assert out["scores"].shape == out["indices"].shape == (4, 4, 3)
    with pytest.raises(TypeError, match="normalises every token"):
        decompose(towers["vit_medium_patch16_gap_256"], atoms, [1], rank=4, sparsity=3, progress=False)
