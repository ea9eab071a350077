"""CCS head-pruning experiments (SPEC.md 2.4): prune sets of attention heads chosen from a
CCS results table and measure zero-shot accuracy over an image folder.

Head sets (from a table with one row per scored head: layer, head, ccs[, label]):
- "original": nothing pruned;
- "high": heads with CCS >= `high_min` (5, the paper's high bucket);
- "low": heads with CCS <= `low_max` (1);
- "random-s<seed>": |high| heads drawn from the table's non-high heads, one set per seed;
- "high-eq-s<seed>" / "low-eq-s<seed>": min(|high|, |low|) heads drawn from the high and
  from the low heads (the equal-count comparison);
- "concept:<name>": heads whose label contains the concept (e.g. "location");
- any explicit named head lists.
All sets are evaluated in one `fastinterp.ablation.masked_forward` pass per image batch.
Outputs: results.json (resumable), results.csv, results.md and accuracy.png.
The `fastinterp ccs prune` command and the demo section are in `fastinterp.cli.ccs`.
"""
from __future__ import annotations

import csv
import json
import math
import random
import warnings
from pathlib import Path

import torch

from .ablation import MODES, head_set_masks
from .io import atomic_open, atomic_write_json, atomic_write_text
from .vit import parse_head

__all__ = [
    "HeadSet",
    "encode_under_masks",
    "max_skew_under_masks",
    "retrieval_under_masks",
    "build_head_sets",
    "folder_head_means",
    "plot_results",
    "read_ccs_table",
    "run_pruning",
    "write_results",
]

LAYER_KEYS = ("layer", "layer_idx", "layer_index")
HEAD_KEYS = ("head", "head_idx", "head_index")
SCORE_KEYS = ("ccs", "score", "ccs_score")
LABEL_KEYS = ("label", "concept", "property")


class HeadSet(dict):
    """{"name", "kind", "seed", "heads": [(layer, head)]} (a dict, so it serialises to JSON)."""


def _pick(row: dict, keys, what: str, path):
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    for k in keys:
        if k in lower and lower[k] not in (None, ""):
            return lower[k]
    if what is None:
        return None
    raise ValueError(f"{str(path)!r}: a row has no {what} column (looked for {', '.join(keys)}); "
                     f"columns found: {sorted(lower)}")


def read_ccs_table(path) -> list[dict]:
    """Rows {"layer", "head", "ccs", "label"} from a CCS results CSV or JSON file.

    CSV: a header with at least layer, head, ccs (label optional). JSON: a list of such
    records, or an object holding one under "heads" / "results" / "rows".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CCS table {str(path)!r} does not exist; write one with `fastinterp ccs` "
                                f"or give heads explicitly with --heads NAME=L11.H0,L10.H5")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            for key in ("heads", "results", "rows"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ValueError(f"{str(path)!r}: expected a JSON list of head records (layer, head, ccs, label)")
        raw = data
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            raw = list(csv.DictReader(fh))
    rows = []
    for r in raw:
        if not isinstance(r, dict):
            raise ValueError(f"{str(path)!r}: every record must be an object with layer, head, ccs")
        try:
            head = _pick(r, HEAD_KEYS, "head", path)
            if _pick(r, LAYER_KEYS, None, path) is None and isinstance(head, str) and not head.strip().isdigit():
                layer, head = parse_head(head)  # "L11.H3" in one column
            else:
                layer = int(_pick(r, LAYER_KEYS, "layer", path))
                head = int(head)
            score = float(_pick(r, SCORE_KEYS, "ccs", path))
        except (TypeError, ValueError) as err:
            if "column" in str(err):
                raise
            raise ValueError(f"{str(path)!r}: row {r} has a non-numeric layer/head/ccs: {err}") from err
        if not math.isfinite(score):
            raise ValueError(f"{str(path)!r}: row {r} has a non-finite CCS")
        label = _pick(r, LABEL_KEYS, None, path)
        rows.append({"layer": layer, "head": head, "ccs": score, "label": "" if label is None else str(label)})
    if not rows:
        raise ValueError(f"{str(path)!r} lists no heads")
    return rows


def _sample(pool, n, seed):
    pool = sorted(pool)
    if n > len(pool):
        raise ValueError(f"cannot draw {n} heads from a pool of {len(pool)}")
    return sorted(random.Random(seed).sample(pool, n))


def _table_sets(keyed: dict, seeds, high_min: float, low_max: float, skipped: list) -> list[HeadSet]:
    """high / low / random / equal-count sets of a CCS table; the sets that cannot be formed
    go to `skipped` as {"set", "reason"}."""
    sets = []
    high = sorted(k for k, r in keyed.items() if r["ccs"] >= high_min)
    low = sorted(k for k, r in keyed.items() if r["ccs"] <= low_max)
    rest = sorted(k for k in keyed if k not in set(high))
    no_high = f"no head has CCS >= {high_min:g}"
    for name, heads, reason in (("high", high, no_high), ("low", low, f"no head has CCS <= {low_max:g}")):
        if heads:
            sets.append(HeadSet(name=name, kind=name, seed=None, heads=heads))
        else:
            skipped.append({"set": name, "reason": reason})
    seeded = lambda kind: f"{kind}-s{{{','.join(map(str, seeds))}}}"  # noqa: E731
    if high and len(rest) >= len(high):
        for s in seeds:
            sets.append(HeadSet(name=f"random-s{s}", kind="random", seed=s, heads=_sample(rest, len(high), s)))
    elif seeds:
        skipped.append({"set": seeded("random"), "reason": no_high + " (random sets match the high set's size)"
                        if not high else f"only {len(rest)} non-high heads to draw {len(high)} from"})
    n_eq = min(len(high), len(low))
    if n_eq:
        for s in seeds:
            sets.append(HeadSet(name=f"high-eq-s{s}", kind="high-eq", seed=s, heads=_sample(high, n_eq, s)))
            sets.append(HeadSet(name=f"low-eq-s{s}", kind="low-eq", seed=s, heads=_sample(low, n_eq, s)))
    elif seeds:
        why = no_high if not high else f"no head has CCS <= {low_max:g}"
        skipped += [{"set": seeded(k), "reason": why + " (equal-count sets need high and low heads)"}
                    for k in ("high-eq", "low-eq")]
    return sets


def build_head_sets(table=None, *, seeds=(0, 1, 2), high_min: float = 5, low_max: float = 1,
                    concepts=(), explicit=None, skipped: list | None = None) -> list[HeadSet]:
    """The experiment's head sets (see the module docstring), "original" first.

    A set that cannot be formed (no high heads, no low heads, too few heads to draw from) is
    left out and reported in `skipped` (a list, if given) as {"set", "reason"}, else warned about.
    """
    sets = [HeadSet(name="original", kind="original", seed=None, heads=[])]
    warn, skipped = skipped is None, [] if skipped is None else skipped
    if table:
        keyed = {}
        for r in table:
            keyed[(r["layer"], r["head"])] = r
        sets += _table_sets(keyed, seeds, high_min, low_max, skipped)
        for item in skipped if warn else ():
            warnings.warn(f"head set {item['set']} cannot be formed: {item['reason']}", RuntimeWarning, stacklevel=2)
        for concept in concepts:
            c = concept.strip().lower()
            heads = sorted(k for k, r in keyed.items() if c and c in r["label"].lower())
            if not heads:
                labels = sorted({r["label"] for r in keyed.values() if r["label"]})
                raise ValueError(f"no head in the CCS table is labelled with {concept!r}; labels: {labels[:20]}")
            sets.append(HeadSet(name=f"concept:{c}", kind="concept", seed=None, heads=heads))
    for name, heads in (explicit or {}).items():
        sets.append(HeadSet(name=name, kind="explicit", seed=None, heads=[parse_head(h) for h in heads]))
    if len(sets) == 1:
        raise ValueError("no head sets to prune: give a CCS table and/or explicit head lists")
    names = [s["name"] for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"head set names must be unique; repeated: {dup}")
    return sets


@torch.no_grad()
def folder_head_means(model, preprocess, folder, *, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """`head_output_means` over every image of a folder (for mode="mean")."""
    from .ablation import head_output_means
    from .images import list_image_folder, load_images

    listing = list_image_folder(folder)
    device = next(model.parameters()).device
    paths = [p for p, _ in listing.items]

    def batches():
        for start in range(0, len(paths), batch_size):
            loaded = load_images(paths[start:start + batch_size], listing=listing)
            if loaded:
                yield torch.stack([preprocess(im) for _, im in loaded]).to(device)

    return head_output_means(model, batches(), batch_size=batch_size, progress=progress)


@torch.no_grad()
def encode_under_masks(model, images: torch.Tensor, masks, *, mode: str = "zero", means=None,
                       batch_size: int = 32, backend=None, progress: bool = False) -> torch.Tensor:
    """`masked_forward` over many preprocessed images in batches.

    Args:
        images: (N, 3, H, W) preprocessed images (any device; moved batch by batch).
        masks: (C, layers, heads).

    Returns:
        (C, N, d) unnormalised embeddings on the CPU (float32).
    """
    from tqdm.auto import tqdm

    from .ablation import masked_forward

    device = next(model.parameters()).device
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="masked forward", disable=not progress):
        emb = masked_forward(model, images[start:start + batch_size].to(device), masks, mode=mode, means=means,
                             backend=backend)
        out.append(emb.float().cpu())
    return torch.cat(out, dim=1)


@torch.no_grad()
def retrieval_under_masks(model, tokenizer, frames, captions, masks, *, direction: str = "t2v",
                          mode: str = "zero", means=None, batch_size: int = 32, backend=None) -> dict:
    """Text-video retrieval for every head-mask configuration (CCS video retrieval).

    Args:
        frames: (V, F, 3, H, W) preprocessed frames (F frames per video; F = 1 for images).
        captions: V captions, caption i describing video i.
        masks: (C, layers, heads).

    Returns:
        `fastinterp.zeroshot.retrieval_metrics` with (C,) values: R1/R5/R10/R50 (%), MedR, MeanR.
        Frames are L2-normalised and mean-pooled; captions L2-normalised.
    """
    import torch.nn.functional as F

    from .concepts import encode_texts
    from .zeroshot import pool_frames, retrieval_metrics

    if not isinstance(frames, torch.Tensor) or frames.ndim != 5:
        raise ValueError(f"frames must be (videos, frames, 3, H, W), got {getattr(frames, 'shape', type(frames))}")
    V, n_frames = frames.shape[:2]
    if len(captions) != V:
        raise ValueError(f"{V} videos but {len(captions)} captions; give one caption per video")
    emb = encode_under_masks(model, frames.reshape(V * n_frames, *frames.shape[2:]), masks, mode=mode,
                             means=means, batch_size=batch_size, backend=backend)
    video = pool_frames(emb.reshape(emb.shape[0], V, n_frames, -1))  # (C, V, d)
    text = F.normalize(encode_texts(model, tokenizer, list(captions), progress=False), dim=-1)
    return retrieval_metrics(text.expand(video.shape[0], -1, -1), video, direction=direction)


@torch.no_grad()
def max_skew_under_masks(model, tokenizer, images: torch.Tensor, groups, queries, masks, *, k: int = 10,
                         templates=("a photo of a {}.",), mode: str = "zero", means=None, batch_size: int = 32,
                         backend=None) -> dict:
    """MaxSkew@k of text queries (e.g. occupations) over images with attribute groups, for
    every head-mask configuration (CCS fairness evaluation).

    Each query's text embedding is the normalised mean of its normalised template
    embeddings; similarity = cosine with the normalised image embeddings.

    Returns:
        `fastinterp.zeroshot.max_skew` with a leading C axis: "per_query" (C, Q), "mean" (C,).
    """
    import torch.nn.functional as F

    from .zeroshot import max_skew, text_classifier

    emb = F.normalize(encode_under_masks(model, images, masks, mode=mode, means=means, batch_size=batch_size,
                                         backend=backend), dim=-1)
    text = text_classifier(model, tokenizer, list(queries), templates).float().cpu()
    return max_skew(torch.einsum("qd,cnd->cqn", text, emb), groups, k)


def _run_key(model, folder, mode, templates) -> dict:
    return {"model": getattr(model, "fastinterp_name", type(model).__name__),
            "weights": getattr(model, "fastinterp_weights", None),
            "folder": str(Path(folder).resolve()), "mode": mode, "templates": list(templates)}


def run_pruning(model, preprocess, tokenizer, folder, head_sets, *, output=None, mode: str = "zero",
                templates=None, batch_size: int = 32, backend=None, config_chunk=None,
                progress: bool = True, skipped=None) -> list[dict]:
    """Zero-shot accuracy of the model with each head set pruned.

    Args:
        head_sets: from `build_head_sets` (or dicts with "name" and "heads").
        output: folder for results.json/.csv/.md and accuracy.png; an existing results.json
            of the same run (model, weights, folder, mode, templates) is reused: only head
            sets it lacks are evaluated.
        skipped: the sets `build_head_sets` could not form ({"set", "reason"}), reported
            in results.json and results.md.

    Returns:
        rows {"name", "kind", "seed", "n_heads", "heads", "accuracy", "drop"} in head-set
        order ("drop" = original accuracy minus this one, in points).
    """
    from .models import vit_info
    from .zeroshot import DEFAULT_TEMPLATES, evaluate_image_folder

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    templates = list(templates or DEFAULT_TEMPLATES)
    info = vit_info(model)
    head_sets = [HeadSet(s) for s in head_sets]
    if not any(s["name"] == "original" for s in head_sets):
        head_sets.insert(0, HeadSet(name="original", kind="original", seed=None, heads=[]))
    # validates every head index against the model
    head_set_masks((info.layers, info.heads), [s["heads"] for s in head_sets])
    key = _run_key(model, folder, mode, templates)
    done = {}
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        saved = output / "results.json"
        if saved.exists():
            try:
                payload = json.loads(saved.read_text(encoding="utf-8"))
                if payload.get("run") == key:
                    done = {(r["name"], tuple(map(tuple, r["heads"]))): r for r in payload["rows"]}
            except (ValueError, KeyError, TypeError):
                done = {}
    todo = [s for s in head_sets if (s["name"], tuple(map(tuple, s["heads"]))) not in done]
    results = dict(done)
    if todo:
        masks = head_set_masks((info.layers, info.heads), [s["heads"] for s in todo])
        means = folder_head_means(model, preprocess, folder, batch_size=batch_size,
                                  progress=progress) if mode == "mean" else None
        ev = evaluate_image_folder(model, preprocess, tokenizer, folder, masks, templates=templates, mode=mode,
                                   means=means, batch_size=batch_size, backend=backend,
                                   config_chunk=config_chunk, progress=progress)
        for s, acc in zip(todo, ev["accuracy"].tolist()):
            results[(s["name"], tuple(map(tuple, s["heads"])))] = {
                "name": s["name"], "kind": s["kind"], "seed": s["seed"], "n_heads": len(s["heads"]),
                "heads": [list(h) for h in s["heads"]], "accuracy": acc, "n_images": ev["n_images"]}
    rows = [dict(results[(s["name"], tuple(map(tuple, s["heads"])))]) for s in head_sets]
    base = next(r["accuracy"] for r in rows if r["name"] == "original")
    for r in rows:
        r["drop"] = base - r["accuracy"]
    if output is not None:
        write_results(rows, output, run=key, skipped=skipped)
    return rows


def _fmt_heads(heads) -> str:
    return " ".join(f"L{layer}.H{head}" for layer, head in heads)


def summarise(rows) -> list[dict]:
    """Seeded kinds (random, high-eq, low-eq) averaged over seeds: {"kind", "n_sets",
    "mean", "std", "n_heads"}; other sets are their own line."""
    out = []
    by_kind = {}
    for r in rows:
        if r.get("seed") is None:
            out.append({"name": r["name"], "n_sets": 1, "mean": r["accuracy"], "std": 0.0, "n_heads": r["n_heads"]})
        else:
            by_kind.setdefault(r["kind"], []).append(r)
    for kind, rs in by_kind.items():
        accs = torch.tensor([r["accuracy"] for r in rs], dtype=torch.float64)
        out.append({"name": f"{kind} (mean of {len(rs)} seeds)", "n_sets": len(rs), "mean": float(accs.mean()),
                    "std": float(accs.std(unbiased=False)), "n_heads": rs[0]["n_heads"]})
    return out


def write_results(rows, output, *, run=None, skipped=None) -> dict:
    """results.json (with the run key, for resuming), results.csv, results.md, accuracy.png;
    `skipped` head sets ({"set", "reason"}) are listed in results.json and results.md."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    payload = {"run": run, "rows": rows, "summary": summarise(rows), "skipped_sets": list(skipped or [])}
    atomic_write_json(output / "results.json", payload, indent=2)
    with atomic_open(output / "results.csv", "w") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "kind", "seed", "n_heads", "accuracy", "drop", "heads"])
        for r in rows:
            w.writerow([r["name"], r["kind"], "" if r["seed"] is None else r["seed"], r["n_heads"],
                        f"{r['accuracy']:.4f}", f"{r['drop']:.4f}", _fmt_heads(r["heads"])])
    lines = ["| head set | heads pruned | top-1 (%) | drop (points) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['n_heads']} | {r['accuracy']:.2f} | {r['drop']:.2f} |")
    summary = [s for s in summarise(rows) if s["n_sets"] > 1]
    if summary:
        lines += ["", "| averaged over seeds | heads | mean top-1 (%) | std |", "|---|---:|---:|---:|"]
        for s in summary:
            lines.append(f"| {s['name']} | {s['n_heads']} | {s['mean']:.2f} | {s['std']:.2f} |")
    if skipped:
        lines += ["", "Head sets that could not be formed:", ""]
        lines += [f"- {k['set']}: {k['reason']}" for k in skipped]
    atomic_write_text(output / "results.md", "\n".join(lines) + "\n")
    plot_results(rows, output / "accuracy.png")
    return {"json": output / "results.json", "csv": output / "results.csv", "md": output / "results.md",
            "png": output / "accuracy.png"}


def _heads_label(n: int) -> str:
    return f"{n} head" if n == 1 else f"{n} heads"


def plot_results(rows, path) -> Path:
    """Write `results_figure(rows)` to `path`."""
    results_figure(rows).savefig(path, dpi=100)
    return Path(path)


def results_figure(rows):
    """Bar chart (a `matplotlib.figure.Figure`): top-1 accuracy per head set, the value on each
    bar; seeded kinds are the mean over seeds with a +- std error bar (sets without seeds have
    no error bar)."""
    from matplotlib.figure import Figure

    summary = summarise(rows)
    names = [s["name"] for s in summary]
    fig = Figure(figsize=(max(4.5, 1.0 * len(names) + 1.5), 4.0), layout="constrained")
    ax = fig.subplots()
    colors = ["#555555" if n == "original" else "#c0392b" if n.startswith("high") else
              "#2980b9" if n.startswith("low") else "#7f8c8d" for n in names]
    x = list(range(len(names)))
    bars = ax.bar(x, [s["mean"] for s in summary], color=colors)
    seeded = [i for i, s in enumerate(summary) if s["n_sets"] > 1]
    if seeded:
        ax.errorbar(seeded, [summary[i]["mean"] for i in seeded], yerr=[summary[i]["std"] for i in seeded],
                    fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.bar_label(bars, labels=[f"{s['mean']:.1f}" for s in summary], fontsize=8, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n}\n({_heads_label(s['n_heads'])})" for n, s in zip(names, summary)], rotation=30,
                       ha="right", fontsize=8)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, max([s["mean"] + s["std"] for s in summary] + [1.0]) * 1.12)
    ax.set_title("accuracy after pruning each head set" + (" (error bars: std over seeds)" if seeded else ""),
                 fontsize=10)
    return fig
