"""Reference head ablation (SPEC.md 2.4), written plainly for parity tests and benchmarks.

- Zero pruning as the CCS reference does it: copy the model, and for every pruned head
  zero its query rows of `in_proj_weight` (and the query bias) and its columns of
  `out_proj.weight`; keep the out_proj bias; run the whole forward again.
- Mean-ablation / soft masking through forward hooks: each attention module's output is
  recomputed head by head in a Python loop, with head h's output o_h replaced by
  `m * o_h + (1 - m) * r_h` (r_h = 0 or the head's dataset mean per token).
"""
from __future__ import annotations

import contextlib
import copy

import torch


def _heads(model):
    visual = model.visual
    return visual.transformer.resblocks


def zero_heads_(model, heads) -> None:
    """In place: zero each (layer, head)'s query rows, query bias and out_proj columns."""
    blocks = _heads(model)
    with torch.no_grad():
        for layer, head in heads:
            attn = blocks[layer].attn
            hd = attn.embed_dim // attn.num_heads
            rows = slice(head * hd, (head + 1) * hd)
            attn.in_proj_weight[rows, :] = 0
            attn.in_proj_bias[rows] = 0
            attn.out_proj.weight[:, rows] = 0


def pruned_copy(model, heads):
    """A deep copy of the model with the heads pruned (the CCS reference's `modify`)."""
    pruned = copy.deepcopy(model)
    zero_heads_(pruned, heads)
    return pruned


@contextlib.contextmanager
def zeroed_heads(model, heads):
    """Prune the heads in place for the duration of the block, then restore the weights
    (the same forward as `pruned_copy` without copying the model)."""
    blocks = _heads(model)
    saved = []
    for layer, head in heads:
        attn = blocks[layer].attn
        saved.append((attn, attn.in_proj_weight.detach().clone(), attn.in_proj_bias.detach().clone(),
                      attn.out_proj.weight.detach().clone()))
    zero_heads_(model, heads)
    try:
        yield model
    finally:
        with torch.no_grad():
            for attn, w_in, b_in, w_out in reversed(saved):
                attn.in_proj_weight.copy_(w_in)
                attn.in_proj_bias.copy_(b_in)
                attn.out_proj.weight.copy_(w_out)


@torch.no_grad()
def pruned_encode(model, images, heads, *, copy_model: bool = True):
    """(B, d) unnormalised image embeddings of the model with `heads` pruned."""
    if copy_model:
        return pruned_copy(model, heads).encode_image(images, normalize=False)
    with zeroed_heads(model, heads):
        return model.encode_image(images, normalize=False)


def _attention_by_head(attn, x, mask_row, replacement, record=None):
    """x: (B, N, D) batch-first input of the attention; loops over heads."""
    B, N, D = x.shape
    H = attn.num_heads
    hd = D // H
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    out = attn.out_proj.bias.expand(B, N, D).clone()
    for h in range(H):
        rq = slice(h * hd, (h + 1) * hd)
        rk = slice(D + h * hd, D + (h + 1) * hd)
        rv = slice(2 * D + h * hd, 2 * D + (h + 1) * hd)
        q = x @ w_in[rq].T + b_in[rq]
        k = x @ w_in[rk].T + b_in[rk]
        v = x @ w_in[rv].T + b_in[rv]
        weights = torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5, dim=-1)
        o = weights @ v  # (B, N, hd)
        if record is not None:
            record.append(o.clone())
        m = float(mask_row[h])
        r = 0.0 if replacement is None else replacement[:, h]
        o = m * o + (1.0 - m) * r
        out = out + o @ attn.out_proj.weight[:, rq].T
    return out


@torch.no_grad()
def hooked_encode(model, images, mask, *, means=None):
    """(B, d) embeddings with head outputs replaced through forward hooks.

    mask: (layers, heads) in [0, 1]; means: (layers, tokens, heads, hd) or None (zero).
    """
    handles = []
    for layer, block in enumerate(_heads(model)):
        def hook(module, inputs, output, layer=layer):
            x = inputs[0]
            if not module.batch_first:
                x = x.transpose(0, 1)
            rep = None if means is None else means[layer]
            out = _attention_by_head(module, x, mask[layer], rep)
            if not module.batch_first:
                out = out.transpose(0, 1)
            return (out, None)
        handles.append(block.attn.register_forward_hook(hook))
    try:
        return model.encode_image(images, normalize=False)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def hooked_head_means(model, images):
    """(layers, tokens, heads, hd): mean over images of each head's output, via hooks."""
    records = {}
    handles = []
    for layer, block in enumerate(_heads(model)):
        def hook(module, inputs, output, layer=layer):
            x = inputs[0]
            if not module.batch_first:
                x = x.transpose(0, 1)
            rec = []
            ones = torch.ones(module.num_heads)
            out = _attention_by_head(module, x, ones, None, record=rec)
            records[layer] = torch.stack(rec, dim=2)  # (B, N, H, hd)
            if not module.batch_first:
                out = out.transpose(0, 1)
            return (out, None)
        handles.append(block.attn.register_forward_hook(hook))
    try:
        model.encode_image(images, normalize=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([records[i].mean(0) for i in range(len(records))])
