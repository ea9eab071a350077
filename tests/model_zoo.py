"""Walk open_clip's model list: build each config's image tower small, check every method's
invariant on it (or that it refuses with a TypeError), and write the support table.

    python tests/model_zoo.py            # print the table
    python tests/model_zoo.py --write    # rewrite docs/model_support.md

Towers are built at reduced depth / width (2 blocks, width 64, 4 heads; open_clip ViTs also
at a 4 x 4 patch grid) with random weights and no download: open_clip ViT configs through
`open_clip.model._build_vision_tower`, timm-tower configs through open_clip's `TimmModel` with
timm's constructor given the small sizes (towers fastinterp cannot read are first built on
the meta device, full size, only to check the refusal). Text towers are not built: the
methods here read the image tower only.
"""
from __future__ import annotations

import contextlib
import re
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "model_support.md"
TOL = 1e-5
METHODS = {
    "masked_forward": "masked_forward / pruning / CCS (all-ones mask == encode_image; zero-ablating a head == "
                      "zeroing its output columns)",
    "mean_ablation": "mean ablation (head_output_means; all-ones mask == encode_image)",
    "textspan": "head_contributions / TextSpan (terms sum to the embedding)",
    "sith_vo": "SITH VO matrices (one-token attention == sum of VO maps + bias, LayerScale folded; each map == "
               "the explicit per-head W_v^T W_o^T)",
    "sith_project": "SITH projection (final residual's class token / mean -> the embedding)",
    "mutual": "mutual-knowledge patch features (tokens / keys == the tower's own)",
}


class _Clip(torch.nn.Module):
    """A CLIP-like wrapper around a bare image tower (what the methods take)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def encode_image(self, x, normalize: bool = False):
        out = self.visual(x)
        out = out[0] if isinstance(out, tuple) else out
        return F.normalize(out, dim=-1) if normalize else out


def _small_open_clip_cfg(vcfg: dict) -> dict:
    v = copy.deepcopy(vcfg)
    if isinstance(v.get("layers"), (list, tuple)):  # ModifiedResNet
        v.update(layers=[1, 1, 1, 1], width=8, image_size=64)
        return v
    patch = v.get("patch_size", 16)
    v.update(layers=2, width=64, head_width=16, image_size=4 * patch)
    if v.get("attentional_pool"):
        v.update(attn_pooler_heads=4, attn_pooler_queries=8)
    return v


@contextlib.contextmanager
def _small_timm(**small):
    import timm

    original = timm.create_model

    def create(name, *args, **kwargs):
        kwargs.update(small)
        return original(name, *args, **kwargs)

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = original


def build_tower(name: str):
    """(model, note): the config's image tower, small, wrapped; or (meta-device full-size
    tower, note) for towers fastinterp refuses (only their refusal is checked)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    from fastinterp.vit import vit_view

    cfg = open_clip.get_model_config(name)
    vcfg, embed = dict(cfg["vision_cfg"]), 32
    vcfg.pop("timm_model_pretrained", None)
    quick = cfg.get("quick_gelu", False)
    if not vcfg.get("timm_model_name"):
        torch.manual_seed(0)
        return _Clip(_build_vision_tower(embed, _small_open_clip_cfg(vcfg), quick_gelu=quick).eval()), "small"
    with torch.device("meta"):
        meta = _Clip(_build_vision_tower(embed, vcfg, quick_gelu=quick))
    try:
        vit_view(meta)
    except TypeError:
        return meta, "meta"
    for small in (dict(depth=2, embed_dim=64, num_heads=4), dict(depth=2)):  # hybrid stems fix the width
        torch.manual_seed(0)
        try:
            with _small_timm(**small):
                return _Clip(_build_vision_tower(embed, vcfg, quick_gelu=quick).eval()), "small"
        except (AssertionError, TypeError, ValueError):
            continue
    raise RuntimeError(f"{name}: cannot build a small tower")


def _close(a, b) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _outcome(fn):
    """'exact', or 'refused: <message>' for a TypeError; an invariant failure raises."""
    try:
        err = fn()
    except TypeError as e:
        msg = str(e).split(". Supported:")[0]
        if "support" not in msg and "needs" not in msg:  # an accidental TypeError is no refusal
            raise AssertionError(f"unclear TypeError: {msg}") from e
        return "refused: " + re.sub(r" \([a-z0-9_]+\)", "", msg)
    if err is not None and not err <= TOL:
        raise AssertionError(f"invariant off by {err:.3g} (> {TOL})")
    return "exact"


def _images(model):
    from fastinterp.vit import vit_info

    torch.manual_seed(1)
    try:
        size = vit_info(model).image_size
    except TypeError:  # a refused tower: the method under test must refuse too
        size = getattr(model.visual, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    device = next(model.parameters()).device
    return torch.randn(2, 3, *size, device=device)


def _check_masked(model):
    from fastinterp.ablation import masked_forward
    from fastinterp.vit import vit_info, vit_view

    info, x = vit_info(model), _images(model)
    ref = model.encode_image(x)
    ones = masked_forward(model, x, torch.ones(1, info.layers, info.heads))[0]
    err = _close(ones, ref)
    mask = torch.ones(1, info.layers, info.heads)
    mask[0, 0, 1] = 0
    w = vit_view(model).blocks[0].out_weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, info.head_dim:2 * info.head_dim] = 0
        ref0 = model.encode_image(x)
        w.copy_(saved)
    return max(err, _close(masked_forward(model, x, mask)[0], ref0))


def _check_mean(model):
    from fastinterp.ablation import head_output_means, masked_forward
    from fastinterp.vit import vit_info

    info, x = vit_info(model), _images(model)
    means = head_output_means(model, x)
    mask = torch.ones(2, info.layers, info.heads)
    mask[1, -1, 0] = 0
    out = masked_forward(model, x, mask, mode="mean", means=means)
    assert torch.isfinite(out).all()
    return _close(out[0], model.encode_image(x))


def _check_textspan(model):
    from fastinterp.textspan import head_contributions

    x = _images(model)
    c = head_contributions(model, x, progress=False)
    total = c.heads.sum((1, 2)) + c.mlps.sum(1) + c.other
    return max(_close(total, c.embedding), _close(c.embedding, model.encode_image(x, normalize=True)))


def _check_sith_vo(model):
    from fastinterp.sith import vo_matrices
    from fastinterp.vit import vit_view

    w, bias = vo_matrices(model, -1, fold_ln=False, return_bias=True)
    torch.manual_seed(2)
    y = torch.randn(1, 1, w.shape[1])
    if vit_view(model).family == "open_clip ViT":  # the module itself on one token (attention weight 1)
        block = model.visual.transformer.resblocks[-1]
        out = block.ls_1(block.attn(y, y, y, need_weights=False)[0])
    else:
        block = model.visual.trunk.blocks[-1]
        out = block.ls1(block.attn(y))
    err = _close(torch.einsum("d,hde->e", y[0, 0], w) + bias, out[0, 0])
    return max(err, _check_vo_product(model, w))


def _check_vo_product(model, w):
    """Each VO matrix == the explicit W_v[h]^T W_o[:, h]^T of the module's weights (LayerScale folded)."""
    from fastinterp.vit import vit_view

    b = vit_view(model).blocks[-1]
    H, hd = b.heads, b.head_dim
    gamma = b.layer_scale if b.layer_scale is not None else torch.ones(b.out_weight.shape[0])
    err = 0.0
    for h in range(H):
        w_v = b.qkv_weight[2 * H * hd + h * hd:2 * H * hd + (h + 1) * hd]  # (hd, D)
        w_o = gamma[:, None] * b.out_weight[:, h * hd:(h + 1) * hd]  # (D, hd)
        err = max(err, _close(w[h], w_v.T @ w_o.T))
    return err


def _check_sith_project(model):
    from fastinterp.sith import project
    from fastinterp.vit import vit_view

    try:
        view, x = vit_view(model), _images(model)
    except TypeError:
        project(model, torch.zeros(1, 1))  # must refuse too
        raise AssertionError("project accepted a tower the ViT view refuses")
    final = view.embed(x)
    for block in view.blocks:
        final = block.mlp_residual(final + block.ls_1(_attn(block, final)))
    pooled = final[:, 0] if view.pooling == "tok" else final[:, view.prefix_tokens:].mean(1)
    return _close(project(model, pooled), model.encode_image(x, normalize=True))


def _attn(block, x):
    from fastinterp.vit import head_outputs

    o = head_outputs(block, x)
    return F.linear(o.flatten(2), block.out_weight, block.out_bias)


def _check_mutual(model):
    from fastinterp.vision import patch_features
    from fastinterp.vit import vit_view

    x = _images(model)
    tokens, emb = patch_features(model, x, facet="tokens")
    keys, _ = patch_features(model, x, facet="keys")
    view = vit_view(model)
    h = view.embed(x)
    for block in view.blocks[:-1]:
        h = block.mlp_residual(h + block.ls_1(_attn(block, h)))
    last = view.blocks[-1]
    D = view.info.width
    ref_keys = F.linear(last.norm(h), last.qkv_weight[D:2 * D])[:, view.prefix_tokens:]
    h = last.mlp_residual(h + last.ls_1(_attn(last, h)))
    return max(_close(tokens, h[:, view.prefix_tokens:]), _close(keys, ref_keys), _close(emb, model.encode_image(x)))


CHECKS = {"masked_forward": _check_masked, "mean_ablation": _check_mean, "textspan": _check_textspan,
          "sith_vo": _check_sith_vo, "sith_project": _check_sith_project, "mutual": _check_mutual}


def family(name: str) -> str:
    import open_clip

    v = open_clip.get_model_config(name)["vision_cfg"]
    if v.get("timm_model_name"):
        return f"timm {v['timm_model_name']} (pool={v.get('timm_pool') or 'default'})"
    if isinstance(v.get("layers"), (list, tuple)):
        return "open_clip ModifiedResNet"
    opts = [k for k in ("attentional_pool", "ls_init_value", "final_ln_after_pool", "no_ln_pre") if v.get(k)]
    pool = v.get("pool_type", "tok")
    return "open_clip ViT" + (f" pool={pool}" if pool != "tok" else "") + (f" [{', '.join(opts)}]" if opts else "")


def check_model(name: str) -> dict:
    """{method: 'exact' | 'refused: ...'} for one config (AssertionError on a wrong answer)."""
    model, _ = build_tower(name)
    out = {}
    for method, check in CHECKS.items():
        try:
            with torch.no_grad():
                out[method] = _outcome(lambda: check(model))
        except AssertionError as e:
            raise AssertionError(f"{name}: {method}: {e}") from None
    return out


def signature(name: str):
    """Configs whose small towers are the same build share one check: open_clip ViT configs
    are each built (cheap); timm towers by architecture without its resolution suffix (e.g.
    ViTamin-L2-256/336/384), pool and projection, checked on the smallest image size."""
    import re

    import open_clip

    v = open_clip.get_model_config(name)["vision_cfg"]
    if not v.get("timm_model_name"):
        return name
    return (re.sub(r"_\d+$", "", v["timm_model_name"]), v.get("timm_pool"), v.get("timm_proj"))


def walk(names=None) -> dict:
    import open_clip

    from fastinterp.models import _register_configs

    _register_configs()  # fastinterp's own configs are in the list whatever ran before (test order)
    names = list(names or open_clip.list_models())
    groups: dict = {}
    for n in names:
        groups.setdefault(signature(n), []).append(n)
    out = {}
    for members in groups.values():
        size = lambda n: str(open_clip.get_model_config(n)["vision_cfg"].get("image_size", 0))  # noqa: E731
        res = check_model(min(members, key=lambda n: (len(size(n)), size(n))))
        out.update({n: res for n in members})
    return out


def table(results: dict) -> str:
    """Markdown: one row per family (the configs that share it listed), one column per method."""
    import open_clip

    rows: dict = {}
    for name, res in results.items():
        key = (family(name), tuple(res[m] for m in METHODS))
        rows.setdefault(key, []).append(name)
    lines = ["# Model support", "",
             f"Generated by `python tests/model_zoo.py --write` from open_clip {open_clip.__version__}'s "
             f"model list ({len(results)} configs); tests/test_model_zoo.py fails when it is stale.",
             "Each cell is **exact** (the invariant holds to 1e-5 on a small random-weight tower of that "
             "config) or **refused** (a TypeError saying why). Methods:", ""]
    lines += [f"- `{m}`: {d}" for m, d in METHODS.items()]
    lines += ["", "| family | configs | " + " | ".join(METHODS) + " |", "|" + "---|" * (len(METHODS) + 2)]
    reasons: dict = {}
    for (fam, res), names in sorted(rows.items()):
        cells = []
        for r in res:
            if r == "exact":
                cells.append("exact")
            else:
                i = reasons.setdefault(r[len("refused: "):], len(reasons) + 1)
                cells.append(f"refused [{i}]")
        lines.append(f"| {fam} | {', '.join(sorted(names))} | " + " | ".join(cells) + " |")
    lines += ["", "Refusals:", ""] + [f"{i}. {r}" for r, i in reasons.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = table(walk())
    if "--write" in sys.argv:
        TABLE.parent.mkdir(exist_ok=True)
        TABLE.write_text(text)
        print(f"wrote {TABLE}")
    else:
        print(text)
