"""`fastinterp ccs textspan|label|score|prune` and the CCS and head-pruning sections of
`fastinterp demo`.

Every command keeps a run record (`run.json`) in its output folder: `textspan` records the
model, the image folder, the text bank and its settings; `label` and `score` take the model
from it (their model flags default to the record) and record the labeller (LLM model and
base URL, or the CLIP model, vocabulary fingerprint and threshold); `score` judges with the
labeller `label` used unless told otherwise; `prune` takes the model from the CCS folder.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

import torch

from ..ablation import MODES, head_set_masks
from ..ccs import (describe_heads, label_heads, read_descriptions, read_labeller, read_labels, run_ccs, score_heads,
                   write_results)
from ..io import read_run_record, text_fingerprint
from ..pruning import HeadSet, build_head_sets, read_ccs_table, run_pruning
from ..pruning import write_results as write_pruning_results
from ..vit import check_layers, parse_head
from .common import (add_model_args, adopt_record_model, check_weights, differences, folder_fingerprint,
                     input_fingerprint, load_model, load_recorded_model, public_url, record_step)


def _key(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def _texts_sha(texts) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------
# ccs textspan | label | score
# --------------------------------------------------------------------------------------
LABELLER_FLAGS = ("labeller", "llm_model", "base_url", "vocabulary", "threshold")


def _folder_record(output: Path) -> dict | None:
    """The folder's run record; for folders of older versions (no run.json), the model name
    descriptions.json names."""
    record = read_run_record(output)
    if record is None:
        from ..io import read_json

        name = (read_json(output / "descriptions.json") or {}).get("model")
        record = {"model": {"name": name, "pretrained": None, "checkpoint": None, "seed": 0}} if name else None
    return record


def _vocabulary_spec(path: str | None) -> dict:
    from ..concepts import ConceptDictionary

    if path is None:
        return {"builtin": "demo", "sha256": _texts_sha(ConceptDictionary.builtin("demo").texts)}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--vocabulary {path!r} does not exist; give a text file, one concept per line")
    return {"path": str(Path(path).resolve()), **text_fingerprint(path)}


def _labeller_spec(args, recorded: dict | None) -> dict:
    """The labeller to use: the recorded one (labels.json's) where no labeller flag was
    given, with any given flag applied over it."""
    given = {k: getattr(args, k) for k in LABELLER_FLAGS if getattr(args, k, None) is not None}
    base = dict(recorded or {}) if not given.get("labeller") or given["labeller"] == (recorded or {}).get("kind") \
        else {}
    kind = given.get("labeller") or base.get("kind") or "openai"
    if kind == "openai":
        from ..llm import OpenAIChat

        probe = OpenAIChat(given.get("base_url") or base.get("base_url"), given.get("llm_model") or base.get("llm_model"),
                           api_key="")
        return {"kind": "openai", "llm_model": probe.model, "base_url": public_url(probe.base_url)}
    if "vocabulary" in given or "vocabulary" not in base:
        vocab = _vocabulary_spec(given.get("vocabulary"))
    else:  # the recorded vocabulary: the same file, unchanged
        vocab = base["vocabulary"]
        if "path" in vocab and _vocabulary_spec(vocab["path"])["sha256"] != vocab["sha256"]:
            raise ValueError(f"the vocabulary {vocab['path']!r} the labels were made with has changed since; pass "
                             f"--vocabulary to label with it as it is now")
    threshold = given.get("threshold", base.get("threshold", 0.3))
    return {"kind": "clip", "vocabulary": vocab, "threshold": float(threshold)}


def _build_labeller(args, spec: dict, record):
    """(labeller, identity, model or None) for a labeller spec; the identity is what labels
    and judgements record (never an API key)."""
    from ..llm import ClipLabeller, LLMLabeller, OpenAIChat

    if spec["kind"] == "openai":
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        client = OpenAIChat(spec["base_url"], spec["llm_model"], key, timeout=args.timeout, max_retries=args.retries,
                            backoff=args.backoff)
        return LLMLabeller(client), spec, None
    from ..concepts import ConceptDictionary

    model, _, tokenizer = load_model(args)
    check_weights(record, model, args.output)
    from ..models import weights_hash

    vocab = spec["vocabulary"]
    words = ConceptDictionary.from_file(vocab["path"]) if "path" in vocab else ConceptDictionary.builtin("demo")
    labeller = ClipLabeller(model, tokenizer, words, threshold=spec["threshold"], progress=not args.quiet)
    identity = {**spec, "model": args.model_name, "weights_sha256": weights_hash(model)}
    return labeller, identity, model


def _add_labeller_args(p) -> None:
    add_model_args(p)
    p.add_argument("--output", required=True, help="the folder `fastinterp ccs textspan` wrote")
    p.add_argument("--labeller", choices=("openai", "clip"), default=None,
                   help="openai: an OpenAI-compatible chat endpoint (the paper's LLM steps); clip: offline CLIP "
                        "text similarity to a vocabulary (default: the labeller labels.json records, else openai)")
    p.add_argument("--base-url", default=None, help="chat endpoint root (default: the recorded one, else "
                                                    "$FASTINTERP_LLM_BASE_URL, $OPENAI_BASE_URL, https://api.openai.com/v1)")
    p.add_argument("--llm-model", default=None, help="LLM name (default: the recorded one, else "
                                                     "$FASTINTERP_LLM_MODEL or gpt-4o)")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key (default: $FASTINTERP_LLM_API_KEY / $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per LLM request (default 60)")
    p.add_argument("--retries", type=int, default=3, help="retries per LLM request (default 3)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each retry")
    p.add_argument("--vocabulary", default=None, help="clip labeller: concept file, one per line (default: the "
                                                      "recorded one, else the built-in demo list)")
    p.add_argument("--threshold", type=float, default=None,
                   help="clip labeller: centred-cosine threshold for 'consistent' (default: the recorded one, else 0.3)")
    p.add_argument("--heads", nargs="+", default=None, metavar="L11.H0", help="only these heads (default: all described)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _textspan_plan(args, listing, texts) -> tuple[dict, dict]:
    """(inputs, settings) of a textspan run, checked before any model is loaded."""
    layers = None
    if args.layers:
        try:
            layers = [int(v) for v in args.layers.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: give comma-separated layer numbers, e.g. 8,9,10,11") from None
        if not layers:
            raise ValueError(f"--layers {args.layers!r} lists no layer")
    elif args.last_layers < 1:
        raise ValueError(f"--last-layers must be >= 1, got {args.last_layers}")
    for flag, value in (("--n-texts", args.n_texts), ("--rank", args.rank), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    inputs = {"images": folder_fingerprint(args.images, [p for p, _ in listing.items]),
              "texts": input_fingerprint(args.texts, builtin="built-in text bank") | {"sha256_lines": _texts_sha(texts)}}
    settings = {"layers": layers, "last_layers": None if layers else args.last_layers, "n_texts": args.n_texts,
                "rank": args.rank, "batch_size": args.batch_size}
    return inputs, settings


def cmd_textspan(args) -> int:
    from ..images import list_image_folder
    from ..textspan import builtin_text_bank, read_text_bank
    from ..vit import vit_info

    listing = list_image_folder(args.images)  # clear errors for missing / empty folders
    texts = read_text_bank(args.texts) if args.texts else builtin_text_bank()
    inputs, settings = _textspan_plan(args, listing, texts)
    out = Path(args.output)
    record, model, preprocess, tokenizer = load_recorded_model(args, out, "ccs textspan", inputs, settings)
    n_layers = vit_info(model).layers
    if settings["layers"]:
        layers = settings["layers"]
    else:
        if not 1 <= args.last_layers <= n_layers:
            raise IndexError(f"--last-layers {args.last_layers} is out of range for a ViT with {n_layers} layers")
        layers = list(range(n_layers - args.last_layers, n_layers))
    check_layers(model, layers)  # before the record: a refused run leaves no trace
    record_step(out, "ccs textspan", args, model, inputs=inputs, settings=settings)
    done = len(list((out / "contributions").glob("batch_*.pt")))
    if done:
        print(f"resuming: {done} finished contribution batch(es) in {out / 'contributions'} are reused "
              f"(same model, images, text bank and settings)")
    records = describe_heads(model, [p for p, _ in listing.items], texts, tokenizer=tokenizer, preprocess=preprocess,
                             layers=layers, n_texts=args.n_texts, rank=args.rank, batch_size=args.batch_size,
                             output=args.output, progress=not args.quiet)
    print(f"{len(records)} heads described from {len(listing.items)} images and {len(texts)} texts; "
          f"written to {os.path.join(args.output, 'descriptions.json')} (and descriptions.txt)")
    return 0


def _check_heads(records, heads) -> None:
    if heads:
        have = {(r["layer"], r["head"]) for r in records}
        missing = [h for h in heads if parse_head(h) not in have]
        if missing:
            raise IndexError(f"--heads {' '.join(missing)}: no descriptions for them in this folder")


def _open_labelling(args, step: str, recorded_labeller):
    """Shared start of label / score: descriptions, record, model flags, labeller."""
    out = Path(args.output)
    records = read_descriptions(out)
    _check_heads(records, args.heads)
    record = _folder_record(out)
    adopt_record_model(args, record, out)
    spec = _labeller_spec(args, recorded_labeller)
    labeller, identity, model = _build_labeller(args, spec, record)
    return out, records, labeller, identity, model


def cmd_label(args) -> int:
    out, records, labeller, identity, model = _open_labelling(args, "ccs label", read_labeller(Path(args.output)))
    stats: dict = {}
    labels = label_heads(records, labeller, output=out, heads=args.heads, progress=not args.quiet,
                         labeller_id=identity, stats=stats)
    record_step(out, "ccs label", args, model, settings={"labeller": identity})
    if stats["reused"]:
        print(f"resuming: {stats['reused']} label(s) in labels.json reused (same labeller, same descriptions)")
    for k, v in labels.items():
        print(f"{k}\t{v}")
    print(f"{len(labels)} labels written to {os.path.join(args.output, 'labels.json')} (labeller: {identity['kind']})")
    return 0


def cmd_score(args) -> int:
    labels_by = read_labeller(Path(args.output))
    labels = read_labels(args.output)
    out, records, labeller, identity, model = _open_labelling(args, "ccs score", labels_by)
    stats: dict = {}
    scores = score_heads(records, labels, labeller, output=out, heads=args.heads, progress=not args.quiet,
                         labeller_id=identity, stats=stats)
    summary = write_results(scores, out, meta={"labeller": identity, "labels_by": labels_by})
    record_step(out, "ccs score", args, model, settings={"labeller": identity, "labels_by": labels_by})
    if stats["reused"]:
        print(f"resuming: {stats['reused']} head(s) of judgements.json reused (same labeller, label, descriptions)")
    for s in scores:
        print(f"{_key(s.layer, s.head)}\t{s.label}\tCCS={s.ccs}\t{s.bucket}")
    print("CCS@K: " + ", ".join(f"{k}: {v:.3f}" for k, v in summary["ccs_at_k"].items()))
    print(f"results written to {os.path.join(args.output, 'ccs.csv')} and ccs.json")
    return 0


# --------------------------------------------------------------------------------------
# ccs prune
# --------------------------------------------------------------------------------------
def _parse_explicit(values) -> dict:
    out = {}
    for i, v in enumerate(values or []):
        name, sep, heads = v.partition("=")
        if not sep:
            name, heads = f"heads-{i + 1}", v
        heads = [h for h in heads.replace(";", ",").replace(" ", ",").split(",") if h.strip()]
        if not heads:
            raise ValueError(f"--heads {v!r} lists no heads; write NAME=L11.H0,L10.H5")
        out[name.strip()] = [parse_head(h) for h in heads]
    return out


def _prune_plan(args):
    """(head sets, skipped sets, inputs, settings), all checked before a model is loaded."""
    from ..images import list_image_folder

    if args.seeds < 0 or args.batch_size < 1:
        raise ValueError(f"--seeds must be >= 0 and --batch-size >= 1 (got {args.seeds}, {args.batch_size})")
    if args.templates and not os.path.isfile(args.templates):
        raise FileNotFoundError(f"--templates {args.templates!r} does not exist")
    table = read_ccs_table(args.ccs) if args.ccs else None
    explicit = _parse_explicit(args.heads)
    skipped: list = []
    sets = build_head_sets(table, seeds=tuple(range(args.seeds)), high_min=args.high_min, low_max=args.low_max,
                           concepts=args.concept or (), explicit=explicit, skipped=skipped)
    listing = list_image_folder(args.images, labelled=True)  # a clear error for missing/empty folders
    inputs = {"images": folder_fingerprint(args.images, [p for p, _ in listing.items]),
              "ccs": text_fingerprint(args.ccs) if args.ccs else None,
              "templates": input_fingerprint(args.templates, builtin="built-in templates")}
    settings = {"mode": args.mode, "seeds": args.seeds, "high_min": args.high_min, "low_max": args.low_max,
                "concepts": list(args.concept or ()), "explicit": {k: [list(h) for h in v] for k, v in explicit.items()},
                "batch_size": args.batch_size}
    return sets, skipped, inputs, settings


def _refuse_other_prune_run(record, inputs: dict, settings: dict, out: Path) -> None:
    """Evaluated sets are reused by their heads (any CCS table, seeds or concepts); other
    images, templates or mode make another run, refused."""
    old = ((record or {}).get("steps") or {}).get("ccs prune")
    if not old:
        return
    pick = lambda i, s: {"images": i.get("images"), "templates": i.get("templates"), "mode": s.get("mode")}  # noqa
    diff = differences(pick(old.get("inputs") or {}, old.get("settings") or {}), pick(inputs, settings))
    if diff:
        raise ValueError(f"{str(out)!r} holds a `fastinterp ccs prune` run on other inputs (" + "; ".join(diff)
                         + "); use another output folder or delete it")


def cmd_prune(args) -> int:
    from ..zeroshot import read_templates

    sets, skipped, inputs, settings = _prune_plan(args)
    for item in skipped:
        print(f"fastinterp ccs prune: head set {item['set']} cannot be formed: {item['reason']}", file=sys.stderr)
    out = Path(args.output)
    source = read_run_record(Path(args.ccs).parent) if args.ccs else None
    adopt_record_model(args, source, Path(args.ccs).parent if args.ccs else out)
    record = read_run_record(out)
    adopt_record_model(args, record, out)
    _refuse_other_prune_run(record, inputs, settings, out)
    model, preprocess, tokenizer = load_model(args)
    check_weights(source, model, args.ccs)
    check_weights(record, model, out)
    record_step(out, "ccs prune", args, model, inputs=inputs, settings=settings, extra={"skipped_sets": skipped})
    templates = read_templates(args.templates) if args.templates else None
    rows = run_pruning(model, preprocess, tokenizer, args.images, sets, output=args.output, mode=args.mode,
                       templates=templates, batch_size=args.batch_size, progress=not args.quiet, skipped=skipped)
    print(Path(args.output, "results.md").read_text(encoding="utf-8"))
    print(f"results written to {args.output} (results.json, results.csv, results.md, accuracy.png); "
          f"{len(rows)} head sets" + (f", {len(skipped)} could not be formed (listed in results.md)" if skipped else ""))
    return 0


def add_prune_cli(ccs_subparsers) -> None:
    """Add the `prune` sub-command to the `fastinterp ccs` group's sub-parsers."""
    p = ccs_subparsers.add_parser(
        "prune", help="prune head sets (high/low/random/equal-count/concept CCS heads) and measure "
                      "zero-shot accuracy over an ImageFolder")
    add_model_args(p)
    p.add_argument("--ccs", default=None, help="CCS results table (CSV or JSON with columns layer, head, ccs[, label]); "
                                               "the model defaults to the one its folder's run.json records")
    p.add_argument("--heads", action="append", metavar="NAME=L11.H0,L10.H5",
                   help="an explicit head set to prune (repeatable)")
    p.add_argument("--images", required=True, help="ImageFolder root: <root>/<class name>/*.jpg")
    p.add_argument("--output", default="fastinterp-prune", help="output folder (default: fastinterp-prune)")
    p.add_argument("--mode", choices=MODES, default="zero",
                   help="zero: remove the head output (CCS pruning); mean: replace it by its dataset mean")
    p.add_argument("--seeds", type=int, default=3, help="random / equal-count draws (default 3)")
    p.add_argument("--high-min", type=float, default=5, help="CCS >= this is 'high' (default 5)")
    p.add_argument("--low-max", type=float, default=1, help="CCS <= this is 'low' (default 1)")
    p.add_argument("--concept", action="append", help="also prune the heads whose label contains this (repeatable)")
    p.add_argument("--templates", default=None, help="prompt templates file, one per line with '{}' (default: built-in)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)


def register(sub) -> None:
    """`fastinterp ccs textspan|label|score|prune`."""
    ccs = sub.add_parser("ccs", help="concept consistency of attention heads (TextSpan, LLM labels, CCS)")
    csub = ccs.add_subparsers(dest="ccs_command", required=True)
    p = csub.add_parser("textspan", help="per-head TextSpan descriptions over an image folder")
    add_model_args(p)
    p.add_argument("--images", required=True, help="image folder (any layout; sub-folders are searched)")
    p.add_argument("--texts", default=None, help="text bank, one description per line (default: built-in list)")
    p.add_argument("--last-layers", type=int, default=4, help="describe the heads of the last N layers (default 4)")
    p.add_argument("--layers", default=None, help="explicit comma-separated layers instead, e.g. 8,9,10,11")
    p.add_argument("--n-texts", type=int, default=5, help="descriptions per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="TextSpan subspace rank (default 80)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", required=True, help="output folder (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_textspan)
    p = csub.add_parser("label", help="label each head from its descriptions (LLM or offline CLIP labeller)")
    _add_labeller_args(p)
    p.set_defaults(func=cmd_label)
    p = csub.add_parser("score", help="judge each (description, label); CCS per head, CCS@K, buckets")
    _add_labeller_args(p)
    p.set_defaults(func=cmd_score)
    add_prune_cli(csub)


# --------------------------------------------------------------------------------------
# `fastinterp demo` sections
# --------------------------------------------------------------------------------------
def _views(images: dict) -> list:
    """Each demo photo, mirrored, and two crops: 4 views per photo."""
    from PIL import Image

    out = []
    for im in images.values():
        w, h = im.size
        out += [im, im.transpose(Image.FLIP_LEFT_RIGHT), im.crop((0, 0, int(w * 0.7), int(h * 0.7))),
                im.crop((int(w * 0.2), int(h * 0.2), w, h))]
    return out


CCS_EXPLAINED = ("A head's CCS counts how many of its 5 TextSpan descriptions are judged consistent with its "
                 "one-word label (0-5); buckets: high = 5, moderate = 3, low = 0 or 1 (2 and 4 are left out, "
                 "'-'); CCS@K is the share of heads whose CCS is exactly K.")


def demo_section(ctx) -> str:
    """CCS on the demo photos: TextSpan over the built-in text bank for the last 2 layers,
    the offline CLIP labeller with the demo concept list, CCS per head."""
    import shutil

    from ..llm import ClipLabeller
    from ..textspan import builtin_text_bank

    out = ctx.output / "ccs"
    shutil.rmtree(out, ignore_errors=True)  # the demo always starts fresh (other seed / model)
    views = _views(ctx.images)
    n_layers = ctx.info.layers
    layers = list(range(max(0, n_layers - 2), n_layers))
    records = describe_heads(ctx.model, views, builtin_text_bank(), tokenizer=ctx.tokenizer, preprocess=ctx.preprocess,
                             layers=layers, n_texts=5, rank=80, batch_size=8, output=out, progress=False)
    labeller = ClipLabeller(ctx.model, ctx.tokenizer, ctx.dictionary, cache_dir=ctx.output / "cache")
    scores, summary = run_ccs(records, labeller, output=out, progress=False)
    ctx.results["ccs"] = {"layers": layers, "images": len(views), "ccs_at_k": summary["ccs_at_k"],
                          "bucket_counts": summary["bucket_counts"], "mean_ccs": summary["mean_ccs"],
                          "heads": [{"head": _key(s.layer, s.head), "label": s.label, "ccs": s.ccs} for s in scores]}
    lines = ["## CCS: concept consistency of attention heads", "",
             f"TextSpan over {len(views)} views of the demo photos and the built-in text bank (layers {layers}, "
             f"5 descriptions per head), labels and judgements from the offline CLIP labeller "
             f"(threshold {labeller.threshold}). Random weights: the labels mean nothing; the whole path runs. "
             f"Files: `ccs/descriptions.txt`, `ccs/ccs.csv`, `ccs/ccs.json`.", "",
             CCS_EXPLAINED, "",
             "| head | label | CCS | bucket | first descriptions |", "|---|---|---|---|---|"]
    for s in scores:
        lines.append(f"| {_key(s.layer, s.head)} | {s.label} | {s.ccs} | {s.bucket or '-'} | "
                     f"{'; '.join(s.descriptions[:2])} |")
    lines += ["", "CCS@K (share of heads with CCS = K): "
              + ", ".join(f"K={k}: {v:.2f}" for k, v in summary["ccs_at_k"].items())]
    return "\n".join(lines)


def _demo_table(ctx):
    """CCS rows from the demo's CCS section when it left some (list of dicts with layer,
    head, ccs), else None."""
    ccs = ctx.results.get("ccs")
    rows = ccs.get("heads") if isinstance(ccs, dict) else ccs
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) and {"head", "ccs"} <= set(r) for r in rows)):
        return None
    out = []
    for r in rows:
        layer, head = (int(r["layer"]), int(r["head"])) if "layer" in r else parse_head(r["head"])
        out.append({"layer": layer, "head": head, "ccs": float(r["ccs"]), "label": str(r.get("label", ""))})
    return out


def _single_head_effects(model, images, layers) -> dict:
    """All single-head ablations of `layers` in one pass, checked and timed against the
    reference pruning; each head's effect = 1 - cosine to the unablated embedding (mean over
    the images)."""
    import torch.nn.functional as F

    from ..ablation import single_head_ablations
    from ..reference import ablation as ref

    t0 = time.perf_counter()
    emb, heads = single_head_ablations(model, images, layers)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    expect = torch.stack([ref.pruned_encode(model, images, [h], copy_model=False) for h in heads])
    ref_s = time.perf_counter() - t0
    max_diff = float((emb - expect).abs().max())
    with torch.no_grad():
        base = model.encode_image(images, normalize=False)
    effect = (1 - F.cosine_similarity(emb.float(), base.float()[None], dim=-1)).mean(-1)
    return {"heads": heads, "effect": effect, "order": effect.argsort(descending=True).tolist(),
            "ours_s": ours_s, "ref_s": ref_s, "max_diff": max_diff}


def _demo_head_sets(ctx, heads, order) -> tuple[list, str]:
    """Head sets from the CCS section's table when there is one, else from the single-head
    effects (top-k, bottom-k, random); and where they came from."""
    table = _demo_table(ctx)
    if table is not None:
        return build_head_sets(table, seeds=(0, 1, 2)), "the CCS section's table"
    k = min(3, len(heads))
    gen = random.Random(ctx.seed)
    sets = [HeadSet(name="original", kind="original", seed=None, heads=[]),
            HeadSet(name=f"top-{k} effect", kind="explicit", seed=None, heads=sorted(heads[i] for i in order[:k])),
            HeadSet(name=f"bottom-{k} effect", kind="explicit", seed=None, heads=sorted(heads[i] for i in order[-k:]))]
    for s in range(3):
        sets.append(HeadSet(name=f"random-s{s}", kind="random", seed=s, heads=sorted(gen.sample(heads, k))))
    return sets, "the single-head ablation effects (no CCS table in this demo run)"


def prune_demo_section(ctx) -> str:
    """Head pruning on the demo photos: all single-head ablations of the last 4 layers in one
    pass (checked against the reference pruning and timed against it), then zero-shot
    accuracy over the photos (class = photo name) with head sets pruned."""
    from ..ablation import masked_forward
    from ..zeroshot import text_classifier, top1_accuracy

    model, info = ctx.model, ctx.info
    device = next(model.parameters()).device
    names = list(ctx.images)
    images = torch.stack([ctx.preprocess(im) for im in ctx.images.values()]).to(device)
    layers = list(range(max(0, info.layers - 4), info.layers))
    fx = _single_head_effects(model, images, layers)
    heads, effect, order = fx["heads"], fx["effect"], fx["order"]

    sets, source = _demo_head_sets(ctx, heads, order)
    masks = head_set_masks((info.layers, info.heads), [s["heads"] for s in sets])
    classes = ["cat" if n == "chelsea" else n for n in names]
    classifier = text_classifier(model, ctx.tokenizer, classes, device=device)
    accs = top1_accuracy(masked_forward(model, images, masks), classifier, list(range(len(names)))).tolist()
    base_acc = accs[0]
    rows = [{"name": s["name"], "kind": s["kind"], "seed": s["seed"], "n_heads": len(s["heads"]),
             "heads": [list(h) for h in s["heads"]], "accuracy": a, "drop": base_acc - a, "n_images": len(names)}
            for s, a in zip(sets, accs)]
    out = ctx.output / "pruning"
    write_pruning_results(rows, out, run={"demo": True, "model": getattr(model, "fastinterp_name", "")})

    top = [{"head": f"L{heads[i][0]}.H{heads[i][1]}", "effect": round(float(effect[i]), 5)} for i in order[:5]]
    ctx.results["pruning"] = {
        "single_head_ablations": len(heads), "images": len(names), "ours_s": round(fx["ours_s"], 4),
        "reference_s": round(fx["ref_s"], 4), "max_abs_diff_vs_reference": fx["max_diff"],
        "most_influential_heads": top, "head_set_source": source,
        "accuracy": {r["name"]: round(r["accuracy"], 2) for r in rows},
    }
    lines = [
        "## Head pruning",
        "",
        f"All {len(heads)} single-head ablations of layers {layers[0]}-{layers[-1]} on the {len(names)} photos in one "
        f"`masked_forward` pass: {fx['ours_s']:.2f} s, vs {fx['ref_s']:.2f} s for {len(heads)} separate forwards with "
        f"the head's query rows and out_proj columns zeroed (the reference pruning); max |difference| "
        f"{fx['max_diff']:.1e}.",
        "",
        "Most influential heads (1 - cosine to the unablated embedding, mean over photos): "
        + ", ".join(f"{t['head']} ({t['effect']:.4f})" for t in top) + ".",
        "",
        f"Zero-shot top-1 over the photos (class = photo name, prompt ensemble) with head sets from {source}:",
        "",
        (out / "results.md").read_text(encoding="utf-8").strip(),
        "",
        "![accuracy after pruning](pruning/accuracy.png)",
    ]
    return "\n".join(lines)
