"""A sweep's TOML spec: parsed, validated (every error names the key and the file) and
resolved (paths relative to the spec's folder, built-in dictionaries and demo photos).

    [sweep]                        # output, layers, seed, threads, retries, shard_size
    [[models]]                     # name, model, seed | pretrained | checkpoint, layers
    [dictionaries]                 # name = "demo" | "bpe" | "textspan" | "descriptors" | FILE | [texts]
    [images]                       # name = "demo" | FOLDER
    [methods.sith]                 # steps = ["decompose", "fidelity"], rank, method, sparsity, ...
    [methods.ccs]                  # steps = ["textspan", "label", "score", "prune"], n_texts, ...
    [methods.mutual]               # steps = ["explain"], parts, n_parts, u, crf, ...
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SpecError", "Spec", "load_spec", "parse_spec", "BUILTIN_DICTIONARIES", "METHOD_STEPS"]

BUILTIN_DICTIONARIES = ("demo", "bpe", "textspan", "descriptors")
METHOD_STEPS = {"sith": ("decompose", "fidelity"), "ccs": ("textspan", "label", "score", "prune"),
                "mutual": ("explain",)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")

_SWEEP_KEYS = {"output": "sweep-out", "layers": None, "seed": 0, "threads": 1, "retries": 2, "shard_size": 2,
               "device": "auto"}
_MODEL_KEYS = ("name", "model", "seed", "pretrained", "checkpoint", "layers")
_METHOD_KEYS = {
    "sith": {"steps": ["decompose", "fidelity"], "dictionaries": None, "rank": None, "method": "comp-0.3",
             "sparsity": 5, "sv_type": "right", "fold_ln": True, "image_mean": None, "batch_size": 64},
    "ccs": {"steps": ["textspan"], "dictionaries": None, "images": None, "n_texts": 5, "rank": 80,
            "batch_size": 32, "labeller": "clip", "vocabulary": None, "threshold": 0.3, "prune_seeds": 3,
            "prune_mode": "zero"},
    "mutual": {"steps": ["explain"], "dictionaries": None, "images": None, "parts": "both", "n_parts": 5,
               "u": 50, "crf": True, "facet": "tokens", "language_from": "predicted", "batch_size": 64},
}


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key."""


@dataclass
class Spec:
    path: Path | None
    base: Path  # relative paths in the spec are relative to this folder
    output: Path
    seed: int
    threads: int
    retries: int
    shard_size: int
    device: str
    models: list[dict]  # name, model, seed, pretrained, checkpoint (resolved), layers
    dictionaries: dict[str, dict]  # name -> {"builtin": ...} | {"file": abs path} | {"texts": [...]}
    images: dict[str, dict]  # name -> {"demo": True} | {"folder": abs path}
    methods: dict[str, dict] = field(default_factory=dict)  # method -> settings (with "steps")


def _where(spec_path) -> str:
    return str(spec_path) if spec_path else "the spec"


def _fail(spec_path, key: str, msg: str):
    raise SpecError(f"{_where(spec_path)}: {key}: {msg}")


def _check_keys(spec_path, prefix: str, table: dict, known) -> None:
    for k in table:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            _fail(spec_path, f"{prefix}{k}", f"unknown key{hint}")


def _int(spec_path, key, value, *, low: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        _fail(spec_path, key, f"must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
    return value


def _name(spec_path, key, value) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        _fail(spec_path, key, f"{value!r} is not a usable name (letters, digits, '.' and '-', no '_': "
                              f"names go into file names)")
    return value


def _layers(spec_path, key, value):
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        _fail(spec_path, key, f"must be a non-empty list of layer indices, got {value!r}")
    return [_int(spec_path, f"{key}[{i}]", v) for i, v in enumerate(value)]


def _path(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def _parse_models(spec_path, base: Path, raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        _fail(spec_path, "models", "give at least one [[models]] table (name, model, and seed or pretrained or "
                                   "checkpoint)")
    out, seen = [], set()
    for i, m in enumerate(raw):
        key = f"models[{i}]"
        if not isinstance(m, dict):
            _fail(spec_path, key, "must be a table")
        _check_keys(spec_path, f"{key}.", m, _MODEL_KEYS)
        if "model" not in m:
            _fail(spec_path, f"{key}.model", "missing: the open_clip model name, e.g. 'ViT-B-16' or "
                                             "'fastinterp-tiny-ViT'")
        name = _name(spec_path, f"{key}.name", m.get("name", m["model"]))
        if name in seen:
            _fail(spec_path, f"{key}.name", f"{name!r} names two models; give each a distinct name")
        seen.add(name)
        if m.get("pretrained") is not None and m.get("checkpoint") is not None:
            _fail(spec_path, key, "give pretrained or checkpoint, not both")
        ckpt = m.get("checkpoint")
        if ckpt is not None:
            ckpt = _path(base, ckpt)
            if not ckpt.is_file():
                _fail(spec_path, f"{key}.checkpoint", f"{str(ckpt)!r} does not exist")
        out.append({"name": name, "model": m["model"], "seed": _int(spec_path, f"{key}.seed", m.get("seed", 0)),
                    "pretrained": m.get("pretrained"), "checkpoint": None if ckpt is None else str(ckpt.resolve()),
                    "layers": _layers(spec_path, f"{key}.layers", m.get("layers"))})
    return out


def _parse_dictionaries(spec_path, base: Path, raw) -> dict:
    if not isinstance(raw, dict) or not raw:
        _fail(spec_path, "dictionaries", f"give at least one dictionary: name = one of {BUILTIN_DICTIONARIES}, "
                                         f"a text file, or a list of texts")
    out = {}
    for name, v in raw.items():
        key = f"dictionaries.{name}"
        _name(spec_path, key, name)
        if isinstance(v, list):
            if not v or not all(isinstance(t, str) and t.strip() for t in v):
                _fail(spec_path, key, "an inline dictionary must be a non-empty list of non-blank strings")
            out[name] = {"texts": list(v)}
        elif isinstance(v, str) and v in BUILTIN_DICTIONARIES:
            out[name] = {"builtin": v}
        elif isinstance(v, str):
            p = _path(base, v)
            if not p.is_file():
                _fail(spec_path, key, f"{v!r} is neither a built-in ({', '.join(BUILTIN_DICTIONARIES)}) nor a file "
                                      f"({str(p)!r} does not exist)")
            out[name] = {"file": str(p.resolve())}
        else:
            _fail(spec_path, key, f"must be a built-in name, a file path or a list of texts, got {v!r}")
    return out


def _parse_images(spec_path, base: Path, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        _fail(spec_path, "images", "must be a table name = \"demo\" | FOLDER")
    out = {}
    for name, v in raw.items():
        key = f"images.{name}"
        _name(spec_path, key, name)
        if v == "demo":
            out[name] = {"demo": True}
        elif isinstance(v, str):
            p = _path(base, v)
            if not p.is_dir():
                _fail(spec_path, key, f"image folder {str(p)!r} does not exist")
            out[name] = {"folder": str(p.resolve())}
        else:
            _fail(spec_path, key, f"must be \"demo\" (the bundled photos) or a folder path, got {v!r}")
    return out


def _names_list(spec_path, key, value, known: dict, what: str):
    if value is None:
        return list(known)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(spec_path, key, f"must be a non-empty list of {what} names")
    for v in value:
        if v not in known:
            _fail(spec_path, key, f"{v!r} is not one of the spec's {what} ({', '.join(known) or 'none defined'})")
    return list(value)


def _parse_method(spec_path, method: str, raw, dictionaries: dict, images: dict) -> dict:
    prefix = f"methods.{method}."
    if not isinstance(raw, dict):
        _fail(spec_path, prefix[:-1], "must be a table")
    _check_keys(spec_path, prefix, raw, _METHOD_KEYS[method])
    s = dict(_METHOD_KEYS[method], **raw)
    steps = s["steps"] if isinstance(s["steps"], list) else [s["steps"]]
    for st in steps:
        if st not in METHOD_STEPS[method]:
            _fail(spec_path, f"{prefix}steps", f"{st!r} is not a {method} step ({', '.join(METHOD_STEPS[method])})")
    s["steps"] = [st for st in METHOD_STEPS[method] if st in steps]  # canonical order
    s["dictionaries"] = _names_list(spec_path, f"{prefix}dictionaries", s["dictionaries"], dictionaries,
                                    "dictionaries")
    if method in ("ccs", "mutual"):
        s["images"] = _names_list(spec_path, f"{prefix}images", s["images"], images, "image folders")
        if not s["images"]:
            _fail(spec_path, f"{prefix}images", "needs an [images] entry")
    if method == "sith" and s["image_mean"] is not None and s["image_mean"] not in images:
        _fail(spec_path, f"{prefix}image_mean", f"{s['image_mean']!r} is not one of the spec's image folders")
    if method == "ccs":
        if s["labeller"] not in ("clip", "openai"):
            _fail(spec_path, f"{prefix}labeller", "must be 'clip' (offline) or 'openai'")
        if s["vocabulary"] is not None and s["vocabulary"] not in dictionaries:
            _fail(spec_path, f"{prefix}vocabulary", f"{s['vocabulary']!r} is not one of the spec's dictionaries")
    for k in ("sparsity", "batch_size", "n_texts", "n_parts", "u", "prune_seeds"):
        if k in s:
            _int(spec_path, prefix + k, s[k], low=0 if k == "prune_seeds" else 1)
    if s.get("rank") is not None:
        _int(spec_path, prefix + "rank", s["rank"], low=1)
    return s


def parse_spec(data: dict, *, path: Path | None = None, base: Path | None = None) -> Spec:
    """A parsed TOML document -> Spec (validated, paths resolved against `base`)."""
    base = Path(base if base is not None else (path.parent if path else Path.cwd())).resolve()
    _check_keys(path, "", data, ("sweep", "models", "dictionaries", "images", "methods"))
    sw = data.get("sweep", {})
    _check_keys(path, "sweep.", sw, _SWEEP_KEYS)
    sw = dict(_SWEEP_KEYS, **sw)
    models = _parse_models(path, base, data.get("models"))
    layers = _layers(path, "sweep.layers", sw["layers"])
    for i, m in enumerate(models):
        m["layers"] = m["layers"] or layers
    dictionaries = _parse_dictionaries(path, base, data.get("dictionaries"))
    images = _parse_images(path, base, data.get("images"))
    methods_raw = data.get("methods")
    if not isinstance(methods_raw, dict) or not methods_raw:
        _fail(path, "methods", f"give at least one of [methods.sith], [methods.ccs], [methods.mutual]")
    _check_keys(path, "methods.", methods_raw, METHOD_STEPS)
    methods = {m: _parse_method(path, m, raw, dictionaries, images) for m, raw in methods_raw.items()}
    if any(m in methods for m in ("sith", "ccs")):
        for i, m in enumerate(models):
            if not m["layers"]:
                _fail(path, "sweep.layers", f"sith and ccs need layers: set sweep.layers or models[{i}].layers")
    if sw["device"] not in ("auto", "cpu", "cuda"):
        _fail(path, "sweep.device", "must be 'auto', 'cpu' or 'cuda'")
    output = sw["output"]
    if not isinstance(output, str) or not output:
        _fail(path, "sweep.output", "must be a folder path")
    return Spec(path=path, base=base, output=_path(base, output).resolve(), seed=_int(path, "sweep.seed", sw["seed"]),
                threads=_int(path, "sweep.threads", sw["threads"], low=1),
                retries=_int(path, "sweep.retries", sw["retries"], low=0),
                shard_size=_int(path, "sweep.shard_size", sw["shard_size"], low=1), device=sw["device"],
                models=models, dictionaries=dictionaries, images=images, methods=methods)


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise SpecError("reading a TOML spec on Python 3.10 needs the 'tomli' package (pip install tomli); "
                            "Python 3.11+ has tomllib built in") from None
    return tomllib


def load_spec(path: str | os.PathLike, *, output: str | os.PathLike | None = None) -> Spec:
    """Read and validate the TOML spec at `path`; `output` overrides sweep.output."""
    tomllib = _toml()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML: {err}") from err
    spec = parse_spec(data, path=path)
    if output is not None:
        spec.output = Path(output).resolve()
    return spec
