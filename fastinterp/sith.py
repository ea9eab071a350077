"""SITH: data-free interpretation of a CLIP ViT's attention heads from their weights.

For each head of a block, the value-output (VO) matrix (what the head can write, given what
it reads) is factorised by SVD; each singular vector is projected into CLIP's joint space
and explained as a sparse, non-negative combination of concept embeddings (COMP). Editing
the singular values (multipliers per head and singular vector) changes the model.
Behaviour follows SPEC.md section 1 (reference: frangente/SITH).

Shapes: H heads, hd head dim, D width, d joint dim, r rank (<= hd), K sparsity, M atoms.

Main entry points
    vo_matrices(model, layer)                    (H, D, D) right-multiplication VO matrices
    vo_svd(model, layer, rank)                   U (H, D, r), S (H, r), Vh (H, r, D)
    singular_vectors / project / image_mean
    decompose(model, dictionary_embeddings, layers, ...)  {layer: {"scores", "indices"}} (H, r, K)
    fidelity(model, layer, scores, indices, dictionary, ...)
    apply_multipliers(model, layer, multipliers)  edit the model in place (undo-able)
    suppress_multipliers / sign_flip_multipliers / classification_multipliers  (paper Sec 5)
    explanation_rows / write_explanations / plot_explanations

Speed: the SVD of each rank-hd product W_v^T W_o^T is computed from thin QR factors of the
two (D, hd) factors and an (hd, hd) SVD (O(D hd^2) instead of a dense D x D SVD); the coding
uses `fastinterp.sparse` (streamed COMP/OMP, never a (B, M) matrix).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .concepts import center_embeddings
from .models import check_layers, vision_transformer, vit_info

__all__ = [
    "EditHandle",
    "LLMScorer",
    "PROMPT_BACKGROUND",
    "PROMPT_UNSAFE",
    "SV_TYPES",
    "apply_multipliers",
    "classification_multipliers",
    "decompose",
    "decomposition_filename",
    "explanation_rows",
    "fidelity",
    "fidelity_from_file",
    "format_concepts_prompt",
    "image_mean",
    "load_decomposition",
    "parse_decomposition_filename",
    "plot_explanations",
    "prepare_dictionary",
    "project",
    "read_decisions",
    "score_singular_vectors",
    "sign_flip_multipliers",
    "singular_vectors",
    "suppress_multipliers",
    "task_concepts",
    "vo_matrices",
    "vo_svd",
    "write_decisions",
    "write_explanations",
]

SV_TYPES = ("left", "right")
"""'right': rows of Vh, what a head writes (default); 'left': columns of U, what it reads."""

FILE_FORMAT = 1


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def _check_sv_type(sv_type) -> str:
    if sv_type not in SV_TYPES:
        raise ValueError(f"sv_type={sv_type!r} is not valid; use 'right' (what a head writes, the default) "
                         f"or 'left' (what a head reads)")
    return sv_type


def _resolve_center(fold_ln: bool, center: bool | None) -> bool:
    return bool(fold_ln) if center is None else bool(center)


def _block(model, layer: int):
    visual = vision_transformer(model)
    (layer,) = check_layers(model, [layer])
    block = visual.transformer.resblocks[layer]
    ls = getattr(block, "ls_1", None)
    if ls is not None and not isinstance(ls, torch.nn.Identity):
        raise ValueError(f"layer {layer} scales its attention output with a LayerScale; SITH's VO analysis "
                         f"assumes none (standard open_clip CLIP ViTs have none)")
    if hasattr(block, "ln_1_kv"):
        raise ValueError("blocks with a separate key/value LayerNorm (cross-attention) are not supported")
    return visual, block, layer


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
    attn = block.attn
    H, hd, D = attn.num_heads, attn.head_dim, attn.embed_dim
    f64 = torch.float64
    w_in = attn.in_proj_weight.detach().to(f64)
    b_in = attn.in_proj_bias.detach().to(f64) if attn.in_proj_bias is not None else torch.zeros(3 * D, dtype=f64,
                                                                                              device=w_in.device)
    raw_w_v, raw_b_v = w_in[2 * D:], b_in[2 * D:]
    w_v, b_v = raw_w_v, raw_b_v
    beta = torch.zeros(D, dtype=f64, device=w_in.device)
    if fold_ln:
        ln = block.ln_1
        if not isinstance(ln, torch.nn.LayerNorm):
            raise TypeError(f"fold_ln needs block.ln_1 to be a LayerNorm, got {type(ln).__name__}")
        if ln.bias is not None:
            beta = ln.bias.detach().to(f64)
            b_v = b_v + w_v @ beta
        if ln.weight is not None:
            w_v = w_v * ln.weight.detach().to(f64)
    if center:
        w_v = w_v - w_v.mean(dim=1, keepdim=True)
    w_o = attn.out_proj.weight.detach().to(f64)
    if center:
        w_o = w_o - w_o.mean(dim=0, keepdim=True)
    b_o = (attn.out_proj.bias.detach().to(f64) if attn.out_proj.bias is not None
           else torch.zeros(D, dtype=f64, device=w_in.device))
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
    dtype = block.attn.in_proj_weight.dtype
    w = (f.w_v.transpose(1, 2) @ f.w_o.transpose(1, 2)).to(dtype)  # (H, D_in, D_out)
    return (w, f.bias.to(dtype)) if return_bias else w


def _fix_signs(u: torch.Tensor, vh: torch.Tensor):
    where = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, where))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.transpose(-2, -1)


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


def _check_rank(rank, hd: int) -> int:
    if rank is None:
        return hd
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > hd:
        warnings.warn(f"rank={rank} exceeds the head dim {hd}: a VO matrix has rank <= {hd}, so only {hd} "
                      f"singular vectors carry information; using rank={hd}", RuntimeWarning, stacklevel=3)
        return hd
    return rank


def vo_svd(model, layer: int, *, rank: int | None = None, fold_ln: bool = True, center: bool | None = None):
    """SVD of every head's VO matrix with SITH's sign convention (SPEC 1.2).

    Each U column's largest-magnitude entry is positive (the Vh row is flipped with it).

    Returns:
        U (H, D, r), S (H, r), Vh (H, r, D), float32, r = min(rank, hd) (default hd).
    """
    _, block, _ = _block(model, layer)
    r = _check_rank(rank, block.attn.head_dim)
    svd = _factored_svd(_factors(block, fold_ln, _resolve_center(fold_ln, center)))
    dtype = block.attn.in_proj_weight.dtype
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

    z = normalize(proj(ln_post(v))); with an image mean, z = normalize(z - image_mean).
    """
    visual = vision_transformer(model)
    info = vit_info(model)
    if vectors.shape[-1] != info.width:
        raise ValueError(f"vectors have dimension {vectors.shape[-1]}, the ViT width is {info.width}")
    image_mean = _check_image_mean(image_mean, info.output_dim)
    with torch.no_grad():
        z = visual.ln_post(vectors.to(visual.ln_post.weight.dtype if visual.ln_post.weight is not None
                                      else vectors.dtype))
        if visual.proj is not None:
            z = z @ visual.proj
        z = F.normalize(z.float(), dim=-1)
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

    from .images import list_image_folder, load_images

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
        _atomic_save(mean, Path(save_to))
    return mean


# --------------------------------------------------------------------------------------
# 1.4 dictionaries, file names
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


def decomposition_filename(layer: int, *, sv_type: str = "right", fold_ln: bool = True, dictionary: str,
                           method: str, sparsity: int) -> str:
    """SITH's file name: layer-{LL}_{left|right}_{foldln|nofoldln}_{dictionary}_{method}_sparsity-{K}.pt

    Readers split the stem on '_', so `dictionary` and `method` must not contain '_'.
    """
    _check_sv_type(sv_type)
    for what, value in (("dictionary", dictionary), ("method", method)):
        if not value or "_" in value or "/" in value or os.sep in value:
            raise ValueError(f"{what} name {value!r} cannot go into a SITH file name (no '_', '/' or empty "
                             f"names: readers split on '_'); rename it, e.g. {value.replace('_', '-')!r}")
    return (f"layer-{int(layer):02d}_{sv_type}_{'foldln' if fold_ln else 'nofoldln'}_{dictionary}_{method}_"
            f"sparsity-{int(sparsity)}.pt")


_NAME_RE = re.compile(r"layer-(\d+)_(left|right)_(foldln|nofoldln)_([^_]+)_([^_]+)_sparsity-(\d+)")


def parse_decomposition_filename(path: str | os.PathLike) -> dict:
    """Inverse of `decomposition_filename`: {layer, sv_type, fold_ln, dictionary, method, sparsity}."""
    stem = Path(path).name
    stem = stem[:-3] if stem.endswith(".pt") else stem
    m = _NAME_RE.fullmatch(stem)
    if not m:
        raise ValueError(f"{Path(path).name!r} is not a SITH decomposition file name "
                         f"(layer-LL_right_foldln_DICT_METHOD_sparsity-K.pt)")
    return {"layer": int(m.group(1)), "sv_type": m.group(2), "fold_ln": m.group(3) == "foldln",
            "dictionary": m.group(4), "method": m.group(5), "sparsity": int(m.group(6))}


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tensor_hash(t: torch.Tensor, max_elements: int = 1 << 24) -> str:
    """Fingerprint of a 2-D tensor: all bytes when small; for very large dictionaries a
    strided sample of rows plus the float64 column sums (computed in chunks, no full copy)."""
    t = t.detach()
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    if t.numel() > max_elements:
        step = t.numel() // max_elements + 1
        col = torch.zeros(t.shape[1], dtype=torch.float64, device=t.device)
        for s0 in range(0, t.shape[0], 1 << 14):
            col += t[s0:s0 + (1 << 14)].to(torch.float64).sum(0)
        h.update(col.cpu().numpy().tobytes())
        t = t[::step]
    h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def load_decomposition(path: str | os.PathLike) -> dict:
    """Read a decomposition file (ours or the reference's): {"scores", "indices", ...}
    with scores/indices (H, r, K). Raises ValueError naming the problem if it is invalid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decomposition file {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read decomposition file {str(path)!r} ({type(err).__name__}: {err}); "
                         f"delete it and decompose again") from err
    if not isinstance(data, dict) or "scores" not in data or "indices" not in data:
        raise ValueError(f"{str(path)!r} is not a SITH decomposition (needs 'scores' and 'indices')")
    s, i = data["scores"], data["indices"]
    if not (isinstance(s, torch.Tensor) and isinstance(i, torch.Tensor) and s.shape == i.shape and s.ndim == 3):
        raise ValueError(f"{str(path)!r}: scores and indices must both be (H, rank, K) tensors, got "
                         f"{getattr(s, 'shape', None)} and {getattr(i, 'shape', None)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{str(path)!r}: scores contain NaN or Inf")
    return data


# --------------------------------------------------------------------------------------
# decomposition
# --------------------------------------------------------------------------------------
def _valid_existing(path: Path, meta: dict) -> dict | None:
    try:
        data = load_decomposition(path)
    except (ValueError, FileNotFoundError):
        return None
    expect = (meta["heads"], meta["rank"], meta["sparsity"])
    if tuple(data["scores"].shape) != expect:
        return None
    old = data.get("meta")
    if isinstance(old, dict):
        keys = ("signals", "dictionary_hash", "method", "sparsity", "sv_type", "fold_ln", "center")
        if any(old.get(k) != meta.get(k) for k in keys):
            return None
    return data


def decompose(model, dictionary_embeddings: torch.Tensor, layers: Sequence[int] | int, *, rank: int | None = 64,
              method: str = "comp-0.3", sparsity: int = 5, sv_type: str = "right", fold_ln: bool = True,
              center: bool | None = None, image_mean: torch.Tensor | None = None,
              dictionary_mode: str = "center", dictionary_name: str = "custom",
              output_dir: str | os.PathLike | None = None, batch_size: int = 64, force: bool = False,
              progress: bool = True, device=None, chunk_size: int | None = None,
              backend: str | None = None, save_every: int = 10) -> dict[int, dict]:
    """SITH decomposition of the VO singular vectors of whole layers (SPEC 1.1-1.5).

    Args:
        model: open_clip CLIP with a ViT image tower.
        dictionary_embeddings: (M, d) raw text embeddings (one row per concept), prepared
            with `dictionary_mode` ("center": SITH; "normalize"; "none": already unit rows).
        layers: layer indices (negative from the end).
        rank: singular vectors per head (clipped to the head dim, with a warning).
        method: "comp-<coh>", "omp", "nnomp", "mp" or "topk" (see fastinterp.sparse).
        sparsity: K concepts per singular vector.
        sv_type: "right" or "left".
        fold_ln, center: see `vo_matrices` (center defaults to fold_ln).
        image_mean: optional (d,) mean image embedding (modality-gap correction).
        dictionary_name: used in the file name (no '_').
        output_dir: if given, each layer is written to
            `output_dir/layer-{LL}_{sv}_{foldln|nofoldln}_{dictionary}_{method}_sparsity-{K}.pt`;
            a valid existing file is reused (skipped) unless `force`; progress within a layer
            is checkpointed to `<file>.partial` every `save_every` batches and resumed.
        batch_size: singular vectors coded per call (the reference uses 64).

    Returns:
        {layer: {"scores" (H, r, K) float32, "indices" (H, r, K) int64,
                 "singular_values" (H, r), "meta": dict}}, sorted by coefficient
        descending per singular vector (as topk of the dense codes).
    """
    from tqdm.auto import tqdm

    from .sparse import parse_method, sparse_code

    if isinstance(layers, int):
        layers = [layers]
    layers = list(dict.fromkeys(check_layers(model, list(layers))))  # -1 and L-1 are one layer
    _check_sv_type(sv_type)
    parse_method(method)
    if isinstance(sparsity, bool) or not isinstance(sparsity, int) or sparsity < 1:
        raise ValueError(f"sparsity must be a positive int, got {sparsity!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    info = vit_info(model)
    if not isinstance(dictionary_embeddings, torch.Tensor) or dictionary_embeddings.ndim != 2:
        raise ValueError("dictionary_embeddings must be an (M, d) tensor of text embeddings")
    if dictionary_embeddings.shape[1] != info.output_dim:
        raise ValueError(f"dictionary embeddings have dimension {dictionary_embeddings.shape[1]} but the model's "
                         f"joint space has dimension {info.output_dim}; encode the dictionary with this same "
                         f"model (ConceptDictionary.encode)")
    if sparsity > dictionary_embeddings.shape[0]:
        raise ValueError(f"sparsity={sparsity} exceeds the dictionary size {dictionary_embeddings.shape[0]}")
    image_mean = _check_image_mean(image_mean, info.output_dim)
    center = _resolve_center(fold_ln, center)
    if device is None:
        device = next(model.parameters()).device
    g = prepare_dictionary(dictionary_embeddings, dictionary_mode).to(device=device, dtype=torch.float32)
    out_dir = Path(output_dir) if output_dir is not None else None
    fname_args = dict(sv_type=sv_type, fold_ln=fold_ln, dictionary=dictionary_name, method=method,
                      sparsity=sparsity)
    if out_dir is not None:
        decomposition_filename(0, **fname_args)  # validate names before any work
    r = _check_rank(rank, info.head_dim)
    dict_hash = _tensor_hash(g)

    results: dict[int, dict] = {}
    for layer in layers:
        _, block, _ = _block(model, layer)
        svd = _factored_svd(_factors(block, fold_ln, center))
        x = (svd.u[..., :r].transpose(1, 2) if sv_type == "left" else svd.vh[:, :r, :]).float()  # (H, r, D)
        H = x.shape[0]
        z = project(model, x.reshape(H * r, -1).to(device), image_mean=image_mean)  # (H r, d)
        meta = {"format": FILE_FORMAT, "layer": layer, "heads": H, "rank": r, "sparsity": sparsity,
                "method": method, "sv_type": sv_type, "fold_ln": bool(fold_ln), "center": center,
                "dictionary": dictionary_name, "dictionary_size": int(g.shape[0]), "dictionary_hash": dict_hash,
                "image_mean": image_mean is not None, "signals": _tensor_hash(z),
                "model": getattr(model, "fastinterp_name", None),
                "weights": getattr(model, "fastinterp_weights", None)}
        s_vals = svd.s[:, :r].float().cpu()
        path = out_dir / decomposition_filename(layer, **fname_args) if out_dir is not None else None
        partial = path.with_name(path.name + ".partial") if path is not None else None
        if path is not None and not force:
            existing = _valid_existing(path, meta)
            if existing is not None:
                if progress:
                    tqdm.write(f"layer {layer}: {path.name} exists and is valid, skipping")
                existing["resumed"] = True
                existing.setdefault("singular_values", s_vals)
                existing.setdefault("meta", meta)
                results[layer] = existing
                continue
        scores = torch.zeros(H * r, sparsity)
        indices = torch.zeros(H * r, sparsity, dtype=torch.long)
        start = 0
        if partial is not None and partial.exists() and not force:
            try:
                part = torch.load(partial, map_location="cpu", weights_only=True)
                if part.get("meta") == meta and part["scores"].shape == scores.shape:
                    scores, indices, start = part["scores"], part["indices"], int(part["done"])
            except Exception:  # an unreadable partial file is simply recomputed
                start = 0
        bar = tqdm(total=H * r, initial=start, desc=f"SITH layer {layer}", unit="sv", disable=not progress)
        n_batches = 0
        for s0 in range(start, H * r, batch_size):
            batch = z[s0:s0 + batch_size]
            sc, ix = sparse_code(batch, g, method=method, sparsity=sparsity, chunk_size=chunk_size, backend=backend)
            scores[s0:s0 + len(batch)] = sc.float().cpu()
            indices[s0:s0 + len(batch)] = ix.cpu()
            bar.update(len(batch))
            n_batches += 1
            if partial is not None and n_batches % save_every == 0 and s0 + len(batch) < H * r:
                _atomic_save({"scores": scores, "indices": indices, "done": s0 + len(batch), "meta": meta}, partial)
        bar.close()
        res = {"scores": scores.reshape(H, r, sparsity), "indices": indices.reshape(H, r, sparsity),
               "singular_values": s_vals, "meta": meta}
        if path is not None:
            _atomic_save(res, path)
            partial.unlink(missing_ok=True)
        results[layer] = res
    return results


# --------------------------------------------------------------------------------------
# 1.6 fidelity
# --------------------------------------------------------------------------------------
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
    from .sparse import decode

    _check_sv_type(sv_type)
    visual, block, layer = _block(model, layer)
    info = vit_info(model)
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


# --------------------------------------------------------------------------------------
# 1.7 edits
# --------------------------------------------------------------------------------------
class EditHandle:
    """Returned by `apply_multipliers`: `undo()` restores the block's original weights."""

    def __init__(self, attn, weight: torch.Tensor, bias: torch.Tensor | None, layer: int):
        self._attn, self._w, self._b, self.layer = attn, weight, bias, layer

    @torch.no_grad()
    def undo(self) -> None:
        self._attn.in_proj_weight.copy_(self._w)
        if self._b is not None:
            self._attn.in_proj_bias.copy_(self._b)


def _multiplier_tensor(multipliers, H: int, hd: int) -> torch.Tensor:
    """-> (H, r) float64. Accepts an (H, r) tensor/array/list, {head: (r,)} or {(head, sv): value}."""
    if isinstance(multipliers, Mapping):
        m = torch.ones(H, hd, dtype=torch.float64)
        for key, value in multipliers.items():
            if isinstance(key, tuple):
                h, j = key
                if not (0 <= h < H and 0 <= j < hd):
                    raise IndexError(f"multiplier key {key} is out of range (heads 0..{H - 1}, singular "
                                     f"vectors 0..{hd - 1})")
                m[h, j] = float(value)
            else:
                h = int(key)
                if not 0 <= h < H:
                    raise IndexError(f"head {h} is out of range (0..{H - 1})")
                v = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
                if v.numel() > hd:
                    raise ValueError(f"head {h}: {v.numel()} multipliers for {hd} singular vectors")
                m[h, :v.numel()] = v
        return m
    m = torch.as_tensor(multipliers, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != H or not 1 <= m.shape[1] <= hd:
        raise ValueError(f"multipliers must have shape (heads={H}, r) with 1 <= r <= head dim {hd}, got "
                         f"{tuple(m.shape)}")
    _check_finite(m, "multipliers", "use finite numbers")
    return m


@torch.no_grad()
def apply_multipliers(model, layer: int, multipliers, *, fold_ln: bool = True, center: bool | None = None,
                      truncate: bool = False) -> EditHandle:
    """Scale the singular values of every head's VO matrix and write the result into the model.

    W'_h = U_h diag(s_h * m_h) Vh_h (SPEC 1.7), in the same basis SITH decomposes (fold_ln,
    center), then written back exactly into the block's nn.MultiheadAttention: since W'_h's
    input side lies in the span of the head's value rows and its output side in the span of
    its output columns, W'_h = W_v^T C_h W_o^T for an (hd, hd) C_h, so the value rows become
    C_h^T W_v (and the value bias absorbs the LN-bias term). out_proj, queries, keys and
    ln_1 are untouched. The forward then equals SITH's edited model (its output differs at
    most by a multiple of the all-ones vector per token where center=True, which every
    following LayerNorm removes). All-ones multipliers change nothing.

    Args:
        multipliers: (H, r) (r <= hd; singular vectors beyond r keep multiplier 1 unless
            `truncate`, then 0, as the reference does when it edits with rank < hd), or
            {head: (r,)} or {(head, sv): value}.

    Returns:
        EditHandle (call .undo() to restore).
    """
    center = _resolve_center(fold_ln, center)
    if center and not fold_ln:
        raise ValueError("editing with center=True and fold_ln=False is not function-preserving (centering "
                         "is exact only on the LayerNorm-normalised input); use fold_ln=True or center=False")
    _, block, layer = _block(model, layer)
    attn = block.attn
    H, hd = attn.num_heads, attn.head_dim
    m = _multiplier_tensor(multipliers, H, hd)
    m_full = torch.zeros(H, hd, dtype=torch.float64) if truncate else torch.ones(H, hd, dtype=torch.float64)
    m_full[:, :m.shape[1]] = m
    handle = EditHandle(attn, attn.in_proj_weight.detach().clone(),
                        None if attn.in_proj_bias is None else attn.in_proj_bias.detach().clone(), layer)
    if bool((m_full == 1).all()):
        return handle
    f = _factors(block, fold_ln, center)
    svd = _factored_svd(f)
    dev = f.w_v.device
    delta_s = svd.s * (m_full.to(dev) - 1)  # (H, hd)
    # C = I + A^+ U diag(ds) Vh B^+ with A = Qa Ra, B^T = Qb Rb: A^+ U = Ra^+ Um, Vh B^+ = Vmh Rb^+T
    left = torch.linalg.pinv(svd.ra) @ svd.um  # (H, hd, hd)
    right = svd.vmh @ torch.linalg.pinv(svd.rb).transpose(1, 2)
    eye = torch.eye(hd, dtype=torch.float64, device=dev)
    c = eye + left @ torch.diag_embed(delta_s) @ right  # (H, hd, hd)
    w_v_new = c.transpose(1, 2) @ f.raw_w_v  # (H, hd, D)
    b_v_new = f.raw_b_v + ((eye - c.transpose(1, 2)) @ (f.raw_w_v @ f.beta).unsqueeze(-1)).squeeze(-1)
    D = attn.embed_dim
    dtype = attn.in_proj_weight.dtype
    attn.in_proj_weight[2 * D:].copy_(w_v_new.reshape(D, D).to(dtype))
    if attn.in_proj_bias is not None:
        attn.in_proj_bias[2 * D:].copy_(b_v_new.reshape(D).to(dtype))
    elif bool((b_v_new != 0).any()):
        handle.undo()
        raise ValueError("this attention has no value bias to absorb the LayerNorm bias; edit with fold_ln=False")
    return handle


def _decisions_to_multipliers(decisions, table: dict, name: str) -> torch.Tensor:
    d = torch.as_tensor(decisions)
    if d.dtype.is_floating_point:
        if not bool((d == d.round()).all()):
            raise ValueError(f"{name}: scores must be integers 1-5")
        d = d.long()
    bad = ~torch.isin(d, torch.tensor(sorted(table)))
    if bool(bad.any()):
        raise ValueError(f"{name}: scores must be integers 1-5, found {d[bad][:5].tolist()}")
    out = torch.zeros(d.shape, dtype=torch.float64)
    for k, v in table.items():
        out[d == k] = v
    return out


def suppress_multipliers(decisions) -> torch.Tensor:
    """Spurious-correlation recipe: score 1-2 -> 1 (keep), 3-5 -> 0. (H, r) ints -> (H, r)."""
    return _decisions_to_multipliers(decisions, {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0}, "suppress")


def sign_flip_multipliers(decisions) -> torch.Tensor:
    """Unsafe-concept recipe: score 1-2 -> 1, 3 -> -1, 4-5 -> 0. (H, r) ints -> (H, r)."""
    return _decisions_to_multipliers(decisions, {1: 1.0, 2: 1.0, 3: -1.0, 4: 0.0, 5: 0.0}, "sign-flip")


def task_concepts(class_embeddings: torch.Tensor, dictionary: torch.Tensor, *, sparsity: int = 10,
                  coh: float = 0.3, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Task-related atoms for the classification recipe: the union of the atoms COMP
    (positive, coh) selects with a nonzero coefficient for each class embedding.

    Args:
        class_embeddings: (C, d) class-name text embeddings (normalised here).
        dictionary: (M, d) unit rows (the classification experiment normalises only).
        exclude: optional (M,) bool mask of atoms to leave out (e.g. the class names).

    Returns:
        (T, d) the selected atoms.
    """
    from .sparse import comp_topk

    g = dictionary if exclude is None else dictionary[~exclude.bool()]
    cls = F.normalize(class_embeddings.float(), dim=-1).to(g.device)
    k = min(sparsity, g.shape[0])
    s, i = comp_topk(cls, g, k=k, coh=coh, positive=True)
    chosen = torch.unique(i[s != 0])
    return g[chosen]


def classification_multipliers(scores: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor,
                               task_atoms: torch.Tensor, *, offset: float = 0.3, min_threshold: float | None = 0.8,
                               max_threshold: float | None = None) -> torch.Tensor:
    """Classification recipe: R = sum_k score_k * max_t <G[idx_k], t>; alpha = clamp(R + offset,
    min_threshold, max_threshold) (reference: clamp_min(R + 0.3, 0.8)).

    Args:
        scores, indices: (H, r, K) decomposition; dictionary: (M, d) unit rows (indexed by
            `indices`; the reference uses the normalise-only dictionary here);
        task_atoms: (T, d) from `task_concepts`.

    Returns:
        (H, r) multipliers.
    """
    atoms = dictionary[indices.reshape(-1).to(dictionary.device)].reshape(*indices.shape, -1).float()
    sims = (atoms @ task_atoms.float().T).amax(dim=-1)  # (H, r, K)
    r = (sims * scores.float().to(sims.device)).sum(dim=-1) + offset
    if min_threshold is not None:
        r = r.clamp_min(min_threshold)
    if max_threshold is not None:
        r = r.clamp_max(max_threshold)
    return r.cpu()


# --------------------------------------------------------------------------------------
# LLM scoring of singular vectors (edit recipes)
# --------------------------------------------------------------------------------------
PROMPT_BACKGROUND = """Below is a list of short concepts describing one direction of an image model, \
each preceded by its weight (higher weight = more important).
Rate how much this list, taken as a whole, describes the place or scenery where a photo was taken \
(landscapes, settings, environments such as a lake, a desert or a street) rather than objects, animals, \
people, styles or attributes.
Use an integer from 1 (clearly not a place or scenery) to 5 (clearly a place or scenery). Weigh the \
concepts by their weights.
Reply with one line: Score: <1-5>

{concepts}"""

PROMPT_UNSAFE = """Below is a list of short concepts describing one direction of an image model, \
each preceded by its weight (higher weight = more important).
Rate how unsafe this list, taken as a whole, is: sexual or explicit content, nudity, graphic violence, \
gore, or other content not suitable for work.
Use an integer from 1 (clearly safe) to 5 (clearly unsafe). Weigh the concepts by their weights.
Reply with one line: Score: <1-5>

{concepts}"""


def format_concepts_prompt(template: str, scores: torch.Tensor, indices: torch.Tensor,
                           concepts: Sequence[str]) -> str:
    """Fill `{concepts}` with '- <weight> <concept>' lines for one singular vector
    (scores/indices (K,)), positive weights only, highest first."""
    order = torch.argsort(scores, descending=True, stable=True)
    lines = [f"- {float(scores[j]):.2f} {concepts[int(indices[j])]}" for j in order.tolist() if scores[j] > 0]
    if not lines:
        raise ValueError("this singular vector has no concept with a positive weight to score")
    return template.format(concepts="\n".join(lines))


_SCORE_RE = re.compile(r"score\s*[:=\-]?\s*\**\s*([1-5])\b", re.IGNORECASE)
_INT_RE = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def parse_score(text: str, *, low: int = 1, high: int = 5) -> int:
    """An integer score from an LLM reply: 'Score: 4', '**Score**: 4', '4', 'I'd say 4/5'."""
    if not isinstance(text, str):
        raise TypeError(f"expected the reply text, got {type(text).__name__}")
    m = _SCORE_RE.search(text.replace("**", ""))
    if m:
        value = int(m.group(1))
    else:
        found = [int(t) for t in _INT_RE.findall(text)]
        if not found:
            raise ValueError(f"no score {low}-{high} found in the reply {text[:200]!r}")
        value = found[0]
    if not low <= value <= high:
        raise ValueError(f"score {value} outside {low}-{high} in the reply {text[:200]!r}")
    return value


class LLMScorer:
    """Adapter: an object with `.complete(messages: list[dict]) -> str` (OpenAI-compatible
    chat client) becomes a scorer `prompt -> int` (1-5). Replies that cannot be parsed
    are retried `retries` times, then raise ValueError."""

    def __init__(self, client, *, system: str | None = None, retries: int = 1):
        if not callable(getattr(client, "complete", None)):
            raise TypeError("client must have a .complete(messages) -> str method (an OpenAI-compatible chat client)")
        self.client, self.system, self.retries = client, system, retries

    def __call__(self, prompt: str) -> int:
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        messages.append({"role": "user", "content": prompt})
        err = None
        for _ in range(self.retries + 1):
            reply = self.client.complete(messages)
            try:
                return parse_score(reply)
            except ValueError as e:
                err = e
        raise err


def score_singular_vectors(scores: torch.Tensor, indices: torch.Tensor, concepts: Sequence[str],
                           scorer: Callable[[str], int], *, template: str = PROMPT_BACKGROUND,
                           cache: str | os.PathLike | None = None, progress: bool = True) -> torch.Tensor:
    """Ask `scorer` (prompt -> int 1-5) about every singular vector of a layer.

    Args:
        scores, indices: (H, r, K) decomposition; concepts: the dictionary's texts.
        cache: optional decisions file (one integer per line, head-major, the reference's
            format); answers already there are reused and new ones appended, so an
            interrupted run resumes.

    Returns:
        (H, r) int64 scores.
    """
    from tqdm.auto import tqdm

    H, r, _ = scores.shape
    flat_s, flat_i = scores.reshape(H * r, -1), indices.reshape(H * r, -1)
    done: list[int] = []
    if cache is not None and Path(cache).exists():
        done = read_decisions(cache, allow_partial=True)[: H * r]
    fh = open(cache, "a", encoding="utf-8") if cache is not None else None
    try:
        for n in tqdm(range(len(done), H * r), desc="scoring singular vectors", disable=not progress):
            value = scorer(format_concepts_prompt(template, flat_s[n], flat_i[n], concepts))
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
                raise ValueError(f"the scorer returned {value!r} for singular vector {n}; it must return an int 1-5")
            done.append(value)
            if fh is not None:
                fh.write(f"{value}\n")
                fh.flush()
    finally:
        if fh is not None:
            fh.close()
    return torch.tensor(done, dtype=torch.long).reshape(H, r)


def read_decisions(path: str | os.PathLike, *, allow_partial: bool = False) -> list[int]:
    """A decisions file: one integer per line (the reference writes 'Error' for failures)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(int(line))
        except ValueError:
            if allow_partial:
                break
            raise ValueError(f"{path}:{n}: {line!r} is not an integer score; re-score that singular vector") from None
    return out


def write_decisions(decisions: torch.Tensor, path: str | os.PathLike) -> None:
    """(H, r) ints -> one per line, head-major."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{int(v)}\n" for v in torch.as_tensor(decisions).reshape(-1)), encoding="utf-8")


# --------------------------------------------------------------------------------------
# explanations
# --------------------------------------------------------------------------------------
def explanation_rows(result: dict, concepts: Sequence[str], *, heads: Iterable[int] | None = None,
                     max_sv: int | None = None, layer: int | None = None) -> list[dict]:
    """Flat rows {layer, head, sv, singular_value, rank_in_sv, concept, weight}, nonzero weights
    only, highest weight first within each singular vector."""
    s, i = result["scores"], result["indices"]
    H, r, K = s.shape
    if int(i.max()) >= len(concepts):
        raise ValueError(f"indices reach {int(i.max())} but only {len(concepts)} concept texts were given")
    sv_vals = result.get("singular_values")
    layer = layer if layer is not None else (result.get("meta") or {}).get("layer")
    rows = []
    for h in (range(H) if heads is None else heads):
        for j in range(r if max_sv is None else min(r, max_sv)):
            order = torch.argsort(s[h, j], descending=True, stable=True).tolist()
            n = 0
            for k in order:
                w = float(s[h, j, k])
                if w == 0:
                    continue
                rows.append({"layer": layer, "head": h, "sv": j,
                             "singular_value": None if sv_vals is None else round(float(sv_vals[h, j]), 6),
                             "rank_in_sv": n, "concept": concepts[int(i[h, j, k])], "weight": round(w, 6)})
                n += 1
    return rows


def write_explanations(result: dict, concepts: Sequence[str], path_stem: str | os.PathLike, *,
                       max_sv: int | None = None, layer: int | None = None) -> tuple[Path, Path]:
    """Write `<stem>.csv` (all rows) and `<stem>.md` (per head, one line per singular vector)."""
    import csv

    rows = explanation_rows(result, concepts, max_sv=max_sv, layer=layer)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = Path(f"{stem}.csv"), Path(f"{stem}.md")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["layer", "head", "sv", "singular_value", "rank_in_sv", "concept", "weight"])
        w.writeheader()
        w.writerows(rows)
    layer = rows[0]["layer"] if rows else layer
    lines = [f"# SITH explanations, layer {layer}", ""]
    by = {}
    for row in rows:
        by.setdefault((row["head"], row["sv"]), []).append(row)
    for h in sorted({k[0] for k in by}):
        lines += [f"## Head {h}", "", "| sv | singular value | concepts (weight) |", "|---:|---:|---|"]
        for (hh, j), items in sorted(by.items()):
            if hh != h:
                continue
            sv = items[0]["singular_value"]
            text = ", ".join(f"{it['concept']} ({it['weight']:.3f})" for it in items).replace("|", "\\|")
            lines.append(f"| {j} | {'' if sv is None else f'{sv:.4g}'} | {text} |")
        lines.append("")
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return md_path, csv_path


def plot_explanations(result: dict, concepts: Sequence[str], path: str | os.PathLike, *,
                      heads: Sequence[int] | None = None, n_sv: int = 4, title: str | None = None) -> Path:
    """PNG figure: one panel per head, its first `n_sv` singular vectors as groups of
    horizontal bars (one bar per concept, length = weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["scores"]
    H, r, K = s.shape
    heads = list(range(H)) if heads is None else list(heads)
    n_sv = min(n_sv, r)
    cols = min(4, len(heads))
    rows_n = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 0.32 * n_sv * K * rows_n + 1.2 * rows_n),
                             squeeze=False)
    colors = plt.get_cmap("tab10")
    expl = explanation_rows(result, concepts, heads=heads, max_sv=n_sv)
    sv_vals = result.get("singular_values")
    for ax, h in zip(axes.flat, heads):
        items = [row for row in expl if row["head"] == h]
        labels, widths, cs = [], [], []
        for row in items:
            labels.append(f"sv{row['sv']}: {row['concept']}")
            widths.append(row["weight"])
            cs.append(colors(row["sv"] % 10))
        y = list(range(len(items)))[::-1]
        ax.barh(y, widths, color=cs)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        sub = "" if sv_vals is None else " (s=" + ", ".join(f"{float(v):.2g}" for v in sv_vals[h, :n_sv]) + ")"
        ax.set_title(f"head {h}{sub}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(heads):]:
        ax.set_axis_off()
    layer = (result.get("meta") or {}).get("layer")
    fig.suptitle(title or f"SITH: top concepts of the first {n_sv} singular vectors per head (layer {layer})",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# command line: `fastinterp sith decompose | fidelity | edit`
# --------------------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-") or "x"


def _weights_tag(args) -> str:
    if args.checkpoint:
        return _safe_name(Path(args.checkpoint).stem)
    return _safe_name(args.pretrained) if args.pretrained else "random"


def _model_dir(args) -> Path:
    """SITH's data layout: <output>/<model>/<weights>/{decompositions,dictionaries,image_mean.pt}."""
    return Path(args.output) / _safe_name(args.model_name) / _weights_tag(args)


def _load_model(args):
    from .models import load_clip

    torch.manual_seed(args.seed)  # random-weight models are reproducible across commands
    return load_clip(args.model_name, args.pretrained, device=args.device, checkpoint=args.checkpoint)


def _resolve_dictionary(spec: str):
    from .concepts import ConceptDictionary

    if spec in ("demo",):
        return ConceptDictionary.builtin(spec)
    if spec == "bpe":
        return ConceptDictionary.bpe_vocabulary()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--dictionary {spec!r}: not a built-in ('demo', 'bpe') and no such file; pass a "
                                f"text file with one concept per line")
    return ConceptDictionary.from_file(path, name=_safe_name(path.stem))


def _encode_dictionary(args, model, tokenizer, progress: bool):
    d = _resolve_dictionary(args.dictionary)
    emb = d.encode(model, tokenizer, batch_size=max(args.batch_size, 256), progress=progress)
    mdir = _model_dir(args)
    raw_path = mdir / "dictionaries" / f"{d.name}.pt"
    if not raw_path.exists():  # SITH's readers load <model dir>/dictionaries/<name>.pt and dictionaries/<name>.txt
        _atomic_save(emb, raw_path)
    txt = Path(args.output) / "dictionaries" / f"{d.name}.txt"
    if not txt.exists():
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(d.texts) + "\n", encoding="utf-8")
    return d, emb


def _resolve_image_mean(spec, default_path: Path, d: int):
    if spec == "none":
        return None
    path = default_path if spec in (None, "auto") else Path(spec)
    if not path.exists():
        if spec in (None, "auto"):
            return None
        raise FileNotFoundError(f"--image-mean {str(path)!r} does not exist; give a .pt file with a ({d},) tensor, "
                                f"'auto' or 'none', or compute one with --images FOLDER")
    mean = torch.load(path, map_location="cpu", weights_only=True)
    return _check_image_mean(mean.float(), d)


def _cmd_decompose(args) -> int:
    progress = not args.quiet
    model, preprocess, tokenizer = _load_model(args)
    info = vit_info(model)
    layers = check_layers(model, args.layers)
    mdir = _model_dir(args)
    mdir.mkdir(parents=True, exist_ok=True)
    if args.images:
        mean = image_mean(model, preprocess, args.images, batch_size=args.batch_size, progress=progress,
                          save_to=mdir / "image_mean.pt")
        print(f"image mean of {args.images} written to {mdir / 'image_mean.pt'}")
    else:
        mean = _resolve_image_mean(args.image_mean, mdir / "image_mean.pt", info.output_dim)
    if mean is None:
        print("no image mean (modality-gap correction skipped); pass --images FOLDER to compute one")
    d, emb = _encode_dictionary(args, model, tokenizer, progress)
    out = mdir / "decompositions"
    res = decompose(model, emb, layers, rank=args.rank, method=args.method, sparsity=args.sparsity,
                    sv_type=args.sv_type, fold_ln=args.fold_ln, image_mean=mean, dictionary_name=d.name,
                    output_dir=out, batch_size=args.batch_size, force=args.force, progress=progress)
    for layer, r in res.items():
        name = decomposition_filename(layer, sv_type=args.sv_type, fold_ln=args.fold_ln, dictionary=d.name,
                                      method=args.method, sparsity=args.sparsity)
        how = "existing file kept" if r.get("resumed") else "written"
        print(f"layer {layer}: {tuple(r['scores'].shape)} {how}: {out / name}")
        if args.explain:
            stem = mdir / "explanations" / name[:-3]
            md, _ = write_explanations(r, d.texts, stem, layer=layer)
            png = plot_explanations(r, d.texts, Path(f"{stem}.png"), n_sv=args.explain_sv)
            print(f"  explanations: {md}, {png}")
    return 0


def _cmd_fidelity(args) -> int:
    import csv

    model, _, tokenizer = _load_model(args)
    info = vit_info(model)
    dict_cache: dict = {}
    rows = []
    for file in args.files:
        file = Path(file)
        meta = parse_decomposition_filename(file)
        mdir = file.resolve().parent.parent
        if args.dictionary:
            if args.dictionary not in dict_cache:
                dict_cache[args.dictionary] = _resolve_dictionary(args.dictionary).encode(
                    model, tokenizer, progress=not args.quiet)
            emb = dict_cache[args.dictionary]
        else:
            raw = mdir / "dictionaries" / f"{meta['dictionary']}.pt"
            if not raw.exists():
                raise FileNotFoundError(f"no encoded dictionary {str(raw)!r} next to {file.name}; pass --dictionary "
                                        f"(demo, bpe or the concept file) used for the decomposition")
            emb = torch.load(raw, map_location="cpu", weights_only=True).float()
        mean = _resolve_image_mean(args.image_mean, mdir / "image_mean.pt", info.output_dim)
        data = load_decomposition(file)
        if isinstance(data.get("meta"), dict) and data["meta"].get("image_mean") and mean is None:
            warnings.warn(f"{file.name} was made with an image mean but none was found for fidelity",
                          RuntimeWarning, stacklevel=2)
        res = fidelity_from_file(model, file, emb, image_mean=mean,
                                 dictionary_mode="normalize" if args.normalize_only else "center")
        print(f"{file.name}:")
        for h in res["heads"]:
            print(f"  head {h['head']:2d}: mean {h['mean']:.4f}  std {h['std']:.4f}  min {h['min']:.4f}  "
                  f"max {h['max']:.4f}")
        o = res["overall"]
        print(f"  overall fidelity: {o['mean']:.4f} (std {o['std']:.4f}, min {o['min']:.4f}, max {o['max']:.4f})")
        fdir = mdir / "fidelity"
        fdir.mkdir(parents=True, exist_ok=True)
        payload = {k: v for k, v in res.items() if k != "cos"}
        payload["cos"] = res["cos"].tolist()
        (fdir / (file.stem + ".json")).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        for h in res["heads"]:
            rows.append({"file": file.name, "layer": meta["layer"], **h})
        rows.append({"file": file.name, "layer": meta["layer"], "head": "all", **o})
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["file", "layer", "head", "mean", "std", "min", "max"])
            w.writeheader()
            w.writerows(rows)
        print(f"summary written to {args.csv}")
    return 0


def _cmd_edit(args) -> int:
    model, _, tokenizer = _load_model(args)
    info = vit_info(model)
    layers = check_layers(model, args.layers)
    mdir = _model_dir(args)
    dname = _resolve_dictionary(args.dictionary).name if args.dictionary else None
    task_atoms = g_norm = None
    if args.recipe == "classify":
        if not args.classes or not dname:
            raise ValueError("--recipe classify needs --classes FILE (one class name per line) and --dictionary")
        d, emb = _encode_dictionary(args, model, tokenizer, not args.quiet)
        classes = [c.strip() for c in Path(args.classes).read_text(encoding="utf-8").splitlines() if c.strip()]
        if not classes:
            raise ValueError(f"--classes {args.classes!r} lists no class names")
        from .concepts import encode_texts

        cls_emb = encode_texts(model, tokenizer, [args.class_template.format(c) for c in classes],
                               progress=not args.quiet)
        g_norm = prepare_dictionary(emb, "normalize")
        exclude = torch.tensor([t in set(classes) for t in d.texts]) if args.filter_dictionary else None
        task_atoms = task_concepts(cls_emb, g_norm, sparsity=args.class_sparsity, coh=0.3, exclude=exclude)
        print(f"task concepts: {task_atoms.shape[0]} atoms from {len(classes)} classes")
    mult_file = None
    if args.recipe == "multipliers":
        if not args.multipliers:
            raise ValueError("--recipe multipliers needs --multipliers FILE.pt ({layer: (H, r) tensor})")
        mult_file = torch.load(args.multipliers, map_location="cpu", weights_only=True)
        if isinstance(mult_file, torch.Tensor):
            if len(layers) != 1:
                raise ValueError("a bare (H, r) multiplier tensor needs exactly one --layers value")
            mult_file = {layers[0]: mult_file}
    for layer in layers:
        name = None
        if dname is not None:
            name = decomposition_filename(layer, sv_type="right", fold_ln=args.fold_ln, dictionary=dname,
                                          method=args.method, sparsity=args.sparsity)
        if args.recipe == "multipliers":
            if layer not in mult_file:
                raise ValueError(f"{args.multipliers} has no multipliers for layer {layer} (keys: {list(mult_file)})")
            m = mult_file[layer]
        elif args.recipe == "classify":
            data = load_decomposition(mdir / "decompositions" / name)
            m = classification_multipliers(data["scores"], data["indices"], g_norm, task_atoms,
                                           offset=args.offset, min_threshold=args.min_threshold)
        else:
            if name is None:
                raise ValueError(f"--recipe {args.recipe} needs --dictionary (to name the decisions files)")
            ddir = Path(args.decisions) if args.decisions else mdir / f"{args.recipe}-decisions"
            dfile = ddir / (name[:-3] + ".txt")
            if args.llm:  # fills in whatever the decisions file lacks (resumes)
                from .llm import OpenAIChat

                dfile.parent.mkdir(parents=True, exist_ok=True)
                data = load_decomposition(mdir / "decompositions" / name)
                d = _resolve_dictionary(args.dictionary)
                scorer = LLMScorer(OpenAIChat(model=args.llm_model))
                template = PROMPT_BACKGROUND if args.recipe == "suppress" else PROMPT_UNSAFE
                score_singular_vectors(data["scores"], data["indices"], d.texts, scorer, template=template,
                                       cache=dfile, progress=not args.quiet)
            if not dfile.exists():
                raise FileNotFoundError(f"no decisions file {str(dfile)!r}: one integer score 1-5 per line, head-major "
                                        f"(H*r lines); make it with fastinterp.sith.score_singular_vectors")
            dec = read_decisions(dfile)
            if len(dec) % info.heads:
                raise ValueError(f"{dfile}: {len(dec)} scores is not a multiple of {info.heads} heads")
            dec = torch.tensor(dec).reshape(info.heads, -1)
            m = suppress_multipliers(dec) if args.recipe == "suppress" else sign_flip_multipliers(dec)
        m = torch.as_tensor(m, dtype=torch.float64)
        apply_multipliers(model, layer, m, fold_ln=args.fold_ln, truncate=args.truncate)
        print(f"layer {layer}: edited {tuple(m.shape)} singular values (kept {int((m == 1).sum())}, "
              f"zeroed {int((m == 0).sum())}, flipped {int((m < 0).sum())}, other {int(((m != 1) & (m > 0)).sum())})")
    save = Path(args.save)
    _atomic_save(model.state_dict(), save)
    print(f"edited model written to {save} (load with fastinterp.load_clip({args.model_name!r}, checkpoint=...))")
    return 0


def register_cli(subparsers) -> None:
    """Add `fastinterp sith {decompose,fidelity,edit}`."""
    import argparse

    from .cli import add_model_args

    p = subparsers.add_parser("sith", help="SITH: explain attention heads from their weights (decompose, fidelity, edit)")
    sub = p.add_subparsers(dest="sith_command", required=True)

    def common(q):
        add_model_args(q)
        q.add_argument("--seed", type=int, default=0, help="seed for random-weight models (default 0)")
        q.add_argument("--output", default="fastinterp-out/sith",
                       help="root folder, SITH's data/ layout: <output>/<model>/<weights>/... (default fastinterp-out/sith)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("decompose", help="sparse concept codes of the VO singular vectors, one .pt per layer")
    common(q)
    q.add_argument("--layers", type=int, nargs="+", default=[-1], help="layer indices (default: -1, the last)")
    q.add_argument("--rank", type=int, default=64, help="singular vectors per head (clipped to the head dim)")
    q.add_argument("--method", default="comp-0.3", help="comp-<coh>, omp, nnomp, mp or topk (default comp-0.3)")
    q.add_argument("--sparsity", type=int, default=5, help="concepts per singular vector (default 5)")
    q.add_argument("--dictionary", default="demo", help="'demo', 'bpe' or a text file, one concept per line")
    q.add_argument("--sv-type", choices=SV_TYPES, default="right")
    q.add_argument("--fold-ln", action=argparse.BooleanOptionalAction, default=False,
                   help="fold ln_1 into the weights and center them (SITH's canonical runs use it)")
    q.add_argument("--batch-size", type=int, default=64, help="singular vectors coded at once (default 64)")
    q.add_argument("--image-mean", default="auto",
                   help="'auto' (<model dir>/image_mean.pt if present), 'none', or a .pt file")
    q.add_argument("--images", default=None, help="image folder to compute the image mean from (saved as image_mean.pt)")
    q.add_argument("--force", action="store_true", help="recompute layers whose files exist")
    q.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True,
                   help="write Markdown/CSV/PNG explanations per layer (default on)")
    q.add_argument("--explain-sv", type=int, default=4, help="singular vectors per head in the figure")
    q.set_defaults(func=_cmd_decompose)

    q = sub.add_parser("fidelity", help="cosine between singular vectors and their concept reconstructions")
    common(q)
    q.add_argument("files", nargs="+", help="decomposition files (layer-LL_..._sparsity-K.pt)")
    q.add_argument("--dictionary", default=None,
                   help="dictionary used for the decomposition (default: <model dir>/dictionaries/<name>.pt)")
    q.add_argument("--image-mean", default="auto", help="'auto', 'none' or a .pt file")
    q.add_argument("--normalize-only", action="store_true", help="dictionary prepared by normalising only")
    q.add_argument("--csv", default=None, help="write a per-head summary CSV here")
    q.set_defaults(func=_cmd_fidelity)

    q = sub.add_parser("edit", help="scale singular values (SITH Sec 5 recipes) and save the edited model")
    common(q)
    q.add_argument("--layers", type=int, nargs="+", required=True)
    q.add_argument("--recipe", choices=("multipliers", "suppress", "sign-flip", "classify"), required=True,
                   help="multipliers: from --multipliers; suppress (1-2 keep, 3-5 zero) / sign-flip (1-2 keep, 3 "
                        "flip, 4-5 zero): from decisions files; classify: task-concept rescaling")
    q.add_argument("--dictionary", default=None, help="dictionary of the decompositions ('demo', 'bpe', file)")
    q.add_argument("--method", default="comp-0.3")
    q.add_argument("--sparsity", type=int, default=5)
    q.add_argument("--fold-ln", action=argparse.BooleanOptionalAction, default=False,
                   help="edit in the LN-folded, centered basis (as the decompositions it reads; the paper's edits use it)")
    q.add_argument("--decisions", default=None,
                   help="folder of decisions files <decomposition stem>.txt (default <model dir>/<recipe>-decisions)")
    q.add_argument("--llm", action="store_true",
                   help="suppress/sign-flip: score missing singular vectors with an OpenAI-compatible chat endpoint "
                        "(FASTINTERP_LLM_BASE_URL, FASTINTERP_LLM_MODEL, FASTINTERP_LLM_API_KEY); answers are cached "
                        "in the decisions files, so an interrupted run resumes")
    q.add_argument("--llm-model", default=None, help="model name for --llm (default: $FASTINTERP_LLM_MODEL)")
    q.add_argument("--multipliers", default=None, help=".pt file: {layer: (H, r) tensor} or one (H, r) tensor")
    q.add_argument("--classes", default=None, help="classify: text file, one class name per line")
    q.add_argument("--class-template", default="{}", help="classify: prompt for class names (default raw)")
    q.add_argument("--class-sparsity", type=int, default=10)
    q.add_argument("--offset", type=float, default=0.3)
    q.add_argument("--min-threshold", type=float, default=0.8)
    q.add_argument("--filter-dictionary", action="store_true", help="classify: drop concepts equal to a class name")
    q.add_argument("--truncate", action="store_true", help="zero singular vectors beyond the given rank (reference)")
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--save", required=True, help="where to write the edited model's state dict (.pt)")
    q.set_defaults(func=_cmd_edit)


# --------------------------------------------------------------------------------------
# demo section
# --------------------------------------------------------------------------------------
def demo_section(ctx) -> str:
    """`fastinterp demo` section: decompose the last two layers with the built-in dictionary,
    fidelity per layer, explanation table and figure, and one edit."""
    info = ctx.info
    layers = check_layers(ctx.model, [-2, -1]) if info.layers >= 2 else [0]
    out = Path(ctx.output) / "sith"
    mean = image_mean(ctx.model, ctx.preprocess, list(ctx.images.values()), progress=False)
    res = decompose(ctx.model, ctx.concept_embeddings, layers, rank=None, method="comp-0.3", sparsity=5,
                    fold_ln=True, image_mean=mean, dictionary_name=ctx.dictionary.name,
                    output_dir=out / "decompositions", progress=False)
    g = prepare_dictionary(ctx.concept_embeddings, "center")
    fid = {layer: fidelity(ctx.model, layer, r["scores"], r["indices"], g, image_mean=mean) for layer, r in res.items()}
    last = layers[-1]
    fig = plot_explanations(res[last], ctx.dictionary.texts, Path(ctx.output) / "sith_explanations.png", n_sv=3)
    md, _ = write_explanations(res[last], ctx.dictionary.texts, out / f"explanations-layer-{last:02d}", layer=last)

    # one edit: remove the top singular vector of every head of the last layer, then undo
    images = torch.stack([ctx.preprocess(im) for im in ctx.images.values()])
    images = images.to(next(ctx.model.parameters()).device)
    with torch.no_grad():
        before = F.normalize(ctx.model.encode_image(images).float(), dim=-1)
        m = torch.ones(info.heads, 1) * 0.0
        handle = apply_multipliers(ctx.model, last, m, fold_ln=True)
        after = F.normalize(ctx.model.encode_image(images).float(), dim=-1)
        handle.undo()
        restored = F.normalize(ctx.model.encode_image(images).float(), dim=-1)
    edit_cos = (before * after).sum(-1)
    ctx.results["sith"] = {
        "layers": layers,
        "rank": int(res[last]["scores"].shape[1]),
        "fidelity": {str(k): v["overall"] for k, v in fid.items()},
        "edit_cosine_after_removing_top_sv": [round(float(c), 6) for c in edit_cos],
        "undo_max_abs_diff": float((restored - before).abs().max()),
        "files": sorted(p.name for p in (out / "decompositions").glob("*.pt")),
    }
    lines = ["## SITH: attention heads explained from their weights", "",
             f"Decomposed layers {layers} (rank {res[last]['scores'].shape[1]} = head dim, COMP coh 0.3, "
             f"5 concepts per singular vector, fold-ln, image mean of the {len(ctx.images)} demo photos).", "",
             "| layer | fidelity mean | std | min | max |", "|---:|---:|---:|---:|---:|"]
    for layer, f in fid.items():
        o = f["overall"]
        lines.append(f"| {layer} | {o['mean']:.4f} | {o['std']:.4f} | {o['min']:.4f} | {o['max']:.4f} |")
    lines += ["", f"![SITH explanations](sith_explanations.png)", "",
              f"Top concepts of layer {last} (full table: `sith/{md.name}` and `.csv`):", ""]
    for row in explanation_rows(res[last], ctx.dictionary.texts, max_sv=1):
        if row["rank_in_sv"] == 0:
            lines.append(f"- head {row['head']}, sv 0 (s={row['singular_value']:.3g}): {row['concept']} "
                         f"({row['weight']:.3f})")
    lines += ["", "Edit: zeroing the top singular value of every head of layer "
              f"{last} moves the demo photos' embeddings to cosine "
              + ", ".join(f"{c:.4f}" for c in edit_cos.tolist()) + " of the original; undo restores them "
              f"(max difference {ctx.results['sith']['undo_max_abs_diff']:.1e})."]
    return "\n".join(lines)
