"""SITH, reference semantics (SPEC.md 1.1-1.3, 1.5-1.7), written plainly.

Dense (H, D, D) value-output matrices built by the reshapes of SPEC 1.1, a full
`torch.linalg.svd` of each, the sign convention of 1.2, the joint-space projection of 1.3,
the per-batch coding flow of SITH's decompose script (dense codes, then `topk`), the
fidelity loop of 1.6, and an explicit-VO attention module that runs a block with any
(edited) VO matrices, the way SITH's `MultiheadAttentionWithOV` does. This is what the
tests compare `fastinterp.sith` against and what the benchmark times as the baseline.

Shapes: H heads, hd head dim, D width, d joint dim, r rank, K sparsity, M atoms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import sparse as ref_sparse

__all__ = [
    "ExplicitVOAttention",
    "decompose_layer",
    "fidelity",
    "folded_weights",
    "project",
    "svd",
    "vo_matrices",
]


@torch.no_grad()
def folded_weights(block, *, fold_ln: bool, center: bool):
    """(W_qkv (3D, D), b_qkv (3D,), W_o (D, D), b_o (D,)) after optional LN folding and centering."""
    attn = block.attn
    w_qkv = attn.in_proj_weight.detach().clone()
    b_qkv = attn.in_proj_bias.detach().clone()
    if fold_ln:
        b_qkv = b_qkv + w_qkv @ block.ln_1.bias.detach()
        w_qkv = w_qkv * block.ln_1.weight.detach()
    if center:
        w_qkv = w_qkv - w_qkv.mean(dim=1, keepdim=True)
    w_o = attn.out_proj.weight.detach().clone()
    if center:
        w_o = w_o - w_o.mean(dim=0, keepdim=True)
    return w_qkv, b_qkv, w_o, attn.out_proj.bias.detach().clone()


@torch.no_grad()
def vo_matrices(block, *, fold_ln: bool = True, center: bool | None = None):
    """(W_VO (H, D_in, D_out) right-multiplication form, bias (D,)): a token row x adds
    x @ W_VO[h]; `bias` = b_o + W_o b_v (value bias pushed through W_o)."""
    center = fold_ln if center is None else center
    attn = block.attn
    H, hd, D = attn.num_heads, attn.head_dim, attn.embed_dim
    w_qkv, b_qkv, w_o, b_o = folded_weights(block, fold_ln=fold_ln, center=center)
    w_v = w_qkv[2 * D:].reshape(H, hd, D)
    b_v = b_qkv[2 * D:]
    bias = b_o + w_o @ b_v
    w_o_heads = w_o.reshape(D, H, hd).permute(1, 0, 2)  # (H, D_out, hd)
    w_ov = w_o_heads @ w_v  # (H, D_out, D_in)
    return w_ov.transpose(1, 2).contiguous(), bias


def svd(w: torch.Tensor, rank: int | None = None):
    """torch.linalg.svd, truncated to `rank`, signs fixed so that each U column's
    largest-magnitude entry is positive (Vh rows flipped with it)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if rank is not None:
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    where = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, where))
    return u * signs, s, vh * signs.transpose(-2, -1)


@torch.no_grad()
def project(visual, v: torch.Tensor, image_mean: torch.Tensor | None = None) -> torch.Tensor:
    """z = normalize(proj(ln_post(v))); z = normalize(z - image_mean) when a mean is given."""
    z = visual.ln_post(v)
    if visual.proj is not None:
        z = z @ visual.proj
    z = F.normalize(z, dim=-1)
    if image_mean is not None:
        z = F.normalize(z - image_mean, dim=-1)
    return z


@torch.no_grad()
def decompose_layer(visual, layer: int, dictionary: torch.Tensor, *, rank: int, method: str,
                    sparsity: int, sv_type: str = "right", fold_ln: bool = True,
                    image_mean: torch.Tensor | None = None, batch_size: int = 64):
    """SITH's per-layer flow: VO -> SVD -> singular vectors -> project -> per batch dense
    codes -> topk. Returns {"scores", "indices"} each (H, r, K)."""
    w_vo, _ = vo_matrices(visual.transformer.resblocks[layer], fold_ln=fold_ln)
    u, _, vh = svd(w_vo, rank)
    x = u.transpose(-2, -1) if sv_type == "left" else vh  # (H, r, D)
    H, r = x.shape[:2]
    z = project(visual, x.flatten(0, 1), image_mean)
    all_scores, all_indices = [], []
    for start in range(0, len(z), batch_size):
        batch = z[start:start + batch_size]
        if method.startswith("comp-"):
            codes = ref_sparse.coherent_orthogonal_matching_pursuit(
                batch, dictionary, max_sparsity=sparsity, coh=float(method.split("-", 1)[1]), positive=True)
        elif method in ("omp", "nnomp"):
            codes = ref_sparse.orthogonal_matching_pursuit(batch, dictionary, max_sparsity=sparsity, positive=True)
        elif method == "mp":
            codes = ref_sparse.matching_pursuit(batch, dictionary, max_sparsity=sparsity, positive=True)
        elif method == "topk":  # the script keeps the similarity order: no re-sorting by coefficient
            ids = (batch @ dictionary.T).topk(sparsity, dim=-1).indices
            coefs = ref_sparse.lstsq(dictionary[ids].transpose(1, 2), batch, positive=True)
            all_scores.append(coefs)
            all_indices.append(ids)
            continue
        else:
            raise ValueError(f"unknown method {method!r}")
        s, i = torch.topk(codes, k=sparsity, dim=-1)
        all_scores.append(s)
        all_indices.append(i)
    scores = torch.cat(all_scores).reshape(H, r, sparsity)
    indices = torch.cat(all_indices).reshape(H, r, sparsity)
    return {"scores": scores, "indices": indices}


@torch.no_grad()
def fidelity(visual, layer: int, scores: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor, *,
             sv_type: str = "right", fold_ln: bool = True, image_mean: torch.Tensor | None = None):
    """Per head: dense codes -> reconstruct -> (+ image mean) -> pinv(proj) -> cosine with
    the singular vectors. Returns cos (H, r)."""
    w_vo, _ = vo_matrices(visual.transformer.resblocks[layer], fold_ln=fold_ln)
    inv_proj = torch.linalg.pinv(visual.proj.detach())  # (d, D)
    H, r = scores.shape[:2]
    out = []
    for h in range(H):
        u, _, vh = svd(w_vo[h], r)
        x = u.T if sv_type == "left" else vh
        codes = torch.zeros(r, dictionary.shape[0], dtype=scores.dtype)
        codes.scatter_(1, indices[h], scores[h])
        y = F.normalize(codes @ dictionary, dim=-1)
        if image_mean is not None:
            y = F.normalize(y + image_mean, dim=-1)
        y = F.normalize(y @ inv_proj, dim=-1)
        out.append(F.cosine_similarity(y, x, dim=-1))
    return torch.stack(out)


class ExplicitVOAttention(nn.Module):
    """Attention with explicit per-head VO matrices, in place of a block's
    nn.MultiheadAttention (SITH's MultiheadAttentionWithOV semantics).

    It reads the (optionally LN-folded, centered) residual: install it together with a
    non-affine ln_1 when fold_ln=True (see `install`). `w_vo` (H, D, D) right form.
    """

    def __init__(self, block, w_vo: torch.Tensor | None = None, *, fold_ln: bool = True,
                 center: bool | None = None):
        super().__init__()
        center = fold_ln if center is None else center
        attn = block.attn
        self.H, self.hd, self.D = attn.num_heads, attn.head_dim, attn.embed_dim
        w_qkv, b_qkv, _, _ = folded_weights(block, fold_ln=fold_ln, center=center)
        w_default, bias = vo_matrices(block, fold_ln=fold_ln, center=center)
        self.register_buffer("w_q", w_qkv[:self.D])
        self.register_buffer("w_k", w_qkv[self.D:2 * self.D])
        self.register_buffer("b_q", b_qkv[:self.D])
        self.register_buffer("b_k", b_qkv[self.D:2 * self.D])
        self.register_buffer("w_vo", (w_default if w_vo is None else w_vo).clone())
        self.register_buffer("bias", bias)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None, **_):
        x = q_x  # (B, N, D), batch first
        B, N, _ = x.shape
        q = (x @ self.w_q.T + self.b_q).view(B, N, self.H, self.hd).transpose(1, 2)
        k = (x @ self.w_k.T + self.b_k).view(B, N, self.H, self.hd).transpose(1, 2)
        logits = q @ k.transpose(-2, -1) / self.hd ** 0.5  # (B, H, N, N)
        if attn_mask is not None:
            logits = logits + attn_mask
        attn = logits.softmax(dim=-1)
        out = torch.zeros_like(x)
        for h in range(self.H):
            out = out + attn[:, h] @ (x @ self.w_vo[h])
        return out + self.bias, None

    @staticmethod
    def install(block, w_vo: torch.Tensor | None = None, *, fold_ln: bool = True, center: bool | None = None):
        """Replace block.attn (and make ln_1 non-affine when folding) in place."""
        new = ExplicitVOAttention(block, w_vo, fold_ln=fold_ln, center=center)
        block.attn = new
        if fold_ln:
            ln = nn.LayerNorm(block.ln_1.normalized_shape, eps=block.ln_1.eps, elementwise_affine=False)
            block.ln_1 = ln
        return new
