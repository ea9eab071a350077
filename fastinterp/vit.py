"""The one place that knows how a CLIP ViT image tower is built.

Every method reads heads through these helpers: the tower itself (`vision_transformer`), its
shape (`vit_info`), layer and head indices (`check_layers`, `parse_head`, `check_heads`: one
rule everywhere, negative indices counting from the end), the supported-block check
(`check_blocks`) and the per-head attention computation (`head_outputs`).

Supported today: open_clip's `VisionTransformer` whose blocks are `ResidualAttentionBlock`s
with a packed-projection `torch.nn.MultiheadAttention` (the standard CLIP ViTs, with or
without LayerScale).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ViTInfo", "vision_transformer", "vit_info", "check_layers", "parse_head", "check_heads",
           "check_blocks", "head_outputs"]


@dataclass(frozen=True)
class ViTInfo:
    """Shape of an open_clip ViT image tower."""

    layers: int
    heads: int
    width: int
    head_dim: int
    output_dim: int
    patch_grid: tuple[int, int]
    image_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    def as_dict(self) -> dict:
        return asdict(self)


def vision_transformer(model):
    """The model's `open_clip.transformer.VisionTransformer`, or a clear error if it has none."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"this method needs a ViT image tower (open_clip VisionTransformer), but the model's "
            f"visual tower is {type(visual).__name__}. Use a ViT model such as 'ViT-B-16' or "
            f"'fastinterp-tiny-ViT'; ResNet and timm towers are not supported."
        )
    attn = visual.transformer.resblocks[0].attn
    if not isinstance(attn, torch.nn.MultiheadAttention):
        raise TypeError(
            f"the ViT's attention is {type(attn).__name__}; fastinterp reads the weights of "
            f"torch.nn.MultiheadAttention blocks (the standard open_clip ViT)."
        )
    return visual


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def vit_info(model) -> ViTInfo:
    """Layers, heads, width, head dim, joint-space dim, patch grid and image size of a ViT."""
    visual = vision_transformer(model)
    attn = visual.transformer.resblocks[0].attn
    return ViTInfo(
        layers=len(visual.transformer.resblocks),
        heads=attn.num_heads,
        width=visual.transformer.width,
        head_dim=attn.head_dim,
        output_dim=visual.output_dim,
        patch_grid=_pair(visual.grid_size),
        image_size=_pair(visual.image_size),
    )


def _is_index(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_layers(model, layers) -> list[int]:
    """Validate layer indices (negative counts from the end); returns them non-negative.

    `model` is a CLIP model / ViT tower, or the number of layers.
    """
    n = model if _is_index(model) else vit_info(model).layers
    out = []
    for layer in layers:
        if not _is_index(layer):
            raise TypeError(f"layer indices must be ints, got {layer!r}")
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} is out of range for a ViT with {n} layers (0..{n - 1}, "
                             f"or negative from the end)")
        out.append(int(layer) % n)
    return out


_HEAD_RE = re.compile(r"\s*L?\s*(-?\d+)\s*(?:[.:,]\s*H?|H)\s*(-?\d+)\s*", re.IGNORECASE)


def parse_head(spec) -> tuple[int, int]:
    """'L11.H3', 'l11h3', '11.3', '11:3', '11,3' or (11, 3) -> (11, 3) (not range-checked)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        layer, head = spec
        if not (_is_index(layer) and _is_index(head)):
            raise TypeError(f"head {spec!r}: layer and head must be ints")
        return int(layer), int(head)
    if isinstance(spec, str):
        m = _HEAD_RE.fullmatch(spec)
        if m:
            return int(m.group(1)), int(m.group(2))
    raise ValueError(f"cannot read head {spec!r}; write it as 'L<layer>.H<head>' (e.g. 'L11.H3') or (layer, head)")


def check_heads(heads, layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Parse and validate heads for a ViT of `layers` x `n_heads`; negative indices count from
    the end (as for layers). Returns non-negative (layer, head) pairs in the given order."""
    out = []
    for spec in heads:
        layer, head = parse_head(spec)
        if not -layers <= layer < layers:
            raise IndexError(f"head {spec!r}: layer {layer} is out of range for a ViT with {layers} layers "
                             f"(0..{layers - 1}, or negative from the end)")
        if not -n_heads <= head < n_heads:
            raise IndexError(f"head {spec!r}: head {head} is out of range for {n_heads} heads per layer "
                             f"(0..{n_heads - 1}, or negative from the end)")
        out.append((layer % layers, head % n_heads))
    return out


def check_blocks(visual, method: str) -> None:
    """Refuse a tower whose blocks are not plain pre-norm self-attention blocks with a packed
    q/k/v projection (what every method's per-head computation reads), naming the block."""
    for i, block in enumerate(visual.transformer.resblocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention):
            raise TypeError(f"block {i}: {method} reads torch.nn.MultiheadAttention blocks (the standard "
                            f"open_clip ViT); this block's attention is {type(attn).__name__}")
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError(f"block {i}: {method} reads a packed in_proj attention without bias_k / "
                            f"zero-attention (the standard open_clip ViT)")
        if hasattr(block, "ln_1_kv") or hasattr(block, "ln_attn") or hasattr(block, "ln_inner"):
            raise TypeError(f"block {i} is not a plain pre-norm residual self-attention block; {method} "
                            f"supports the standard open_clip ResidualAttentionBlock")


def head_outputs(block, x: torch.Tensor, *, cls_only: bool = False) -> torch.Tensor:
    """Each head's attention output before the output projection.

    x: (B, N, D) residual stream entering `block` (batch first). Returns (B, N, H, hd), or
    (B, 1, H, hd) with `cls_only` (the class-token query alone, for a last layer that only
    feeds the class token). The sum over heads of `o[..., h, :] @ W_o[:, h].T`, plus the
    out_proj bias, is the block's attention output.
    """
    attn = block.attn
    B, N, D = x.shape
    H = attn.num_heads
    hd = D // H
    h = block.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    if cls_only:
        q = F.linear(h[:, :1], w[:D], None if b is None else b[:D]).view(B, 1, H, hd).transpose(1, 2)
        kv = F.linear(h, w[D:], None if b is None else b[D:])
        k, v = kv.view(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        qkv = F.linear(h, w, b)
        q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N or 1, hd)
    return o.transpose(1, 2)
