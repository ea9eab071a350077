"""`fastinterp sith score` (decisions files for the suppress / sign-flip recipes, by the LLM or
offline by CLIP text similarity) and the input checks `sith edit` runs before it loads a model.

A decisions file is SITH's format: one integer score 1-5 per line, head-major (H * r lines),
at <model dir>/<recipe>-decisions/<decomposition stem>.txt (or --decisions DIR/<stem>.txt).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..sith import (PROMPT_BACKGROUND, PROMPT_UNSAFE, ClipScorer, LLMScorer, decomposition_filename,
                    load_decomposition, read_decisions, score_singular_vectors)
from ..vit import check_layers
from .common import check_weights, load_model, record_step
from .sith import _common, _model_dir, _resolve_dictionary

DECISION_RECIPES = ("suppress", "sign-flip")


# --------------------------------------------------------------------------------------
# shared by `sith score` and `sith edit`
# --------------------------------------------------------------------------------------
def decomposition_name(args, layer: int, dname: str) -> str:
    return decomposition_filename(layer, sv_type="right", fold_ln=args.fold_ln, dictionary=dname,
                                  method=args.method, sparsity=args.sparsity)


def decisions_file(args, name: str, mdir: Path) -> Path:
    ddir = Path(args.decisions) if args.decisions else mdir / f"{args.recipe}-decisions"
    return ddir / (name[:-3] + ".txt")


def _decomposition(mdir: Path, name: str) -> Path:
    path = mdir / "decompositions" / name
    if not path.exists():
        raise FileNotFoundError(f"no decomposition {str(path)!r}; run `fastinterp sith decompose` with the same "
                                f"--layers/--dictionary/--method/--sparsity/--fold-ln and --output first")
    return path


def score_layer(args, name: str, mdir: Path, dfile: Path, scorer, texts) -> torch.Tensor:
    """Fill in whatever `dfile` lacks for one layer (resumes); (H, r) scores."""
    data = load_decomposition(_decomposition(mdir, name))
    dfile.parent.mkdir(parents=True, exist_ok=True)
    template = PROMPT_BACKGROUND if args.recipe == "suppress" else PROMPT_UNSAFE
    return score_singular_vectors(data["scores"], data["indices"], texts, scorer, template=template,
                                  cache=dfile, progress=not args.quiet)


def llm_scorer(args) -> LLMScorer:
    from .. import llm

    kwargs = {} if getattr(args, "timeout", None) is None else {"timeout": args.timeout}
    return LLMScorer(llm.OpenAIChat(getattr(args, "base_url", None), args.llm_model, **kwargs))


def config_shape(model_name: str) -> tuple[int, int, int] | None:
    """(layers, heads, head dim) of an open_clip ViT config, read without building the model;
    None when the config is not a plain ViT (the model-time checks then apply)."""
    import open_clip

    from ..models import _register_configs

    _register_configs()
    cfg = (open_clip.get_model_config(model_name) or {}).get("vision_cfg") or {}
    layers, width = cfg.get("layers"), cfg.get("width")
    if not isinstance(layers, int) or not isinstance(width, int) or cfg.get("timm_model_name"):
        return None
    head_width = cfg.get("head_width", 64)
    return layers, width // head_width, head_width


# --------------------------------------------------------------------------------------
# sith edit: check the inputs before loading the model
# --------------------------------------------------------------------------------------
def _check_decisions(dfile: Path, heads: int | None, head_dim: int | None) -> None:
    if not dfile.exists():
        raise FileNotFoundError(f"no decisions file {str(dfile)!r}: one integer score 1-5 per line, head-major "
                                f"(H*r lines); make it with `fastinterp sith score` (--scorer clip works "
                                f"offline) or fastinterp.sith.score_singular_vectors")
    dec = read_decisions(dfile)
    bad = [v for v in dec if not 1 <= v <= 5]
    if bad:
        raise ValueError(f"{dfile}: scores must be integers 1-5, found {bad[:5]}")
    if heads is not None and (not dec or len(dec) % heads or len(dec) // heads > head_dim):
        raise ValueError(f"{dfile}: {len(dec)} scores; expected heads x rank = {heads} x r lines with "
                         f"1 <= r <= {head_dim} (head dim)")


def _check_multipliers(args, layers, shape) -> None:
    from .sith import _multiplier_file

    if args.multipliers and not Path(args.multipliers).is_file():
        raise FileNotFoundError(f"--multipliers {args.multipliers!r} does not exist")
    try:
        mult = _multiplier_file(args, layers)
    except Exception as err:  # torch.load raises many types for a bad file
        if isinstance(err, (ValueError, FileNotFoundError)):
            raise
        raise ValueError(f"--multipliers {args.multipliers!r} cannot be read as a .pt file ({err})") from None
    if not isinstance(mult, dict):
        raise ValueError(f"{args.multipliers}: expected {{layer: (H, r) tensor}} or one tensor, got "
                         f"{type(mult).__name__}")
    for layer in layers:
        if layer not in mult:
            raise ValueError(f"{args.multipliers} has no multipliers for layer {layer} (keys: {list(mult)})")
        m = torch.as_tensor(mult[layer])
        if shape is not None and (m.ndim != 2 or m.shape[0] != shape[1] or not 1 <= m.shape[1] <= shape[2]):
            raise ValueError(f"{args.multipliers}: layer {layer} multipliers have shape {tuple(m.shape)}; "
                             f"expected (heads={shape[1]}, r) with 1 <= r <= {shape[2]}")
        if not bool(torch.isfinite(m.double()).all()):
            raise ValueError(f"{args.multipliers}: layer {layer} multipliers are not all finite")


def check_edit_inputs(args) -> None:
    """Everything `sith edit` reads, checked before the (possibly slow) model load: the layers
    against the model's config, the dictionary, and per recipe the decisions files (exist,
    parse, heads x r lines), the decomposition files, the classes file or the multipliers file
    (layers present, (heads, r) shapes)."""
    shape = config_shape(args.model_name)
    layers = check_layers(shape[0], args.layers) if shape is not None else list(args.layers)
    resolvable = shape is not None or all(v >= 0 for v in layers)
    dname = _resolve_dictionary(args.dictionary).name if args.dictionary else None
    mdir = _model_dir(args)
    if args.recipe == "multipliers":
        _check_multipliers(args, layers, shape)
        return
    if dname is None:
        what = "--classes FILE (one class name per line) and --dictionary" if args.recipe == "classify" else \
            "--dictionary (to name the decisions files)"
        raise ValueError(f"--recipe {args.recipe} needs {what}")
    if args.recipe == "classify":
        if not args.classes or not Path(args.classes).is_file():
            raise FileNotFoundError(f"--recipe classify needs --classes FILE (one class name per line); "
                                    f"got {args.classes!r}")
    if not resolvable:
        return
    for layer in layers:
        name = decomposition_name(args, layer, dname)
        if args.recipe == "classify" or getattr(args, "llm", False):
            _decomposition(mdir, name)
        else:
            _check_decisions(decisions_file(args, name, mdir), *(shape[1:] if shape else (None, None)))


# --------------------------------------------------------------------------------------
# sith score
# --------------------------------------------------------------------------------------
def _clip_scorer(args):
    from ..concepts import ConceptDictionary

    model, _, tokenizer = load_model(args)
    vocab = ConceptDictionary.from_file(args.vocabulary) if args.vocabulary else None
    return ClipScorer(model, tokenizer, args.recipe, targets=args.target, contrast=args.contrast,
                      vocabulary=vocab, progress=not args.quiet), model


def cmd_score(args) -> int:
    from .common import public_url
    from .sith_records import adopt_for_edit

    record = adopt_for_edit(args, _model_dir)  # the model and decomposition settings of the folder's record
    if args.dictionary is None:
        raise ValueError("--dictionary is needed: the output folder has no `sith decompose` record to take it from")
    shape = config_shape(args.model_name)
    d = _resolve_dictionary(args.dictionary)
    mdir = _model_dir(args)
    layers = check_layers(shape[0], args.layers) if shape is not None else list(args.layers)
    names = {layer: decomposition_name(args, layer, d.name) for layer in layers}
    for name in names.values():
        _decomposition(mdir, name)  # all inputs there before the model loads or the LLM is asked
    model = None
    if args.scorer == "clip":
        scorer, model = _clip_scorer(args)
        check_weights(record, model, mdir)
        layers = check_layers(model, args.layers)
        names = {layer: decomposition_name(args, layer, d.name) for layer in layers}
    else:
        scorer = llm_scorer(args)
    written = {}
    for layer, name in names.items():
        dfile = decisions_file(args, name, mdir)
        if args.force and dfile.exists():
            dfile.unlink()
        dec = score_layer(args, name, mdir, dfile, scorer, d.texts)
        written[name] = os.path.relpath(dfile.resolve(), mdir.resolve())
        counts = ", ".join(f"{v}: {int((dec == v).sum())}" for v in range(1, 6))
        print(f"layer {layer}: {dec.numel()} singular vectors scored by {args.scorer} ({counts}) -> {dfile}")
    scorer_info = ({"scorer": "clip", "targets": args.target, "contrast": args.contrast,
                    "vocabulary": args.vocabulary} if args.scorer == "clip" else
                   {"scorer": "openai", "llm_model": args.llm_model, "base_url": public_url(args.base_url)})
    if record is not None:
        record_step(mdir, f"sith score {args.recipe}", args, model,
                    settings={"recipe": args.recipe, "dictionary": d.name, "method": args.method,
                              "sparsity": args.sparsity, "fold_ln": bool(args.fold_ln), **scorer_info},
                    extra={"decisions": written})
    return 0


def add_score(sub) -> None:
    q = sub.add_parser("score", help="score singular vectors 1-5 for the suppress / sign-flip recipes "
                                     "(decisions files that `sith edit` reads)")
    _common(q)
    q.add_argument("--layers", type=int, nargs="+", required=True)
    q.add_argument("--recipe", choices=DECISION_RECIPES, required=True,
                   help="suppress: how much each singular vector is about places / scenery; sign-flip: how unsafe")
    q.add_argument("--dictionary", default=None, help="dictionary of the decompositions ('demo', 'bpe', file; "
                                                      "default: the folder's latest `sith decompose`)")
    q.add_argument("--method", default=None, help="default: the folder's latest `sith decompose`, else comp-0.3")
    q.add_argument("--sparsity", type=int, default=None, help="default: as --method, else 5")
    q.add_argument("--fold-ln", action=argparse.BooleanOptionalAction, default=None,
                   help="the decompositions were made with --fold-ln (default: as --method, else no)")
    q.add_argument("--decisions", default=None,
                   help="folder for the decisions files <decomposition stem>.txt (default <model dir>/<recipe>-decisions)")
    q.add_argument("--scorer", choices=("openai", "clip"), default="openai",
                   help="openai: an OpenAI-compatible chat endpoint with the paper's prompts (default); clip: "
                        "offline, CLIP text similarity of each concept to target / contrast descriptions")
    q.add_argument("--llm-model", default=None, help="openai: model name (default: $FASTINTERP_LLM_MODEL or gpt-4o)")
    q.add_argument("--base-url", default=None, help="openai: endpoint root (default: $FASTINTERP_LLM_BASE_URL, ...)")
    q.add_argument("--timeout", type=float, default=None, help="openai: seconds per request (default 60)")
    q.add_argument("--target", action="append", default=None, metavar="TEXT",
                   help="clip: a target description (repeatable; default: the recipe's built-in list)")
    q.add_argument("--contrast", action="append", default=None, metavar="TEXT",
                   help="clip: a contrast description (repeatable; default: the recipe's built-in list)")
    q.add_argument("--vocabulary", default=None,
                   help="clip: concept file whose mean direction is removed before cosines (default: built-in demo list)")
    q.add_argument("--force", action="store_true", help="rescore from scratch (default: resume the decisions files)")
    q.set_defaults(func=cmd_score)
