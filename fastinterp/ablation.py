"""Head ablation of an open_clip ViT: many head-mask configurations in one forward pass.

A head-mask configuration is a (layers, heads) array with 1 keeping a head and 0 ablating
it; values in between scale the head (soft masking). Ablating a head replaces its output
(the head's slice of the attention output before out_proj) by zero ("zero" mode: the CCS
pruning, equivalent to zeroing the head's out_proj columns and query rows, out_proj bias
kept) or by its dataset mean per token position ("mean" mode: the TextSpan
mean-ablation). With mask value m the head output becomes `m * o + (1 - m) * r` with r
the replacement (0 or the mean).

`masked_forward` runs C configurations over B images in one pass:
- layers before the first layer any configuration masks run once on the B images;
- at the layer where a configuration's mask first differs from all-ones, its input is
  the unmasked model's, so only the attention output changes, by
  `sum_h (m_h - 1) (o_h - r_h) @ W_o[:, h]^T`: the unmasked layer is computed once and each
  configuration adds its correction (this is the fast path of single-head ablations);
- from there on each configuration runs on its own copy of the batch (C x B rows), the
  masked head outputs going through out_proj in one fused kernel
  (`fastinterp.kernels.head_mask`, Triton on CUDA, torch on the CPU).

Towers: every tower `fastinterp.vit.vit_view` reads (open_clip ViTs with any pooling and
LayerScale; timm VisionTransformer towers such as SigLIP's); with an all-ones mask the result
is `encode_image(normalize=False)` (tests/test_model_zoo.py checks it on the whole open_clip
model list). Which heads count: the (layers, heads) of the transformer blocks' self-attention.
An attentional pooler (CoCa) or a MAP head (SigLIP) has heads of its own, but they read the
last block's tokens with their own learned queries and are part of the readout: they always
run unmasked, and "mean" ablation replaces a block head's output by its per-token mean over
all the tower's tokens (class / register tokens included), whatever the pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.head_mask import masked_head_projection
from .vit import check_heads, check_layers, head_outputs, parse_head, vit_info, vit_view

__all__ = [
    "MODES",
    "check_masks",
    "head_output_means",
    "head_set_masks",
    "masked_forward",
    "parse_head",
    "single_head_ablations",
]

MODES = ("zero", "mean")

ACTIVATION_BUDGET_BYTES = 2 << 30
"""Default memory budget for the expanded (configurations x images) activations."""


# --------------------------------------------------------------------------------------
# validation helpers (head ids and the supported-block check are the ViT view's: fastinterp.vit)
# --------------------------------------------------------------------------------------
def head_set_masks(model_or_shape, head_sets, *, value: float = 0.0) -> torch.Tensor:
    """Masks (C, layers, heads) from C head lists: ones everywhere except `value` at the listed
    heads. `model_or_shape` is a model or a (layers, heads) pair."""
    if isinstance(model_or_shape, (tuple, list)):
        layers, n_heads = model_or_shape
    else:
        info = vit_info(model_or_shape)
        layers, n_heads = info.layers, info.heads
    head_sets = list(head_sets)
    masks = torch.ones(len(head_sets), layers, n_heads)
    for c, heads in enumerate(head_sets):
        for layer, head in check_heads(heads, layers, n_heads):
            masks[c, layer, head] = value
    return masks


def check_masks(masks, layers: int, n_heads: int) -> torch.Tensor:
    """Validate masks (C, layers, heads) (a single (layers, heads) mask is given C = 1);
    returns a float32 CPU tensor."""
    if not isinstance(masks, torch.Tensor):
        try:
            masks = torch.as_tensor(masks, dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise TypeError(f"masks must be a tensor or array of shape (C, {layers}, {n_heads}): {err}") from err
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (layers, n_heads):
        raise ValueError(f"masks have shape {tuple(masks.shape)}; this ViT needs (C, {layers}, {n_heads}) "
                         f"(configurations, layers, heads), 1 keeping a head and 0 ablating it")
    if masks.shape[0] == 0:
        raise ValueError("masks hold no configuration (C = 0); give at least one (layers, heads) mask")
    if masks.dtype == torch.bool or not masks.is_floating_point():
        masks = masks.to(torch.float32)
    masks = masks.detach().to("cpu", torch.float32)
    if not torch.isfinite(masks).all():
        raise ValueError("masks contain NaN or infinite values; use values in [0, 1] (1 keeps a head)")
    if (masks < 0).any() or (masks > 1).any():
        raise ValueError(f"mask values must lie in [0, 1] (1 keeps, 0 ablates, between scales); got "
                         f"min {masks.min().item():g}, max {masks.max().item():g}")
    return masks


def _check_images(images, info) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a preprocessed (B, 3, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images))}; use the model's preprocess transform")
    if tuple(images.shape[2:]) != tuple(info.image_size):
        raise ValueError(f"images are {tuple(images.shape[2:])} but the model takes {tuple(info.image_size)}; "
                         f"use the model's preprocess transform")
    if images.shape[0] == 0:
        raise ValueError("no images (B = 0)")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    return images


# --------------------------------------------------------------------------------------
# the block pieces (batch-first (B, N, D) throughout)
# --------------------------------------------------------------------------------------
def _mlp(block, x):
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _plain_block(block, x, cls_only: bool = False):
    o = head_outputs(block, x, cls_only=cls_only)
    B, N, H, hd = o.shape
    if cls_only:
        x = x[:, :1]
    x = x + block.ls_1(F.linear(o.reshape(B, N, H * hd), block.out_weight, block.out_bias))
    return _mlp(block, x)


def _proj_args(block):
    return block.out_weight, block.out_bias


def _masked_block(block, x, masks_l, mean_l, C, backend, cls_only: bool = False):
    """x: (C*B, N, D); masks_l: (C, H) -> (C*B, N, D) ((C*B, 1, D) with cls_only)."""
    o = head_outputs(block, x, cls_only=cls_only)
    CB, N, H, hd = o.shape
    B = CB // C
    if cls_only:
        x = x[:, :1]
        if mean_l is not None:
            mean_l = mean_l[:1]
    w, bias = _proj_args(block)
    a = masks_l.to(o.device)
    if bool((masks_l == 1).all()):  # nothing masked in this layer: the plain projection
        out = F.linear(o.reshape(CB, N, H * hd), w, bias)
    elif mean_l is None:
        out = masked_head_projection(o.reshape(C, B * N, H, hd), a, w, bias, backend=backend)
    else:
        out = masked_head_projection(o.reshape(C, B * N, H, hd), a, w, bias, y=mean_l, b=1 - a, backend=backend)
    x = x + block.ls_1(out.reshape(CB, N, -1))
    return _mlp(block, x)


def _masking_view(model):
    """The tower's `vit.ViTView` for head masking: any pooling that yields one embedding
    (class token, average, attentional pooler, MAP head); the masks cover the transformer
    blocks' self-attention heads only (the pooler's own heads are part of the readout and run
    unmasked, see the module docstring)."""
    return vit_view(model).require("head masking", poolings=("tok", "avg", "attn_pool", "map"))


def _means_for(means, layer):
    return None if means is None else means[layer]


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
@torch.no_grad()
def head_output_means(model, images, *, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Dataset mean of every head's output, per token position, for mean-ablation.

    Args:
        model: open_clip CLIP model (ViT image tower).
        images: (B, 3, H, W) preprocessed images, or an iterable of such batches.

    Returns:
        (layers, tokens, heads, head_dim) float32 on the model's device: the mean over images
        of the head outputs (attention output before out_proj) of the unmasked model.
    """
    view = _masking_view(model)
    info = view.info
    batches = [images] if isinstance(images, torch.Tensor) else images
    total = None
    count = 0
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc="head means", disable=not progress):
        batch = _check_images(batch, info)
        for start in range(0, batch.shape[0], batch_size):
            x = view.embed(batch[start:start + batch_size].to(view.device))
            sums = []
            for block in view.blocks:
                o = head_outputs(block, x)
                sums.append(o.float().sum(0))
                B, N, H, hd = o.shape
                x = x + block.ls_1(F.linear(o.reshape(B, N, H * hd), block.out_weight, block.out_bias))
                x = _mlp(block, x)
            s = torch.stack(sums)
            total = s if total is None else total + s
            count += x.shape[0]
    if count == 0:
        raise ValueError("no images given to head_output_means")
    return total / count


def _check_means(means, info, n_tokens, device, dtype):
    if means is None:
        raise ValueError("mode='mean' needs means=: compute them with "
                         "fastinterp.ablation.head_output_means(model, images)")
    shape = (info.layers, n_tokens, info.heads, info.head_dim)
    if not isinstance(means, torch.Tensor) or tuple(means.shape) != shape:
        raise ValueError(f"means must have shape {shape} (layers, tokens, heads, head_dim), got "
                         f"{tuple(getattr(means, 'shape', ()))}; compute them with head_output_means(model, images)")
    if not torch.isfinite(means).all():
        raise ValueError("means contain NaN or infinite values")
    return means.to(device, dtype)


@torch.no_grad()
def masked_forward(model, images: torch.Tensor, masks, mode: str = "zero", means: torch.Tensor | None = None,
                   backend: str | None = None, *, config_chunk: int | None = None) -> torch.Tensor:
    """Image embeddings of the model under C head-mask configurations, in one pass.

    Args:
        model: open_clip CLIP model with a ViT image tower.
        images: (B, 3, H, W) preprocessed images (on the model's device).
        masks: (C, layers, heads) in [0, 1]: 1 keeps a head, 0 ablates it, values between
            scale it (a (layers, heads) mask counts as C = 1).
        mode: "zero" (head output -> 0, the CCS pruning) or "mean" (head output -> its
            dataset mean per token position; needs `means`).
        means: (layers, tokens, heads, head_dim) from `head_output_means` (mode="mean").
        backend: kernel backend for the masked projection ("torch" or "triton"; default by device).
        config_chunk: run at most this many diverged configurations at once (memory bound:
            the masked layers hold config_chunk x B copies of the activations). Default:
            as many as keep those activations near `ACTIVATION_BUDGET_BYTES` (2 GiB).

    Returns:
        (C, B, d) unnormalised image embeddings (what `model.encode_image(normalize=False)`
        returns), in the model's dtype.
    """
    view, info, masks, images, means = _check_forward_args(model, images, masks, mode, means, config_chunk)
    C, B, L = masks.shape[0], images.shape[0], info.layers
    blocks = view.blocks
    changed = (masks != 1).reshape(C, L, -1).any(-1)  # (C, L)
    first = torch.where(changed.any(1), changed.float().argmax(1), torch.full((C,), L))  # first masked layer
    dtype = view.dtype
    out = torch.empty((C, B, info.output_dim), device=images.device, dtype=dtype)
    chunk = config_chunk or _default_config_chunk(info, B, dtype)

    x = view.embed(images)
    l0 = int(first.min())
    cls_last = view.cls_last  # the last block only matters for the class token
    for layer in range(l0):
        x = _plain_block(blocks[layer], x, cls_last and layer == L - 1)
    for layer in range(l0, L):
        block = blocks[layer]
        last = cls_last and layer == L - 1
        starters = (first == layer).nonzero().flatten().tolist()
        if not starters:
            x = _plain_block(block, x, last)
            continue
        # the unmasked layer, computed once for all configurations that start here
        o = head_outputs(block, x, cls_only=last)  # (B, N, H, hd); N = 1 for a class-token-only last layer
        if last:
            x = x[:, :1]
        w, bias = _proj_args(block)
        clean_attn = F.linear(o.flatten(2), w, bias)
        for s0 in range(0, len(starters), chunk):
            group = starters[s0:s0 + chunk]
            out[group] = _diverged_configs(view, layer, x, o, clean_attn, masks[group], means, backend, cls_last)
        if not (first > layer).any():
            return out
        x = _mlp(block, x + block.ls_1(clean_attn))
    rest = (first == L).nonzero().flatten()
    if rest.numel():
        out[rest] = view.finish(x).unsqueeze(0)
    return out


def _check_forward_args(model, images, masks, mode, means, config_chunk):
    """masked_forward's inputs checked: (view, info, masks (C, L, H) float32 on the CPU,
    images on the model's device, means on the model's device and dtype (mode "mean") or None)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    view = _masking_view(model)
    info = view.info
    masks = check_masks(masks, info.layers, info.heads)
    images = _check_images(images, info)
    device, dtype = view.device, view.dtype
    if mode == "mean":
        means = _check_means(means, info, view.n_tokens, device, dtype)
    else:
        means = None
    if config_chunk is not None and config_chunk < 1:
        raise ValueError(f"config_chunk must be >= 1, got {config_chunk}")
    return view, info, masks, images.to(device), means


def _default_config_chunk(info, B: int, dtype) -> int:
    """How many diverged configurations keep their activations near ACTIVATION_BUDGET_BYTES:
    the residual + MLP hidden (4x) + attention temporaries, in the model's dtype."""
    per_config = B * (info.num_patches + 1) * info.width * torch.empty((), dtype=dtype).element_size() * 8
    return max(1, ACTIVATION_BUDGET_BYTES // per_config)


def _diverged_configs(view, layer, x, o, clean_attn, m, means, backend, cls_last):
    """G configurations whose masks first differ from all-ones at `layer`, from there to the
    embedding: (G, B, d).

    x: (B, N, D) residual entering `layer` (class token only for a class-pooled last layer);
    o: (B, N, H, hd) the unmasked head outputs there; clean_attn: their projection;
    m: (G, L, H) masks. At `layer` only the attention output changes (by the masked heads'
    correction); later layers run on the G x B copies.
    """
    blocks = view.blocks
    L = len(blocks)
    block = blocks[layer]
    G = m.shape[0]
    B, N, H, hd = o.shape
    m = m.to(x.device)
    a = m[:, layer] - 1
    w, _ = _proj_args(block)
    if means is None:
        delta = masked_head_projection(o.reshape(1, B * N, H, hd), a, w, None, backend=backend)
    else:
        delta = masked_head_projection(o.reshape(1, B * N, H, hd), a, w, None, y=means[layer][:N], b=-a,
                                       backend=backend)
    xs = x.unsqueeze(0) + block.ls_1(clean_attn.unsqueeze(0) + delta.reshape(G, B, N, -1))
    xs = _mlp(block, xs.reshape(G * B, N, -1))
    for later in range(layer + 1, L):
        xs = _masked_block(blocks[later], xs, m[:, later], _means_for(means, later), G, backend,
                           cls_last and later == L - 1)
    return view.finish(xs).reshape(G, B, -1)


def single_head_ablations(model, images: torch.Tensor, layers=None, *, mode: str = "zero",
                          means: torch.Tensor | None = None, backend: str | None = None,
                          config_chunk: int | None = None):
    """Every single-head ablation of the given layers (default: the last 4).

    Returns:
        (embeddings, heads): embeddings (len(layers) * heads, B, d) in the order of `heads`,
        a list of (layer, head) pairs (layer-major).
    """
    info = vit_info(model)
    if layers is None:
        layers = list(range(max(0, info.layers - 4), info.layers))
    layers = check_layers(model, list(layers))
    heads = [(layer, h) for layer in layers for h in range(info.heads)]
    masks = head_set_masks((info.layers, info.heads), [[hd] for hd in heads])
    emb = masked_forward(model, images, masks, mode=mode, means=means, backend=backend, config_chunk=config_chunk)
    return emb, heads

