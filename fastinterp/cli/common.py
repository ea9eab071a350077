"""What every command shares: the model flags, the one way a command loads its model, and
the run record (`run.json`) every output folder carries.

The record rule: a command that reads a folder takes the model (name, weights, seed) from
the folder's record wherever its own model flags were left out (argparse default None); a
flag that contradicts the record is refused with both values named; the loaded weights
must hash to the recorded hash. A step's finished work is reused only when every recorded
input and setting matches.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from ..io import files_fingerprint, read_run_record, text_fingerprint, write_run_record
from ..models import TINY_MODEL, load_clip

RECORD_FORMAT = 1
MODEL_FLAGS = {"model_name": "--model-name", "pretrained": "--pretrained", "checkpoint": "--checkpoint",
               "seed": "--seed"}
MODEL_DEFAULTS = {"model_name": TINY_MODEL, "pretrained": None, "checkpoint": None, "seed": 0}


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = TINY_MODEL) -> None:
    """The model flags every command that loads a model takes (including `--seed`). Their
    argparse defaults are None, meaning "not given": the folder's run record, else the
    defaults (`fill_model_defaults`)."""
    p.add_argument("--model-name", default=None,
                   help=f"open_clip model name (default: the folder's run record, else {default_model})")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs internet); default: the "
                                                      "run record's weights, else random weights")
    p.add_argument("--checkpoint", default=None, help="local checkpoint file with the model's weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for random weights and any sampling (default: the run record's, else 0): the same "
                        "seed gives the same model")
    p.set_defaults(default_model_name=default_model)


def fill_model_defaults(args) -> None:
    """Note which model flags were given (`args.given_model_flags`), then fill the others
    with their defaults. Idempotent; `fastinterp.cli.main` calls it after parsing."""
    if not hasattr(args, "model_name"):
        return
    if not hasattr(args, "given_model_flags"):
        args.given_model_flags = {k for k in MODEL_FLAGS if getattr(args, k, None) is not None}
    defaults = dict(MODEL_DEFAULTS, model_name=getattr(args, "default_model_name", TINY_MODEL))
    for k, v in defaults.items():
        if getattr(args, k, None) is None and k not in args.given_model_flags:
            setattr(args, k, v)


def load_model(args):
    """(model, preprocess, tokenizer) from the model flags; random weights are drawn after
    `torch.manual_seed(args.seed)`, so every command with the same flags gets the same model."""
    fill_model_defaults(args)
    torch.manual_seed(args.seed)
    return load_clip(args.model_name, args.pretrained, device=args.device, checkpoint=args.checkpoint)


# --------------------------------------------------------------------------------------
# the run record
# --------------------------------------------------------------------------------------
def _checkpoint_path(path) -> str | None:
    return None if path is None else str(Path(path).resolve())


def model_section(args, model) -> dict:
    """The record's model: name, pretrained tag, checkpoint path, seed and weights hash."""
    from ..models import weights_hash

    return {"name": args.model_name, "pretrained": args.pretrained, "checkpoint": _checkpoint_path(args.checkpoint),
            "seed": args.seed, "weights_sha256": weights_hash(model)}


def _record_value(key: str, section: dict):
    return {"model_name": section.get("name"), "pretrained": section.get("pretrained"),
            "checkpoint": section.get("checkpoint"), "seed": section.get("seed")}[key]


def adopt_record_model(args, record: dict | None, where) -> None:
    """Take the model flags left out from `record` (made by `where`); refuse given flags
    that contradict it. Without a record the defaults apply."""
    fill_model_defaults(args)
    section = (record or {}).get("model")
    if not section:
        return
    given = args.given_model_flags
    weights_given = bool({"pretrained", "checkpoint"} & given)
    conflicts = []
    for key, flag in MODEL_FLAGS.items():
        recorded = _record_value(key, section)
        if key in given or (weights_given and key in ("pretrained", "checkpoint")):
            mine = getattr(args, key)
            mine = _checkpoint_path(mine) if key == "checkpoint" else mine
            if mine != recorded:
                conflicts.append(f"{flag} {mine!r} (the record says {recorded!r})")
        else:
            setattr(args, key, recorded)
            given.add(key)  # from here on the recorded value is what any other record must match
    if conflicts:
        raise ValueError(f"{str(where)!r} was made with another model: " + "; ".join(conflicts)
                         + f". Leave the model flags out to use the recorded model, or use another output folder")


def check_weights(record: dict | None, model, where) -> None:
    """The loaded model's weights must hash to the recorded hash (same file, same seed)."""
    from ..models import weights_hash

    recorded = ((record or {}).get("model") or {}).get("weights_sha256")
    if recorded and recorded != weights_hash(model):
        raise ValueError(f"{str(where)!r} was made with other weights than the ones loaded now (weights hash "
                         f"{recorded[:12]} recorded, {weights_hash(model)[:12]} now; a changed checkpoint file or "
                         f"another open_clip version?). Use another output folder")


def load_recorded_model(args, folder, step: str | None = None, inputs: dict | None = None,
                        settings: dict | None = None):
    """(record, model, preprocess, tokenizer) for a command writing into `folder`: model flags
    left out come from the folder's record, contradicting ones are refused, a rerun of
    `step` with other inputs or settings is refused (all before the model loads), and the
    loaded weights must hash to the recorded ones."""
    record = read_run_record(folder)
    adopt_record_model(args, record, folder)
    if step is not None:
        refuse_mismatch(record, step, inputs or {}, settings or {}, folder)
    model, preprocess, tokenizer = load_model(args)
    check_weights(record, model, folder)
    return record, model, preprocess, tokenizer


def differences(old, new, prefix: str = "") -> list[str]:
    """Human-readable differences between a recorded dict and the current one."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} recorded, {new!r} now"]


def record_step(folder, step: str, args, model, *, inputs: dict | None = None, settings: dict | None = None,
                extra: dict | None = None) -> dict:
    """Add (or replace) `step`'s section in `folder/run.json`; the folder's model must be
    this model. Returns the record written."""
    from .. import __version__

    record = read_run_record(folder) or {}
    section = model_section(args, model) if model is not None else record.get("model")
    if record.get("model") and section and record["model"] != section:
        raise ValueError(f"{str(folder)!r} was made with another model: "
                         + "; ".join(differences(record["model"], section, "model.")) + "; use another output folder")
    steps = dict(record.get("steps") or {})
    steps[step] = {"command": f"fastinterp {step}", "inputs": inputs or {}, "settings": settings or {}, **(extra or {})}
    record = {"format": RECORD_FORMAT, "fastinterp": __version__, "model": section, "steps": steps}
    write_run_record(folder, record)
    return record


def step_mismatch(record: dict | None, step: str, inputs: dict, settings: dict) -> list[str]:
    """What differs between the recorded `step` and this run's inputs and settings ([] when
    there is no such step yet, or it matches)."""
    old = ((record or {}).get("steps") or {}).get(step)
    if not old:
        return []
    return differences({"inputs": old.get("inputs"), "settings": old.get("settings")},
                       {"inputs": inputs, "settings": settings})


def refuse_mismatch(record, step: str, inputs: dict, settings: dict, where) -> None:
    """A rerun into a folder of another run is refused, naming every difference."""
    diff = step_mismatch(record, step, inputs, settings)
    if diff:
        raise ValueError(f"{str(where)!r} holds a `fastinterp {step}` run with other inputs or settings ("
                         + "; ".join(diff) + "): its finished work cannot be reused; use another output folder "
                                             "or delete it")


def folder_fingerprint(root, paths=None) -> dict:
    """An image folder's fingerprint: sorted relative paths, sizes and modification times."""
    from ..images import IMAGE_SUFFIXES

    root = Path(root)
    if paths is None:
        paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return files_fingerprint(paths, root)


def input_fingerprint(spec: str | None, *, builtin: str = "built-in") -> dict | None:
    """A text input given on the command line: a file's content hash, or the name of a built-in."""
    if spec is None:
        return {"builtin": builtin}
    if os.path.isfile(spec):
        return text_fingerprint(spec)
    return {"builtin": spec}


def public_url(url: str | None) -> str | None:
    """A base URL safe to record: user:password@ and query strings dropped."""
    if url is None:
        return None
    url = re.sub(r"^(\w+://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]
