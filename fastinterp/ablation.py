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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.head_mask import masked_head_projection
from .models import vision_transformer, vit_info

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
# validation helpers
# --------------------------------------------------------------------------------------
def parse_head(spec) -> tuple[int, int]:
    """'L11.H3', 'l11h3', '11.3', '11:3' or (11, 3) -> (11, 3)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        layer, head = spec
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, head)):
            raise TypeError(f"head {spec!r}: layer and head must be ints")
        return int(layer), int(head)
    if isinstance(spec, str):
        s = spec.strip().upper().replace("L", "").replace("H", ".").replace(":", ".").replace("..", ".")
        parts = [p for p in s.split(".") if p != ""]
        if len(parts) == 2 and all(p.lstrip("-").isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
    raise ValueError(f"cannot read head {spec!r}; write it as 'L<layer>.H<head>' (e.g. 'L11.H3') or (layer, head)")


def _check_heads(heads, layers: int, n_heads: int) -> list[tuple[int, int]]:
    out = []
    for spec in heads:
        layer, head = parse_head(spec)
        if not 0 <= layer < layers:
            raise IndexError(f"head {spec!r}: layer {layer} is out of range for a ViT with {layers} layers "
                             f"(0..{layers - 1})")
        if not 0 <= head < n_heads:
            raise IndexError(f"head {spec!r}: head {head} is out of range for {n_heads} heads per layer "
                             f"(0..{n_heads - 1})")
        out.append((layer, head))
    return out


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
        for layer, head in _check_heads(heads, layers, n_heads):
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


def _check_supported(visual):
    for i, block in enumerate(visual.transformer.resblocks):
        attn = block.attn
        if not getattr(attn, "_qkv_same_embed_dim", True) or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError(f"block {i}: fastinterp's head masking reads a packed in_proj attention without "
                            f"bias_k/zero-attention (the standard open_clip ViT)")
        if hasattr(block, "ln_1_kv"):
            raise TypeError(f"block {i} is a cross-attention block; head masking needs a self-attention ViT")


# --------------------------------------------------------------------------------------
# the block pieces (batch-first (B, N, D) throughout)
# --------------------------------------------------------------------------------------
def _embed(visual, images):
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    return x


def _head_outputs(block, x, cls_only: bool = False):
    """(B, N, D) residual -> (B, N, H, hd) per-head attention outputs before out_proj
    (with cls_only: the class-token query only, (B, 1, H, hd))."""
    attn = block.attn
    B, N, D = x.shape
    H = attn.num_heads
    hd = D // H
    h = block.ln_1(x)
    if cls_only:
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(h[:, :1], w[:D], None if b is None else b[:D]).view(B, 1, H, hd).transpose(1, 2)
        kv = F.linear(h, w[D:], None if b is None else b[D:])
        k, v = kv.view(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N or 1, hd)
    return o.transpose(1, 2)


def _cls_pooled(visual) -> bool:
    """True when the embedding reads only the class token of the last block's output
    (pool_type 'tok', no attentional pooler): then the last block runs for that token only."""
    return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", "tok") == "tok"


def _mlp(block, x):
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _plain_block(block, x, cls_only: bool = False):
    o = _head_outputs(block, x, cls_only)
    B, N, H, hd = o.shape
    attn = block.attn
    if cls_only:
        x = x[:, :1]
    x = x + block.ls_1(F.linear(o.reshape(B, N, H * hd), attn.out_proj.weight, attn.out_proj.bias))
    return _mlp(block, x)


def _finish(visual, x):
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def _proj_args(block):
    return block.attn.out_proj.weight, block.attn.out_proj.bias


def _masked_block(block, x, masks_l, mean_l, C, backend, cls_only: bool = False):
    """x: (C*B, N, D); masks_l: (C, H) -> (C*B, N, D) ((C*B, 1, D) with cls_only)."""
    o = _head_outputs(block, x, cls_only)
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
    visual = vision_transformer(model)
    info = vit_info(model)
    _check_supported(visual)
    batches = [images] if isinstance(images, torch.Tensor) else images
    total = None
    count = 0
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc="head means", disable=not progress):
        batch = _check_images(batch, info)
        for start in range(0, batch.shape[0], batch_size):
            x = _embed(visual, batch[start:start + batch_size].to(visual.conv1.weight.device))
            sums = []
            for block in visual.transformer.resblocks:
                o = _head_outputs(block, x)
                sums.append(o.float().sum(0))
                B, N, H, hd = o.shape
                attn = block.attn
                x = x + block.ls_1(F.linear(o.reshape(B, N, H * hd), attn.out_proj.weight, attn.out_proj.bias))
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
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    visual = vision_transformer(model)
    info = vit_info(model)
    _check_supported(visual)
    masks = check_masks(masks, info.layers, info.heads)
    images = _check_images(images, info)
    device = visual.conv1.weight.device
    dtype = visual.conv1.weight.dtype
    images = images.to(device)
    C = masks.shape[0]
    B = images.shape[0]
    blocks = visual.transformer.resblocks
    L = info.layers
    n_tokens = info.num_patches + 1
    if mode == "mean":
        means = _check_means(means, info, n_tokens, device, dtype)
    else:
        means = None
    if config_chunk is not None and config_chunk < 1:
        raise ValueError(f"config_chunk must be >= 1, got {config_chunk}")

    changed = (masks != 1).reshape(C, L, -1).any(-1)  # (C, L)
    first = torch.where(changed.any(1), changed.float().argmax(1), torch.full((C,), L))
    out = torch.empty((C, B, info.output_dim), device=device, dtype=dtype)

    x = _embed(visual, images)
    l0 = int(first.min())
    cls_last = _cls_pooled(visual)  # the last block only matters for the class token
    for layer in range(l0):
        x = _plain_block(blocks[layer], x, cls_last and layer == L - 1)
    if config_chunk is None:
        # residual + MLP hidden (4x) + attention temporaries, in the model's dtype
        per_config = B * n_tokens * info.width * torch.empty((), dtype=dtype).element_size() * 8
        config_chunk = max(1, ACTIVATION_BUDGET_BYTES // per_config)
    chunk = config_chunk

    for layer in range(l0, L):
        block = blocks[layer]
        last = cls_last and layer == L - 1
        starters = (first == layer).nonzero().flatten().tolist()
        if not starters:
            x = _plain_block(block, x, last)
            continue
        # the unmasked layer, computed once for all configurations that start here
        o = _head_outputs(block, x, last)  # (B, N, H, hd); N = 1 for a class-token-only last layer
        N, H, hd = o.shape[1:]
        if last:
            x = x[:, :1]
        w, bias = _proj_args(block)
        clean_attn = F.linear(o.reshape(B, N, H * hd), w, bias)
        for s0 in range(0, len(starters), chunk):
            group = starters[s0:s0 + chunk]
            G = len(group)
            m = masks[group].to(device)  # (G, L, H)
            a = m[:, layer] - 1
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
            out[group] = _finish(visual, xs).reshape(G, B, -1)
        if (first > layer).any():
            x = x + block.ls_1(clean_attn)
            x = _mlp(block, x)
        else:
            x = None
            break
    rest = (first == L).nonzero().flatten()
    if rest.numel():
        out[rest] = _finish(visual, x).unsqueeze(0)
    return out


def single_head_ablations(model, images: torch.Tensor, layers=None, *, mode: str = "zero",
                          means: torch.Tensor | None = None, backend: str | None = None,
                          config_chunk: int | None = None):
    """Every single-head ablation of the given layers (default: the last 4).

    Returns:
        (embeddings, heads): embeddings (len(layers) * heads, B, d) in the order of `heads`,
        a list of (layer, head) pairs (layer-major).
    """
    from .models import check_layers

    info = vit_info(model)
    if layers is None:
        layers = list(range(max(0, info.layers - 4), info.layers))
    layers = check_layers(model, list(layers))
    heads = [(layer, h) for layer in layers for h in range(info.heads)]
    masks = head_set_masks((info.layers, info.heads), [[hd] for hd in heads])
    emb = masked_forward(model, images, masks, mode=mode, means=means, backend=backend, config_chunk=config_chunk)
    return emb, heads

