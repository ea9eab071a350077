"""SITH's view of a block's weights: VO matrices, their SVD, the joint-space projection.

`vo_matrices` (SPEC 1.1) and `vo_svd` / `singular_vectors` (1.2) read a block's value and
output weights (LN-folded and centered if asked); `project`, `image_mean` (1.3) map residual
directions into CLIP's joint space; `prepare_dictionary` (1.4) makes unit concept atoms.
The private checks here (`_block`, `_check_sv_type`, ...) are shared by the other SITH files.

Speed: the SVD of each rank-hd product W_v^T W_o^T is computed from thin QR factors of the
two (D, hd) factors and an (hd, hd) SVD (O(D hd^2) instead of a dense D x D SVD).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..concepts import center_embeddings
from ..io import save_tensor_checked
from ..vit import as_block_view, check_blocks, check_layers, vision_transformer, vit_view

__all__ = ["SV_TYPES", "image_mean", "prepare_dictionary", "project", "singular_vectors", "vo_matrices", "vo_svd"]

SV_TYPES = ("left", "right")
"""'right': rows of Vh, what a head writes (default); 'left': columns of U, what it reads."""


# --------------------------------------------------------------------------------------
# checks (shared by the SITH files)
# --------------------------------------------------------------------------------------
def _check_sv_type(sv_type) -> str:
    if sv_type not in SV_TYPES:
        raise ValueError(f"sv_type={sv_type!r} is not valid; use 'right' (what a head writes, the default) "
                         f"or 'left' (what a head reads)")
    return sv_type


def _resolve_center(fold_ln: bool, center: bool | None) -> bool:
    return bool(fold_ln) if center is None else bool(center)


def _block(model, layer: int, *, open_clip_only: bool = False):
    """(visual, block, layer >= 0) for a supported block: an open_clip ViT block
    (`vit.check_blocks`) or, unless `open_clip_only` (weight edits, fidelity), the
    `vit.BlockView` of a timm tower's block (fused qkv, proj; q/k-normed, gated or rotary
    attention is refused by `vit_view`); a LayerScale on the attention output is folded into
    the output side (`_factors`)."""
    view = vit_view(model) if not open_clip_only else None
    if view is not None and view.family != "open_clip ViT":
        (layer,) = check_layers(model, [layer])
        return view.visual, view.blocks[layer], layer
    visual = vision_transformer(model)
    (layer,) = check_layers(model, [layer])
    check_blocks(visual, "SITH's VO analysis")
    return visual, visual.transformer.resblocks[layer], layer


def _check_finite(t: torch.Tensor, what: str, fix: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf; {fix}")


# --------------------------------------------------------------------------------------
# 1.1 VO matrices
# --------------------------------------------------------------------------------------
@dataclass
class _Factors:
    """A block's value/output weights in the analysis basis (float64).

    w_v (H, hd, D): value rows reading the (LN-folded, centered) input; w_o (H, D, hd):
    output columns (centered if center); raw_w_v (H, hd, D), raw_b_v (H, hd): the module's
    own value weights; beta (D,) ln_1 bias (zeros when not folded).
    """

    w_v: torch.Tensor
    w_o: torch.Tensor
    raw_w_v: torch.Tensor
    raw_b_v: torch.Tensor
    beta: torch.Tensor
    bias: torch.Tensor  # (D,) b_o + sum_h W_o_h b_v_h in the analysis basis


def _factors(block, fold_ln: bool, center: bool) -> _Factors:
    bv = as_block_view(block)  # an open_clip block or a timm block's view: the same fused q/k/v rows
    H, hd, D = bv.heads, bv.head_dim, bv.out_weight.shape[0]
    f64 = torch.float64
    w_in = bv.qkv_weight.detach().to(f64)
    b_in = bv.qkv_bias.detach().to(f64) if bv.qkv_bias is not None else torch.zeros(3 * H * hd, dtype=f64,
                                                                                  device=w_in.device)
    raw_w_v, raw_b_v = w_in[2 * H * hd:], b_in[2 * H * hd:]
    w_v, b_v = raw_w_v, raw_b_v
    beta = torch.zeros(D, dtype=f64, device=w_in.device)
    if fold_ln:
        ln = bv.norm
        if not isinstance(ln, torch.nn.LayerNorm):
            raise TypeError(f"fold_ln needs block.ln_1 to be a LayerNorm, got {type(ln).__name__}")
        if ln.bias is not None:
            beta = ln.bias.detach().to(f64)
            b_v = b_v + w_v @ beta
        if ln.weight is not None:
            w_v = w_v * ln.weight.detach().to(f64)
    if center:
        w_v = w_v - w_v.mean(dim=1, keepdim=True)
    w_o = bv.out_weight.detach().to(f64)
    b_o = (bv.out_bias.detach().to(f64) if bv.out_bias is not None
           else torch.zeros(D, dtype=f64, device=w_in.device))
    gamma = bv.layer_scale  # LayerScale: folded into the output side
    if gamma is not None:
        w_o = gamma.detach().to(f64)[:, None] * w_o
        b_o = gamma.detach().to(f64) * b_o
    if center:
        w_o = w_o - w_o.mean(dim=0, keepdim=True)
    bias = b_o + w_o @ b_v
    _check_finite(w_v, "the value weights", "the model's weights are broken (check the checkpoint)")
    _check_finite(w_o, "the output weights", "the model's weights are broken (check the checkpoint)")
    return _Factors(
        w_v=w_v.reshape(H, hd, D),
        w_o=w_o.reshape(D, H, hd).permute(1, 0, 2),
        raw_w_v=raw_w_v.reshape(H, hd, D),
        raw_b_v=raw_b_v.reshape(H, hd),
        beta=beta,
        bias=bias,
    )


def vo_matrices(model, layer: int, *, fold_ln: bool = True, center: bool | None = None,
                return_bias: bool = False):
    """Per-head VO matrices of a ViT block, right-multiplication form (SPEC 1.1).

    A token row x (the LN-normalised residual when fold_ln, else ln_1's output) contributes
    `x @ W[h]` to the block's attention output (before attention averaging; value biases
    are pushed through W_o and are not part of W).

    Args:
        model: open_clip CLIP (or its VisionTransformer).
        layer: block index (negative counts from the end).
        fold_ln: fold ln_1's affine into the value weights.
        center: remove the all-ones direction from reading rows and writing columns
            (default: equal to fold_ln, as the reference).

    Returns:
        (H, D, D) tensor in the weights' dtype on the model's device; with return_bias, also
        the (D,) constant the attention adds to every token: b_o + W_o b_v (the value bias
        pushed through W_o, exact because attention rows sum to 1).
    """
    _, block, _ = _block(model, layer)
    f = _factors(block, fold_ln, _resolve_center(fold_ln, center))
    dtype = as_block_view(block).qkv_weight.dtype
    w = (f.w_v.transpose(1, 2) @ f.w_o.transpose(1, 2)).to(dtype)  # (H, D_in, D_out)
    return (w, f.bias.to(dtype)) if return_bias else w


@dataclass
class _FactoredSVD:
    """Thin SVD of A_h B_h (A = w_v^T (D, hd), B = w_o^T (hd, D)) in float64, all hd
    singular triplets, with the small-problem pieces kept for edits."""

    u: torch.Tensor  # (H, D, hd)
    s: torch.Tensor  # (H, hd)
    vh: torch.Tensor  # (H, hd, D)
    ra: torch.Tensor  # (H, hd, hd) A = Qa Ra
    rb: torch.Tensor  # (H, hd, hd) B^T = Qb Rb
    um: torch.Tensor  # (H, hd, hd) small-problem U (signs fixed)
    vmh: torch.Tensor  # (H, hd, hd) small-problem Vh (signs fixed)


def _factored_svd(f: _Factors) -> _FactoredSVD:
    a = f.w_v.transpose(1, 2)  # (H, D, hd)
    bt = f.w_o  # (H, D, hd) = B^T
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(bt)
    small = ra @ rb.transpose(1, 2)  # (H, hd, hd)
    um, s, vmh = torch.linalg.svd(small)
    u = qa @ um
    vh = vmh @ qb.transpose(1, 2)
    # sign convention (SPEC 1.2) decided on the full U; apply the same flips to the small factors
    where = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, where))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # (H, 1, hd)
    return _FactoredSVD(u * signs, s, vh * signs.transpose(1, 2), ra, rb, um * signs, vmh * signs.transpose(1, 2))


def _check_rank(rank, hd: int, *, stacklevel: int = 3) -> int:
    """rank, or hd for None; above hd it is clipped with a RuntimeWarning (at `stacklevel`)."""
    if rank is None:
        return hd
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > hd:
        warnings.warn(f"rank={rank} exceeds the head dim {hd}: a VO matrix has rank <= {hd}, so only {hd} "
                      f"singular vectors carry information; using rank={hd}", RuntimeWarning, stacklevel=stacklevel)
        return hd
    return rank


def vo_svd(model, layer: int, *, rank: int | None = None, fold_ln: bool = True, center: bool | None = None):
    """SVD of every head's VO matrix with SITH's sign convention (SPEC 1.2).

    Each U column's largest-magnitude entry is positive (the Vh row is flipped with it).

    Returns:
        U (H, D, r), S (H, r), Vh (H, r, D), float32, r = min(rank, hd) (default hd).
    """
    _, block, _ = _block(model, layer)
    bv = as_block_view(block)
    r = _check_rank(rank, bv.head_dim)
    svd = _factored_svd(_factors(bv, fold_ln, _resolve_center(fold_ln, center)))
    dtype = bv.qkv_weight.dtype
    return svd.u[..., :r].to(dtype), svd.s[..., :r].to(dtype), svd.vh[..., :r, :].to(dtype)


def singular_vectors(model, layer: int, *, sv_type: str = "right", rank: int | None = None,
                     fold_ln: bool = True, center: bool | None = None) -> torch.Tensor:
    """(H, r, D): rows of Vh ('right') or columns of U as rows ('left')."""
    _check_sv_type(sv_type)
    u, _, vh = vo_svd(model, layer, rank=rank, fold_ln=fold_ln, center=center)
    return u.transpose(1, 2).contiguous() if sv_type == "left" else vh


# --------------------------------------------------------------------------------------
# 1.3 joint space
# --------------------------------------------------------------------------------------
def _check_image_mean(image_mean, d: int):
    if image_mean is None:
        return None
    if not isinstance(image_mean, torch.Tensor):
        raise TypeError(f"image_mean must be a tensor of shape ({d},), got {type(image_mean).__name__}")
    image_mean = image_mean.reshape(-1) if image_mean.ndim == 2 and image_mean.shape[0] == 1 else image_mean
    if image_mean.shape != (d,):
        raise ValueError(f"image_mean has shape {tuple(image_mean.shape)} but the model's joint space has "
                         f"dimension {d}; compute it with fastinterp.sith.image_mean for this model")
    _check_finite(image_mean, "image_mean", "recompute it")
    return image_mean


def project(model, vectors: torch.Tensor, *, image_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Residual-space vectors (..., D) -> unit joint-space vectors (..., d) (SPEC 1.3).

    z = normalize(proj(ln_post(v))) (timm towers: their norm, fc_norm and linear head,
    `ViTView.read_pooled`); with an image mean, z = normalize(z - image_mean). Refused where
    the readout after pooling is not a norm and a linear map (CoCa's pooler, SigLIP's MAP
    head, a norm per token before an average pool, an MLP projection).
    """
    view = vit_view(model).require("SITH's projection to the joint space", linear_readout=True)
    info = view.info
    if vectors.shape[-1] != info.width:
        raise ValueError(f"vectors have dimension {vectors.shape[-1]}, the ViT width is {info.width}")
    image_mean = _check_image_mean(image_mean, info.output_dim)
    with torch.no_grad():
        z = F.normalize(view.read_pooled(vectors).float(), dim=-1)
        if image_mean is not None:
            z = F.normalize(z - image_mean.to(z), dim=-1)
    return z


@torch.no_grad()
def image_mean(model, preprocess, images, *, batch_size: int = 64, device=None, progress: bool = True,
               save_to: str | os.PathLike | None = None) -> torch.Tensor:
    """Mean of L2-normalised image embeddings (SPEC 1.3: the modality-gap correction).

    Args:
        images: a folder (searched recursively, labels ignored), or a list of PIL images
            and/or image paths.
        save_to: optional .pt path to write the (d,) mean to (SITH's `image_mean.pt`).

    Returns:
        (d,) float32 on CPU.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..images import list_image_folder, load_images

    if isinstance(images, (str, os.PathLike)):
        listing = list_image_folder(images, labelled=False)
        items: list = [p for p, _ in listing.items]
    else:
        items = list(images)
        if not items:
            raise ValueError("no images given; pass a folder or a non-empty list of images / paths")
    if device is None:
        device = next(model.parameters()).device
    total, count = None, 0
    for start in tqdm(range(0, len(items), batch_size), desc="image mean", unit="batch", disable=not progress):
        chunk = items[start:start + batch_size]
        paths = [p for p in chunk if not isinstance(p, Image.Image)]
        loaded = dict(load_images(paths)) if paths else {}
        ims = []
        for p in chunk:
            if isinstance(p, Image.Image):
                ims.append(p.convert("RGB"))
            elif Path(p) in loaded:
                ims.append(loaded[Path(p)])
        if not ims:
            continue
        batch = torch.stack([preprocess(im) for im in ims]).to(device)
        emb = F.normalize(model.encode_image(batch).float(), dim=-1).cpu()
        total = emb.sum(0) if total is None else total + emb.sum(0)
        count += emb.shape[0]
    if count == 0:
        raise ValueError("none of the given images could be read")
    mean = total / count
    if save_to is not None:
        save_tensor_checked(mean, save_to)  # SITH's bare-tensor file, its checksum in image_mean.pt.sha256
    return mean


# --------------------------------------------------------------------------------------
# 1.4 dictionaries
# --------------------------------------------------------------------------------------
def prepare_dictionary(embeddings: torch.Tensor, mode: str = "center") -> torch.Tensor:
    """Raw text embeddings (M, d) -> unit atoms (M, d).

    mode: "center" (SITH: normalise, subtract the mean atom, renormalise), "normalize"
    (the classification experiment), or "none" (already prepared; must have unit rows).
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"dictionary embeddings must be a non-empty (M, d) tensor, got "
                         f"{getattr(embeddings, 'shape', type(embeddings).__name__)}")
    _check_finite(embeddings, "the dictionary embeddings", "re-encode the dictionary (a corrupt cache is rebuilt "
                                                           "by ConceptDictionary.encode)")
    if mode == "center":
        if embeddings.shape[0] < 2:
            raise ValueError("centering needs at least 2 atoms; use mode='normalize' for a single concept")
        return center_embeddings(embeddings)
    if mode == "normalize":
        if bool((embeddings.norm(dim=-1) == 0).any()):
            raise ValueError("a dictionary embedding is all zeros and cannot be normalised; drop it")
        return F.normalize(embeddings.float(), dim=-1)
    if mode == "none":
        return embeddings
    raise ValueError(f"dictionary mode {mode!r} is not valid; use 'center', 'normalize' or 'none'")
