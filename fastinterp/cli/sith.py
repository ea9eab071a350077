"""`fastinterp sith decompose | fidelity | edit`, and SITH's section of `fastinterp demo`.

Files follow SITH's data layout: <output>/<model>/<weights>/{decompositions, dictionaries,
explanations, fidelity, image_mean.pt, <recipe>-decisions}, plus <output>/dictionaries/<name>.txt.
"""
from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import atomic_open, atomic_save, atomic_write_json, atomic_write_text, safe_name
from ..sith import (SV_TYPES, apply_multipliers, classification_multipliers, decompose, decomposition_filename,
                    explanation_rows, fidelity, fidelity_from_file, image_mean, load_decomposition,
                    parse_decomposition_filename, plot_explanations, prepare_dictionary, read_decisions,
                    sign_flip_multipliers, suppress_multipliers, task_concepts, write_explanations)
from ..sith.vo import _check_image_mean
from ..vit import check_layers, vit_info
from .common import add_model_args, load_model


# --------------------------------------------------------------------------------------
# the data layout
# --------------------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    """One file-name component: runs of other characters than letters, digits, '-' and '.'
    become '-', leading/trailing '-' are dropped; "x" if nothing is left."""
    return safe_name(text, sep="-", keep="-.").strip("-") or "x"


def _weights_tag(args) -> str:
    if args.checkpoint:
        return _safe_name(Path(args.checkpoint).stem)
    return _safe_name(args.pretrained) if args.pretrained else "random"


def _model_dir(args) -> Path:
    """SITH's data layout: <output>/<model>/<weights>/{decompositions,dictionaries,image_mean.pt}."""
    return Path(args.output) / _safe_name(args.model_name) / _weights_tag(args)


def _resolve_dictionary(spec: str):
    from ..concepts import ConceptDictionary

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
    # SITH's readers load <model dir>/dictionaries/<name>.pt and dictionaries/<name>.txt; the .pt is
    # (re)written unless its checksum file says it holds exactly these embeddings
    from ..io import SIDECAR_SUFFIX, content_hash, save_tensor_checked

    sidecar = raw_path.with_name(raw_path.name + SIDECAR_SUFFIX)
    if not (raw_path.is_file() and sidecar.is_file()
            and sidecar.read_text(encoding="utf-8", errors="replace").strip() == content_hash(emb)):
        save_tensor_checked(emb, raw_path)
    txt = Path(args.output) / "dictionaries" / f"{d.name}.txt"
    if not txt.exists():
        atomic_write_text(txt, "\n".join(d.texts) + "\n")
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
    from ..io import CorruptFileError, load_tensor_checked

    try:
        mean = load_tensor_checked(path, what=f"an image mean (a ({d},) tensor)")
    except CorruptFileError as err:
        fix = ("pass --images FOLDER to compute it again, or --image-mean none" if spec in (None, "auto")
               else "give a .pt file saved with torch.save(mean, path), 'auto' or 'none'")
        raise CorruptFileError(f"--image-mean: {err}; {fix}") from None
    return _check_image_mean(mean.float(), d)


# --------------------------------------------------------------------------------------
# sith decompose
# --------------------------------------------------------------------------------------
def _cmd_decompose(args) -> int:
    from . import sith_records

    progress = not args.quiet
    record = sith_records.before_decompose(args, _model_dir(args), sith_records.check_decompose_args(args))
    model, preprocess, tokenizer = load_model(args)
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
    files = {decomposition_filename(layer, sv_type=args.sv_type, fold_ln=args.fold_ln, dictionary=d.name,
                                    method=args.method, sparsity=args.sparsity): layer for layer in res}
    sith_records.record_decompose(args, model, mdir, record, d, files)
    for name, (layer, r) in zip(files, res.items()):
        how = "existing file kept" if r.get("resumed") else "written"
        print(f"layer {layer}: {tuple(r['scores'].shape)} {how}: {out / name}")
        if args.explain:
            stem = mdir / "explanations" / name[:-3]
            md, _ = write_explanations(r, d.texts, stem, layer=layer)
            png = plot_explanations(r, d.texts, Path(f"{stem}.png"), n_sv=args.explain_sv,
                                    random_weights=getattr(model, "fastinterp_weights", None) == "random")
            print(f"  explanations: {md}, {png}")
    return 0


# --------------------------------------------------------------------------------------
# sith fidelity
# --------------------------------------------------------------------------------------
def _fidelity_dictionary(args, model, tokenizer, file: Path, meta: dict, mdir: Path, cache: dict):
    """The raw dictionary embeddings for a decomposition file: --dictionary (encoded once), or
    the encoded dictionary saved next to the file."""
    if args.dictionary:
        if args.dictionary not in cache:
            cache[args.dictionary] = _resolve_dictionary(args.dictionary).encode(model, tokenizer,
                                                                                 progress=not args.quiet)
        return cache[args.dictionary]
    raw = mdir / "dictionaries" / f"{meta['dictionary']}.pt"
    if not raw.exists():
        raise FileNotFoundError(f"no encoded dictionary {str(raw)!r} next to {file.name}; pass --dictionary "
                                f"(demo, bpe or the concept file) used for the decomposition")
    from ..io import load_tensor_checked

    return load_tensor_checked(raw, what="encoded dictionary embeddings").float()


def _print_fidelity(file: Path, res: dict) -> None:
    print(f"{file.name}:")
    for h in res["heads"]:
        print(f"  head {h['head']:2d}: mean {h['mean']:.4f}  std {h['std']:.4f}  min {h['min']:.4f}  "
              f"max {h['max']:.4f}")
    o = res["overall"]
    print(f"  overall fidelity: {o['mean']:.4f} (std {o['std']:.4f}, min {o['min']:.4f}, max {o['max']:.4f})")


def _cmd_fidelity(args) -> int:
    from . import sith_records

    for f in args.files:  # every file named and parsed before the model loads
        parse_decomposition_filename(f)
        if not Path(f).is_file():
            raise FileNotFoundError(f"decomposition file {f!r} does not exist")
    record, rdir = sith_records.adopt_for_files(args, args.files)
    model, _, tokenizer = load_model(args)
    sith_records.check_weights(record, model, rdir)
    info = vit_info(model)
    dict_cache: dict = {}
    rows = []
    for file in args.files:
        file = Path(file)
        meta = parse_decomposition_filename(file)
        mdir = file.resolve().parent.parent
        emb = _fidelity_dictionary(args, model, tokenizer, file, meta, mdir, dict_cache)
        mean = _resolve_image_mean(args.image_mean, mdir / "image_mean.pt", info.output_dim)
        data = load_decomposition(file)
        if isinstance(data.get("meta"), dict) and data["meta"].get("image_mean") and mean is None:
            warnings.warn(f"{file.name} was made with an image mean but none was found for fidelity",
                          RuntimeWarning, stacklevel=2)
        res = fidelity_from_file(model, file, emb, image_mean=mean,
                                 dictionary_mode="normalize" if args.normalize_only else "center")
        _print_fidelity(file, res)
        payload = {k: v for k, v in res.items() if k != "cos"}
        payload["cos"] = res["cos"].tolist()
        payload["file"] = file.name  # beside its folder's decompositions/: the same run, the same bytes
        atomic_write_json(mdir / "fidelity" / (file.stem + ".json"), payload, indent=2)
        for h in res["heads"]:
            rows.append({"file": file.name, "layer": meta["layer"], **h})
        rows.append({"file": file.name, "layer": meta["layer"], "head": "all", **res["overall"]})
    if args.csv:
        with atomic_open(args.csv, "w") as f:
            w = csv.DictWriter(f, fieldnames=["file", "layer", "head", "mean", "std", "min", "max"])
            w.writeheader()
            w.writerows(rows)
        print(f"summary written to {args.csv}")
    if rdir is not None:
        sith_records.record_fidelity(args, model, rdir)
    return 0


# --------------------------------------------------------------------------------------
# sith edit
# --------------------------------------------------------------------------------------
def _classify_setup(args, model, tokenizer):
    """(normalise-only atoms, task atoms) for --recipe classify."""
    from ..concepts import encode_texts

    d, emb = _encode_dictionary(args, model, tokenizer, not args.quiet)
    classes = [c.strip() for c in Path(args.classes).read_text(encoding="utf-8").splitlines() if c.strip()]
    if not classes:
        raise ValueError(f"--classes {args.classes!r} lists no class names")
    cls_emb = encode_texts(model, tokenizer, [args.class_template.format(c) for c in classes],
                           progress=not args.quiet)
    g_norm = prepare_dictionary(emb, "normalize")
    exclude = torch.tensor([t in set(classes) for t in d.texts]) if args.filter_dictionary else None
    task_atoms = task_concepts(cls_emb, g_norm, sparsity=args.class_sparsity, coh=0.3, exclude=exclude)
    print(f"task concepts: {task_atoms.shape[0]} atoms from {len(classes)} classes")
    return g_norm, task_atoms


def _multiplier_file(args, layers: list[int]) -> dict:
    """--multipliers FILE.pt as {layer: (H, r) tensor}."""
    if not args.multipliers:
        raise ValueError("--recipe multipliers needs --multipliers FILE.pt ({layer: (H, r) tensor})")
    mult = torch.load(args.multipliers, map_location="cpu", weights_only=True)
    if isinstance(mult, torch.Tensor):
        if len(layers) != 1:
            raise ValueError("a bare (H, r) multiplier tensor needs exactly one --layers value")
        mult = {layers[0]: mult}
    return mult


def _decision_multipliers(args, name: str | None, mdir: Path, heads: int) -> torch.Tensor:
    """suppress / sign-flip: the multipliers from the layer's decisions file (first filling it
    in with the LLM when --llm)."""
    from .sith_scoring import decisions_file, llm_scorer, score_layer

    if name is None:
        raise ValueError(f"--recipe {args.recipe} needs --dictionary (to name the decisions files)")
    dfile = decisions_file(args, name, mdir)
    if args.llm:  # fills in whatever the decisions file lacks (resumes); `sith score` is the same step
        score_layer(args, name, mdir, dfile, llm_scorer(args), _resolve_dictionary(args.dictionary).texts)
    if not dfile.exists():
        raise FileNotFoundError(f"no decisions file {str(dfile)!r}: one integer score 1-5 per line, head-major "
                                f"(H*r lines); make it with `fastinterp sith score`")
    dec = read_decisions(dfile)
    if len(dec) % heads:
        raise ValueError(f"{dfile}: {len(dec)} scores is not a multiple of {heads} heads")
    dec = torch.tensor(dec).reshape(heads, -1)
    return suppress_multipliers(dec) if args.recipe == "suppress" else sign_flip_multipliers(dec)


def _cmd_edit(args) -> int:
    from . import sith_records
    from .sith_scoring import check_edit_inputs

    record = sith_records.adopt_for_edit(args, _model_dir)  # model and decomposition settings left out
    check_edit_inputs(args)  # decisions / decompositions / multipliers / layers, before the model loads
    model, _, tokenizer = load_model(args)
    sith_records.check_weights(record, model, _model_dir(args))
    info = vit_info(model)
    layers = check_layers(model, args.layers)
    mdir = _model_dir(args)
    dname = _resolve_dictionary(args.dictionary).name if args.dictionary else None
    task_atoms = g_norm = None
    if args.recipe == "classify":
        if not args.classes or not dname:
            raise ValueError("--recipe classify needs --classes FILE (one class name per line) and --dictionary")
        g_norm, task_atoms = _classify_setup(args, model, tokenizer)
    mult_file = _multiplier_file(args, layers) if args.recipe == "multipliers" else None
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
            m = _decision_multipliers(args, name, mdir, info.heads)
        m = torch.as_tensor(m, dtype=torch.float64)
        apply_multipliers(model, layer, m, fold_ln=args.fold_ln, truncate=args.truncate)
        print(f"layer {layer}: edited {tuple(m.shape)} singular values (kept {int((m == 1).sum())}, "
              f"zeroed {int((m == 0).sum())}, flipped {int((m < 0).sum())}, other {int(((m != 1) & (m > 0)).sum())})")
    save = Path(args.save)
    atomic_save(model.state_dict(), save)
    sith_records.record_edit(args, record, mdir, save)
    print(f"edited model written to {save} (load with fastinterp.load_clip({args.model_name!r}, checkpoint=...))")
    return 0


# --------------------------------------------------------------------------------------
# the parsers
# --------------------------------------------------------------------------------------
def _common(q) -> None:
    add_model_args(q)  # includes --seed (default 0): random-weight models are reproducible across commands
    q.add_argument("--output", default="fastinterp-out/sith",
                   help="root folder, SITH's data/ layout: <output>/<model>/<weights>/... (default fastinterp-out/sith)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_decompose(sub) -> None:
    q = sub.add_parser("decompose", help="sparse concept codes of the VO singular vectors, one .pt per layer")
    _common(q)
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


def _add_fidelity(sub) -> None:
    q = sub.add_parser("fidelity", help="cosine between singular vectors and their concept reconstructions")
    _common(q)
    q.add_argument("files", nargs="+", help="decomposition files (layer-LL_..._sparsity-K.pt)")
    q.add_argument("--dictionary", default=None,
                   help="dictionary used for the decomposition (default: <model dir>/dictionaries/<name>.pt)")
    q.add_argument("--image-mean", default="auto", help="'auto', 'none' or a .pt file")
    q.add_argument("--normalize-only", action="store_true", help="dictionary prepared by normalising only")
    q.add_argument("--csv", default=None, help="write a per-head summary CSV here")
    q.set_defaults(func=_cmd_fidelity)


def _add_edit(sub) -> None:
    q = sub.add_parser("edit", help="scale singular values (SITH Sec 5 recipes) and save the edited model")
    _common(q)
    q.add_argument("--layers", type=int, nargs="+", required=True)
    q.add_argument("--recipe", choices=("multipliers", "suppress", "sign-flip", "classify"), required=True,
                   help="multipliers: from --multipliers; suppress (1-2 keep, 3-5 zero) / sign-flip (1-2 keep, 3 "
                        "flip, 4-5 zero): from decisions files (`sith score` or --llm); classify: task-concept rescaling")
    q.add_argument("--dictionary", default=None, help="dictionary of the decompositions ('demo', 'bpe', file)")
    q.add_argument("--method", default=None, help="decomposition method (default: the run record's, else comp-0.3)")
    q.add_argument("--sparsity", type=int, default=None, help="decomposition sparsity (default: the record's, else 5)")
    q.add_argument("--fold-ln", action=argparse.BooleanOptionalAction, default=None,
                   help="edit in the LN-folded, centered basis (as the decompositions it reads; the paper's edits use "
                        "it; default: the run record's, else off)")
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


def register(subparsers) -> None:
    """Add `fastinterp sith {decompose,fidelity,score,edit}` (score: cli/sith_scoring.py)."""
    p = subparsers.add_parser("sith", help="SITH: explain attention heads from their weights (decompose, fidelity, "
                                           "score, edit)")
    sub = p.add_subparsers(dest="sith_command", required=True)
    from .sith_scoring import add_score

    _add_decompose(sub)
    _add_fidelity(sub)
    add_score(sub)
    _add_edit(sub)


# --------------------------------------------------------------------------------------
# demo section
# --------------------------------------------------------------------------------------
def _demo_edit(ctx, layer: int) -> tuple[torch.Tensor, float]:
    """Zero the top singular vector of every head of `layer`, then undo: (cosine of each demo
    photo's embedding to the original, max abs difference after undo)."""
    images = torch.stack([ctx.preprocess(im) for im in ctx.images.values()])
    images = images.to(next(ctx.model.parameters()).device)
    with torch.no_grad():
        before = F.normalize(ctx.model.encode_image(images).float(), dim=-1)
        m = torch.ones(ctx.info.heads, 1) * 0.0
        handle = apply_multipliers(ctx.model, layer, m, fold_ln=True)
        after = F.normalize(ctx.model.encode_image(images).float(), dim=-1)
        handle.undo()
        restored = F.normalize(ctx.model.encode_image(images).float(), dim=-1)
    return (before * after).sum(-1), float((restored - before).abs().max())


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
    plot_explanations(res[last], ctx.dictionary.texts, Path(ctx.output) / "sith_explanations.png", n_sv=3,
                      random_weights=getattr(ctx.model, "fastinterp_weights", None) == "random")
    md, _ = write_explanations(res[last], ctx.dictionary.texts, out / f"explanations-layer-{last:02d}", layer=last)
    edit_cos, undo_diff = _demo_edit(ctx, last)
    ctx.results["sith"] = {
        "layers": layers,
        "rank": int(res[last]["scores"].shape[1]),
        "fidelity": {str(k): v["overall"] for k, v in fid.items()},
        "edit_cosine_after_removing_top_sv": [round(float(c), 6) for c in edit_cos],
        "undo_max_abs_diff": undo_diff,
        "files": sorted(p.name for p in (out / "decompositions").glob("*.pt")),
    }
    lines = ["## SITH: attention heads explained from their weights", "",
             f"Decomposed layers {layers} (rank {res[last]['scores'].shape[1]} = head dim, COMP coh 0.3, "
             f"5 concepts per singular vector, fold-ln, image mean of the {len(ctx.images)} demo photos).", "",
             "| layer | fidelity mean | std | min | max |", "|---:|---:|---:|---:|---:|"]
    for layer, f in fid.items():
        o = f["overall"]
        lines.append(f"| {layer} | {o['mean']:.4f} | {o['std']:.4f} | {o['min']:.4f} | {o['max']:.4f} |")
    lines += ["", "![SITH explanations](sith_explanations.png)", "",
              f"Top concepts of layer {last} (full table: `sith/{md.name}` and `.csv`):", ""]
    for row in explanation_rows(res[last], ctx.dictionary.texts, max_sv=1):
        if row["rank_in_sv"] == 0:
            lines.append(f"- head {row['head']}, sv 0 (s={row['singular_value']:.3g}): {row['concept']} "
                         f"({row['weight']:.3f})")
    lines += ["", "Edit: zeroing the top singular value of every head of layer "
              f"{last} moves the demo photos' embeddings to cosine "
              + ", ".join(f"{c:.4f}" for c in edit_cos.tolist()) + " of the original; undo restores them "
              f"(max difference {undo_diff:.1e})."]
    return "\n".join(lines)
