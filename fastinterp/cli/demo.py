"""`fastinterp demo`: the offline main job.

Loads a random-weight ViT (or real weights if given), encodes the built-in concept list,
embeds a few bundled photos, and writes `report.md`, `report.json` and a figure into the
output folder. Each method adds a section through `SECTIONS`.
"""
from __future__ import annotations

import importlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..concepts import ConceptDictionary
from ..images import demo_images
from ..models import TINY_MODEL, load_clip
from ..vit import ViTInfo, vit_info
from ..io import atomic_write_text
from .common import add_model_args, record_step

SECTIONS: tuple[str, ...] = (
    # "module:function" entries, each `fn(ctx: DemoContext) -> str` (a Markdown section);
    # each command group's module adds its own here.
    "fastinterp.cli.sith:demo_section",
    "fastinterp.cli.mutual:demo_section",
    "fastinterp.cli.ccs:demo_section",
    "fastinterp.cli.ccs:prune_demo_section",
)


@dataclass
class DemoContext:
    """What every demo section can use."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    info: ViTInfo
    dictionary: ConceptDictionary
    concept_embeddings: torch.Tensor  # (M, d) raw text embeddings
    images: dict  # name -> PIL image
    output: Path
    seed: int
    results: dict = field(default_factory=dict)  # sections put their JSON-able numbers here


def _nearest_concepts_figure(ctx: DemoContext, image_emb: torch.Tensor, path: Path, k: int = 5) -> dict:
    from matplotlib.figure import Figure

    text = F.normalize(ctx.concept_embeddings, dim=-1)
    sims = F.normalize(image_emb, dim=-1) @ text.T
    top = sims.topk(k, dim=-1)
    names = list(ctx.images)
    fig = Figure(figsize=(3.2 * len(names), 4.0))
    axes = fig.subplots(1, len(names))
    nearest = {}
    for ax, name, vals, idx in zip(axes, names, top.values, top.indices):
        concepts = [ctx.dictionary[i] for i in idx.tolist()]
        nearest[name] = [{"concept": c, "cosine": round(float(v), 4)} for c, v in zip(concepts, vals)]
        ax.imshow(ctx.images[name])
        ax.set_axis_off()
        ax.set_title(name, fontsize=10)
        ax.text(0.0, -0.05, "\n".join(f"{c} ({v:.2f})" for c, v in zip(concepts, vals.tolist())),
                transform=ax.transAxes, va="top", fontsize=8)
    fig.suptitle(f"nearest concepts by cosine ({ctx.model.fastinterp_name}, weights: {ctx.model.fastinterp_weights})")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return nearest


def run_demo(output: str | Path = "fastinterp-out", *, model_name: str = TINY_MODEL,
             pretrained: str | None = None, checkpoint: str | None = None, device: str = "cpu",
             seed: int = 0, progress: bool = True) -> Path:
    """Run the demo; returns the path of the Markdown report."""
    t0 = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device=device, checkpoint=checkpoint)
    info = vit_info(model)
    dictionary = ConceptDictionary.builtin("demo")
    emb = dictionary.encode(model, tokenizer, cache_dir=output / "cache", progress=progress)
    ctx = DemoContext(model, preprocess, tokenizer, info, dictionary, emb, demo_images(), output, seed)

    with torch.no_grad():
        batch = torch.stack([preprocess(im) for im in ctx.images.values()]).to(device)
        image_emb = model.encode_image(batch, normalize=False).float().cpu()
    nearest = _nearest_concepts_figure(ctx, image_emb, output / "nearest_concepts.png")

    import fastinterp.kernels as K

    lines = [
        "# fastinterp demo report",
        "",
        f"- model: `{model_name}`, weights: `{model.fastinterp_weights}`, device: `{device}`",
        f"- ViT: {info.layers} layers, {info.heads} heads, width {info.width}, head dim {info.head_dim}, "
        f"joint dim {info.output_dim}, patch grid {info.patch_grid}, image {info.image_size}",
        f"- dictionary: `{dictionary.name}`, {len(dictionary)} concepts, embeddings {tuple(emb.shape)}",
        f"- kernel backends available: {K.available_backends()}",
        "",
        "## Nearest concepts per demo photo",
        "",
        "With random weights these are meaningless; the point is that the whole path runs.",
        "",
        "![nearest concepts](nearest_concepts.png)",
        "",
    ]
    for name, items in nearest.items():
        lines.append(f"- **{name}**: " + ", ".join(f"{d['concept']} ({d['cosine']:.3f})" for d in items))
    for entry in SECTIONS:
        module, func = entry.split(":")
        lines += ["", getattr(importlib.import_module(module), func)(ctx)]
    elapsed = time.perf_counter() - t0
    lines += ["", f"_Finished in {elapsed:.1f} s on {platform.machine()} ({platform.python_version()})._", ""]

    report = output / "report.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(output / "report.json", json.dumps({
        "model": model_name,
        "weights": model.fastinterp_weights,
        "vit": info.as_dict(),
        "dictionary": {"name": dictionary.name, "size": len(dictionary)},
        "nearest_concepts": nearest,
        "sections": ctx.results,
        "seconds": round(elapsed, 2),
    }, indent=2))
    # the demo always starts its folder afresh (another model or seed is fine): a new record
    (output / "run.json").unlink(missing_ok=True)
    record_step(output, "demo", SimpleNamespace(model_name=model_name, pretrained=pretrained, checkpoint=checkpoint,
                                                seed=seed), model,
                settings={"dictionary": dictionary.name, "device": str(device)},
                inputs={"images": sorted(ctx.images)})
    return report


def cmd_demo(args) -> int:
    report = run_demo(args.output, model_name=args.model_name, pretrained=args.pretrained,
                      checkpoint=args.checkpoint, device=args.device, seed=args.seed,
                      progress=not args.quiet)
    print(f"demo report written to {report}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: random-weight ViT, built-in concepts, report folder")
    add_model_args(p)
    p.add_argument("--output", default="fastinterp-out", help="output folder (default: fastinterp-out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
