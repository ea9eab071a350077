"""`fastinterp mutual explain` and the mutual-knowledge section of `fastinterp demo`."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..kernels.mi import curve_auc, dataset_curve
from ..mutual import (demo_descriptor_path, demo_descriptors, explain, plot_concept_sets, plot_mi_curves,
                      plot_parts, run_dataset)
from ..vision import PART_METHODS
from ..io import text_fingerprint
from .common import add_model_args, folder_fingerprint, load_recorded_model, record_step

DEMO_CLASSES = {"astronaut": "astronaut", "coffee": "cup of coffee", "chelsea": "cat", "rocket": "rocket"}
"""Class names of the bundled demo photos (photo name -> zero-shot class)."""


def _explain_plan(args) -> tuple[dict, dict]:
    """(inputs, settings) of the run, every argument checked before a model is loaded."""
    from ..mutual import _list_classes, read_class_names

    for flag, value, low in (("--n-parts", args.n_parts, 1), ("--u", args.u, 1), ("--figures", args.figures, 0),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.descriptors and not Path(args.descriptors).is_file():
        raise FileNotFoundError(f"--descriptors {args.descriptors!r} does not exist")
    listing = _list_classes(args.folder)
    read_class_names(args.classes, listing.classes)  # the names must match the class folders
    inputs = {"images": folder_fingerprint(args.folder, [p for p, _ in listing.items]),
              "descriptors": text_fingerprint(args.descriptors or demo_descriptor_path()),
              "classes": text_fingerprint(args.classes) if args.classes else None}
    settings = {k: getattr(args, k) for k in ("parts", "n_parts", "facet", "language_from", "u", "no_crf",
                                              "figures", "batch_size")}
    return inputs, settings


def cmd_explain(args) -> int:
    inputs, settings = _explain_plan(args)
    out = Path(args.output)
    record, model, preprocess, tokenizer = load_recorded_model(args, out, "mutual explain", inputs, settings)
    record_step(out, "mutual explain", args, model, inputs=inputs, settings=settings)
    descriptors = args.descriptors or demo_descriptor_path()
    summary = run_dataset(args.folder, model, preprocess, tokenizer, descriptors, output=args.output,
                          class_names=args.classes, parts=args.parts, seed=args.seed,
                          language_from=args.language_from, figures=args.figures,
                          progress=not args.quiet, facet=args.facet, crf=not args.no_crf,
                          n_parts=args.n_parts, u=args.u, batch_size=args.batch_size)
    if summary["resumed"]:
        print(f"resuming: {summary['resumed']} image(s) of finished classes in {args.output} reused (same model, "
              f"images, descriptors, class names and settings)")
    print(f"mutual: {summary['images_with_results']} images with results "
          f"({summary['processed_this_run']} this run, {summary['resumed']} resumed, "
          f"{len(summary['unreadable'])} unreadable, empty classes: {summary['empty_classes'] or 'none'})")
    for m, v in summary["methods"].items():
        print(f"  {m:7s} MI {v['mi']:.4f}  AUC {v['auc']:.4f}  ({v['images']} images)")
    print(f"results in {args.output} (summary.json, images/, figures/)")
    return 0


def register(sub) -> None:
    """Adds `fastinterp mutual explain FOLDER ...`."""
    group = sub.add_parser("mutual", help="mutual knowledge of CLIP's image and text encoders")
    msub = group.add_subparsers(dest="mutual_command", required=True)
    p = msub.add_parser("explain", help="explain every image of an ImageFolder; MI curves and AUC")
    p.add_argument("folder", help="image folder, ImageFolder layout: FOLDER/<class>/<image>")
    add_model_args(p)
    p.add_argument("--descriptors", default=None,
                   help="descriptor bank: .txt (one per line) or .json (class -> descriptors); "
                        "default: the small built-in demo list")
    p.add_argument("--classes", default=None,
                   help="class names: .txt (the same names as the class folders, any order; '_' = space) or "
                        ".json (folder -> name, for folders named otherwise); default: the folder names")
    p.add_argument("--output", default="mutual-out", help="output folder (default: mutual-out)")
    p.add_argument("--parts", default="both", choices=["pca", "kmeans", "both"])
    p.add_argument("--n-parts", type=int, default=5)
    p.add_argument("--facet", default="tokens", choices=["tokens", "keys"])
    p.add_argument("--language-from", default="predicted", choices=["predicted", "label"],
                   help="D_y from the zero-shot prediction (paper) or the ground-truth class")
    p.add_argument("--u", type=int, default=50, help="size of D_y for the MI (default 50)")
    p.add_argument("--no-crf", action="store_true", help="skip the dense-CRF refinement")
    p.add_argument("--figures", type=int, default=1, help="part figures per class (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_explain)


def demo_section(ctx) -> str:
    """`fastinterp demo` section: the demo photos as one batch, both part methods."""
    t0 = time.perf_counter()
    names = list(ctx.images)
    class_names = [DEMO_CLASSES.get(n, n) for n in names]
    exp = explain(ctx.model, ctx.preprocess, ctx.tokenizer, [ctx.images[n] for n in names], class_names,
                  demo_descriptors(), labels=list(range(len(names))), parts="both", seed=ctx.seed,
                  cache_dir=ctx.output / "cache")
    elapsed = time.perf_counter() - t0
    curves, lines = {}, []
    for m in PART_METHODS:
        cs = [r["methods"][m]["mi_curve"] for r in exp.records]
        dc = dataset_curve(cs)
        curves[m] = dc
        lines.append(f"- {m}: dataset MI {np.mean([r['methods'][m]['mi'] for r in exp.records]):.4f}, "
                     f"AUC {curve_auc(dc):.4f}")
    plot_mi_curves(curves, ctx.output / "mutual_mi_curves.png", title="MI dynamics (demo photos)")
    b = max(range(len(names)), key=lambda i: exp.records[i]["foreground_patches"])
    plot_parts(exp.visual.images[b], exp.visual.parts["pca"].pixel_parts[b], exp.records[b], "pca",
               ctx.output / "mutual_parts.png", title=f"{names[b]}: predicted {exp.records[b]['predicted_class']}")
    plot_concept_sets(exp.records[b]["methods"]["pca"]["concept_sets"], ctx.output / "mutual_concept_sets.png",
                      image=names[b], method="pca")
    ctx.results["mutual"] = {
        "images": names,
        "seconds": round(elapsed, 2),
        "per_image": {n: {"predicted": r["predicted_class"], "foreground_patches": r["foreground_patches"],
                          **{m: {"mi": r["methods"][m]["mi"], "auc": r["methods"][m]["auc"],
                                 "vision_concepts": r["methods"][m]["vision_concepts"]} for m in PART_METHODS}}
                      for n, r in zip(names, exp.records)},
        "dataset": {m: {"curve": [float(x) for x in curves[m]], "auc": curve_auc(curves[m])} for m in PART_METHODS},
    }
    return _demo_markdown(names, exp, elapsed, lines)


def _demo_markdown(names, exp, elapsed: float, lines: list[str]) -> str:
    rows = [f"| {n} | {r['predicted_class']} | {r['foreground_patches']} | "
            + " | ".join(f"{r['methods'][m]['mi']:.3f} / {r['methods'][m]['auc']:.3f}" for m in PART_METHODS)
            + f" | {', '.join(r['methods']['pca']['vision_concepts'][:3]) or '-'} |"
            for n, r in zip(names, exp.records)]
    return "\n".join([
        "## Mutual knowledge",
        "",
        f"The {len(names)} demo photos as one batch: foreground by the second singular vector, "
        f"5 parts by PCA and K-means, visual prompts, {len(exp.descriptors)} built-in descriptors, "
        f"MI dynamics ({elapsed:.1f} s). With random weights the concepts are noise; the point is "
        "that every step runs.",
        "",
        "| photo | predicted | fg patches | MI / AUC (pca) | MI / AUC (kmeans) | top vision concepts (pca) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *lines,
        "",
        "![parts](mutual_parts.png) ![MI curves](mutual_mi_curves.png) ![concept sets](mutual_concept_sets.png)",
    ])
