"""The run record of SITH's model folders (`<output>/<model>/<weights>/run.json`).

`sith decompose` records the model (name, weights, seed, weights hash), each dictionary's
fingerprint, the image folder and the settings of every decomposition file it wrote;
`sith fidelity` takes the model from the record of the files' folder, `sith edit` from the
record of its model folder (the only one under --output when no model flag is given) and
the decomposition settings (dictionary, method, sparsity, fold-ln) it leaves out from the
latest decompose run.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..io import read_run_record
from .common import adopt_record_model, check_weights, folder_fingerprint, record_step

EDIT_DEFAULTS = {"method": "comp-0.3", "sparsity": 5, "fold_ln": False}


def dictionary_fingerprint(d, spec: str) -> dict:
    """A concept dictionary: its name, how it was given and the SHA-256 of its texts."""
    return {"name": d.name, "spec": spec if spec in ("demo", "bpe") else str(Path(spec).resolve()),
            "sha256": hashlib.sha256("\n".join(d.texts).encode("utf-8")).hexdigest()}


def before_decompose(args, mdir: Path, d) -> dict | None:
    """Adopt the model folder's seed where --seed was left out, refuse another model, and
    drop the folder's saved copy of dictionary `d` when its texts changed since it was
    recorded (it is written again). Returns the record (or None)."""
    record = read_run_record(mdir)
    adopt_record_model(args, record, mdir)
    saved = (((record or {}).get("steps") or {}).get("sith decompose") or {}).get("dictionaries", {}).get(d.name)
    if saved and saved["sha256"] != dictionary_fingerprint(d, args.dictionary)["sha256"]:
        print(f"dictionary {d.name!r} changed since {mdir} recorded it: its saved embeddings are rebuilt")
        (mdir / "dictionaries" / f"{d.name}.pt").unlink(missing_ok=True)
        (Path(args.output) / "dictionaries" / f"{d.name}.txt").unlink(missing_ok=True)
    return record


def record_decompose(args, model, mdir: Path, record, d, files: dict) -> None:
    """Add this run's files and settings to the model folder's record."""
    check_weights(record, model, mdir)
    old = ((record or {}).get("steps") or {}).get("sith decompose") or {}
    settings = {"dictionary": d.name, "method": args.method, "sparsity": args.sparsity, "sv_type": args.sv_type,
                "fold_ln": bool(args.fold_ln), "rank": args.rank, "batch_size": args.batch_size}
    inputs = {"dictionary": dictionary_fingerprint(d, args.dictionary),
              "images": folder_fingerprint(args.images) if args.images else None, "image_mean": args.image_mean}
    dictionaries = dict(old.get("dictionaries") or {}, **{d.name: inputs["dictionary"]})
    all_files = dict(old.get("files") or {}, **{name: dict(settings, layer=layer) for name, layer in files.items()})
    record_step(mdir, "sith decompose", args, model, inputs=inputs, settings=settings,
                extra={"dictionaries": dictionaries, "files": dict(sorted(all_files.items()))})


def adopt_for_files(args, files) -> tuple[dict | None, Path | None]:
    """sith fidelity: the model of the decomposition files' folder(s); every file must come
    from the same recorded model. Returns (record, model folder)."""
    record = folder = None
    for f in files:
        mdir = Path(f).resolve().parent.parent
        rec = read_run_record(mdir)
        if rec is not None:
            adopt_record_model(args, rec, mdir)  # the first adopts, the others must agree
            record, folder = (record, folder) if record is not None else (rec, mdir)
    return record, folder


def _sole_model_dir(output: Path) -> Path | None:
    found = sorted(p.parent for p in output.glob("*/*/run.json"))
    if len(found) > 1:
        raise ValueError(f"{str(output)!r} holds several models ({', '.join(str(p.relative_to(output)) for p in found)}); "
                         f"pass --model-name and --pretrained / --checkpoint to choose one")
    return found[0] if found else None


def adopt_for_edit(args, model_dir_of) -> dict | None:
    """sith edit: the model flags (from the model folder's record: the one named by the
    flags, else the only one under --output) and the decomposition settings left out
    (from its latest decompose run, else the defaults). Returns the record."""
    named = bool({"model_name", "pretrained", "checkpoint"} & getattr(args, "given_model_flags", set()))
    mdir = model_dir_of(args) if named else (_sole_model_dir(Path(args.output)) or model_dir_of(args))
    record = read_run_record(mdir)
    adopt_record_model(args, record, mdir)
    latest = (((record or {}).get("steps") or {}).get("sith decompose") or {}).get("settings") or {}
    for key, default in EDIT_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, latest.get(key, default))
    if getattr(args, "dictionary", None) is None and args.recipe != "multipliers" and latest.get("dictionary"):
        spec = ((record["steps"]["sith decompose"].get("dictionaries") or {}).get(latest["dictionary"]) or {})
        args.dictionary = spec.get("spec")
    return record


def check_decompose_args(args):
    """Everything `sith decompose` can check before loading a model; returns the dictionary."""
    from ..sith import decomposition_filename
    from .sith import _resolve_dictionary

    for flag, value in (("--rank", args.rank), ("--sparsity", args.sparsity), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.images:
        from ..images import list_image_folder

        list_image_folder(args.images)  # missing or empty folders are named now
    elif args.image_mean not in (None, "auto", "none") and not Path(args.image_mean).is_file():
        raise FileNotFoundError(f"--image-mean {args.image_mean!r} does not exist; give a .pt file, 'auto' or 'none'")
    d = _resolve_dictionary(args.dictionary)
    decomposition_filename(0, sv_type=args.sv_type, fold_ln=args.fold_ln, dictionary=d.name, method=args.method,
                           sparsity=args.sparsity)  # names that cannot go into SITH's file names
    from ..sparse import parse_method

    parse_method(args.method)
    return d


def record_fidelity(args, model, mdir: Path) -> None:
    from ..io import text_fingerprint

    files = {Path(f).name: text_fingerprint(f)["sha256"] for f in args.files}
    record_step(mdir, "sith fidelity", args, model, inputs={"files": files, "dictionary": args.dictionary},
                settings={"image_mean": args.image_mean, "normalize_only": bool(args.normalize_only)})


def record_edit(args, record, mdir: Path, save: Path) -> None:
    """The edit's recipe and settings, in the model folder's record (when it has one)."""
    if record is None:
        return
    settings = {k: getattr(args, k, None) for k in ("layers", "recipe", "dictionary", "method", "sparsity", "fold_ln",
                                                   "truncate", "offset", "min_threshold", "class_sparsity")}
    record_step(mdir, "sith edit", args, None, settings=settings, extra={"saved": os.path.relpath(save.resolve(), mdir)})
