"""SITH fidelity (SPEC 1.6): how well a layer's sparse concept codes reconstruct its
singular vectors, per head and overall (`fidelity`, `fidelity_from_file`)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..vit import vit_info, vit_view
from .decomposition import load_decomposition, parse_decomposition_filename
from .vo import _block, _check_image_mean, _check_sv_type, _factored_svd, _factors, _resolve_center, prepare_dictionary

__all__ = ["fidelity", "fidelity_from_file"]


def _summary(c: torch.Tensor) -> dict:
    return {"mean": float(c.mean()), "std": float(c.std()) if c.numel() > 1 else 0.0,
            "min": float(c.min()), "max": float(c.max())}


def fidelity(model, layer: int, scores: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor, *,
             sv_type: str = "right", fold_ln: bool = True, center: bool | None = None,
             image_mean: torch.Tensor | None = None) -> dict:
    """How well the sparse codes reconstruct the singular vectors (SPEC 1.6).

    y = normalize(decode(codes)); with an image mean y = normalize(y + image_mean);
    y = normalize(y @ pinv(proj)); fidelity = cos(y, v) for each singular vector v.

    Args:
        scores, indices: (H, r, K) from `decompose`.
        dictionary: (M, d) the PREPARED atoms used for the decomposition (unit rows).

    Returns:
        {"cos": (H, r) tensor, "heads": [{"head", "mean", "std", "min", "max"}] (std unbiased),
         "overall": {"mean", "std", "min", "max"}}
    """
    from ..sparse import decode

    _check_sv_type(sv_type)
    visual, block, layer = _block(model, layer, open_clip_only=True)  # inverts open_clip's proj
    info = vit_info(model)
    vit_view(model).require("SITH's fidelity (the inverse of the joint-space projection)", linear_readout=True)
    if scores.ndim != 3 or scores.shape != indices.shape:
        raise ValueError(f"scores and indices must both be (H, rank, K), got {tuple(scores.shape)} and "
                         f"{tuple(indices.shape)}")
    H, r, K = scores.shape
    if H != info.heads:
        raise ValueError(f"the codes have {H} heads but layer {layer} has {info.heads}; wrong model or file")
    if r > info.head_dim:
        raise ValueError(f"the codes have rank {r} > head dim {info.head_dim}; wrong model or file")
    if dictionary.shape[1] != info.output_dim:
        raise ValueError(f"dictionary dimension {dictionary.shape[1]} != joint dimension {info.output_dim}")
    image_mean = _check_image_mean(image_mean, info.output_dim)
    svd = _factored_svd(_factors(block, fold_ln, _resolve_center(fold_ln, center)))
    x = (svd.u[..., :r].transpose(1, 2) if sv_type == "left" else svd.vh[:, :r, :]).float()  # (H, r, D)
    dev = dictionary.device
    y = decode(scores.reshape(H * r, K).float().to(dev), indices.reshape(H * r, K).to(dev), dictionary.float())
    y = F.normalize(y, dim=-1)
    if image_mean is not None:
        y = F.normalize(y + image_mean.to(y), dim=-1)
    proj = visual.proj.detach().float() if visual.proj is not None else torch.eye(info.width)
    inv_proj = torch.linalg.pinv(proj.to(torch.float64)).float().to(y.device)  # (d, D)
    y = F.normalize(y @ inv_proj, dim=-1)
    cos = F.cosine_similarity(y.cpu(), x.reshape(H * r, -1).cpu(), dim=-1).reshape(H, r)
    heads = [{"head": h, **_summary(cos[h])} for h in range(H)]
    return {"cos": cos, "heads": heads, "overall": _summary(cos.reshape(-1))}


def fidelity_from_file(model, path: str | os.PathLike, dictionary_embeddings: torch.Tensor, *,
                       image_mean: torch.Tensor | None = None, dictionary_mode: str = "center") -> dict:
    """`fidelity` for a saved decomposition; layer, sv type and fold-ln come from its name."""
    info = parse_decomposition_filename(path)
    data = load_decomposition(path)
    g = prepare_dictionary(dictionary_embeddings, dictionary_mode)
    if int(data["indices"].max()) >= g.shape[0]:
        raise ValueError(f"{Path(path).name}: atom indices reach {int(data['indices'].max())} but the "
                         f"dictionary has {g.shape[0]} atoms; pass the dictionary the file was made with")
    out = fidelity(model, info["layer"], data["scores"], data["indices"], g, sv_type=info["sv_type"],
                   fold_ln=info["fold_ln"], image_mean=image_mean)
    out.update(file=str(path), **{k: v for k, v in info.items()})
    return out
