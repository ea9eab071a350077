"""TextSpan and the per-term decomposition, reference semantics (SPEC.md 2.1, 2.2), plainly.

* ``decompose_reference(model, pixels)``: the per-term decomposition the reference hook
  computes. For every layer the full (B, N, N, H, D) tensor of per-(query, source, head)
  attention outputs through W_o is built, out_proj.bias spread evenly over (source, head),
  and the CLS query row kept: (B, L, N, H, D). The ln_pre output and the MLP outputs of the
  CLS token are the other terms. The final LayerNorm is linearised per term with the real
  mean and std (weights 1/(2L+1) and 1/((2L+1) N H)), projected and divided by ||z||.
* ``textspan_head_reference(data, texts, n_texts, rank)``: one head. SVD of the uncentred
  data, texts projected on the top-`rank` right singular vectors, data centred, then
  `n_texts` times: projections data @ texts.T, std over images (ddof=1), argmax, deflate
  data and texts by the picked text. Returns the indices and the rank-n reconstruction.
* ``textspan_reference(contributions, texts, n_texts, rank)``: loops layer x head over
  the above.

The reconstruction here is the intended one: per image, the mean plus the sum over picks of
(the deflated centred data . t / |t|^2) t. The original code accumulates these into an
array made by repeating the mean row with a zero stride, so every image's coefficients are
added into one shared row (every row ends up equal to mean + the sum over all images). That
bug does not change the picked texts; it is not reproduced.

Slow on purpose: the decomposition is O(B N^2 H D) memory per layer and TextSpan forms the
images x texts projection at every step.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models import vision_transformer


@torch.no_grad()
def decompose_reference(model, pixels: torch.Tensor):
    """Per-term direct contributions. Returns (attn (B, L, N, H, d), mlps (B, L+1, d),
    embedding (B, d)); attn[:, l, m, h] is the term of layer l, source token m, head h."""
    visual = vision_transformer(model)
    x = visual._embeds(pixels.to(visual.conv1.weight.dtype)).float()
    B, N, D = x.shape
    blocks = list(visual.transformer.resblocks)
    L = len(blocks)
    H = blocks[0].attn.num_heads
    hd = D // H
    mlp_terms = [x[:, 0].clone()]
    attn_terms = []
    for block in blocks:
        attn = block.attn
        h = block.ln_1(x)
        qkv = h @ attn.in_proj_weight.T + attn.in_proj_bias
        q, k, v = qkv.split(D, dim=-1)
        q = q.view(B, N, H, hd)
        k = k.view(B, N, H, hd)
        v = v.view(B, N, H, hd)
        scores = torch.einsum("bnhe,bmhe->bhnm", q, k) / np.sqrt(hd)
        weights = torch.softmax(scores, dim=-1)  # (B, H, N, M)
        wo = attn.out_proj.weight.view(D, H, hd)
        # the full per-(query n, source m, head h) tensor through W_o: (B, N, M, H, D)
        full = torch.einsum("bhnm,bmhe,dhe->bnmhd", weights, v, wo)
        full = full + attn.out_proj.bias / (N * H)
        full = block.ls_1(full)
        attn_terms.append(full[:, 0])  # CLS query row (B, M, H, D)
        attn_out = full.sum(dim=(2, 3))  # (B, N, D)
        x = x + attn_out
        m = block.ls_2(block.mlp(block.ln_2(x)))
        mlp_terms.append(m[:, 0].clone())
        x = x + m
    attn_terms = torch.stack(attn_terms, 1)  # (B, L, M, H, D)
    mlp_terms = torch.stack(mlp_terms, 1)  # (B, L+1, D)
    r = x[:, 0]
    ln = visual.ln_post
    mu = r.mean(-1)
    sigma = torch.sqrt(r.var(-1, unbiased=False) + ln.eps)
    proj = visual.proj if visual.proj is not None else torch.eye(D)
    z = ln(r) @ proj
    norm = z.norm(dim=-1)
    n_terms = 2 * L + 1
    out_attn = torch.empty(B, L, N, H, proj.shape[1])
    out_mlp = torch.empty(B, L + 1, proj.shape[1])
    for b in range(B):
        for i in range(L + 1):
            w = 1.0 / n_terms
            c = mlp_terms[b, i]
            out_mlp[b, i] = (ln.weight * (c - w * mu[b]) / sigma[b] + w * ln.bias) @ proj / norm[b]
        for layer in range(L):
            w = 1.0 / (n_terms * N * H)
            c = attn_terms[b, layer]  # (M, H, D)
            out_attn[b, layer] = (ln.weight * (c - w * mu[b]) / sigma[b] + w * ln.bias) @ proj / norm[b]
    return out_attn, out_mlp, z / norm[:, None]


def textspan_head_reference(data: np.ndarray, texts: np.ndarray, n_texts: int, rank: int):
    """One head: data (K, d), texts (M, d) unit rows. Returns (indices list, reconstruction (K, d))."""
    data = np.asarray(data)
    texts = np.asarray(texts)
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    texts = texts @ vh.T @ vh  # into the span of the top singular vectors
    mean = data.mean(axis=0, keepdims=True)
    data = data - mean
    reconstruction = np.repeat(mean, data.shape[0], axis=0)  # a real copy per image
    picks = []
    for _ in range(n_texts):
        projection = data @ texts.T  # (K, M)
        spread = projection.std(axis=0, ddof=1)
        j = int(np.argmax(spread))
        picks.append(j)
        t = texts[j].copy()
        t_norm2 = t @ t
        coef = data @ t / t_norm2
        reconstruction += coef[:, None] * t[None, :]
        data = data - coef[:, None] * t[None, :]
        texts = texts - (texts @ t / t_norm2)[:, None] * t[None, :]
    return picks, reconstruction


def textspan_reference(contributions: np.ndarray, texts: np.ndarray, n_texts: int = 5, rank: int = 80,
                       heads=None):
    """Loop over layer x head. contributions (K, L, H, d); texts (M, d) unit rows.

    Returns (indices (L, H, n_texts) int64 array, reconstruction (K, L, H, d)); with
    `heads` (a list of (layer_pos, head)) only those heads are computed (others -1 / 0).
    """
    contributions = np.asarray(contributions)
    K, L, H, d = contributions.shape
    indices = np.full((L, H, n_texts), -1, dtype=np.int64)
    recon = np.zeros_like(contributions)
    todo = heads if heads is not None else [(layer, head) for layer in range(L) for head in range(H)]
    for layer, head in todo:
        picks, rec = textspan_head_reference(contributions[:, layer, head], texts, n_texts, rank)
        indices[layer, head] = picks
        recon[:, layer, head] = rec
    return indices, recon
