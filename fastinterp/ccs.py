"""Concept Consistency Score (CCS) of attention heads (SPEC.md 2.3).

Pipeline, each step resumable from its output folder:
1. `describe_heads`: per-head direct contributions over an image set and TextSpan over a
   text bank: the n (5) descriptions of every head of the chosen layers (default: last 4)
   -> descriptions.json / descriptions.txt.
2. `label_heads`: one label per head from a labeller (`fastinterp.llm.LLMLabeller` over an
   OpenAI-compatible endpoint, or the offline `ClipLabeller`) -> labels.json.
3. `score_heads`: each (description, label) judged 1/0; CCS(head) = number of consistent
   descriptions (0..n) -> judgements.json; `write_results` -> ccs.csv, ccs.json with
   CCS@K (fraction of heads with CCS = K) and the buckets high (= n), moderate (= 3),
   low (<= 1).
A failing labeller call (after its retries) stops the step with a `CCSError` naming the
layer and head; the heads finished before it are already saved and are skipped on rerun.
The `fastinterp ccs` commands and the demo section are in `fastinterp.cli.ccs`.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .io import atomic_open, atomic_write_json, atomic_write_text
from .vit import check_layers, parse_head, vit_info

__all__ = [
    "CCSError",
    "HeadScore",
    "bucket",
    "describe_heads",
    "label_heads",
    "score_heads",
    "summarize",
    "write_results",
    "run_ccs",
    "read_descriptions",
    "read_labels",
    "read_labeller",
]

BUCKETS = ("high", "moderate", "low")


class CCSError(RuntimeError):
    """A head could not be labelled or judged; finished heads are saved."""


def _key(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


parse_head_name = parse_head  # the earlier name of `fastinterp.vit.parse_head`


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); delete it to start that step over") from err


# --------------------------------------------------------------------------------------
# 1. descriptions (TextSpan)
# --------------------------------------------------------------------------------------
def describe_heads(model, images, texts: Sequence[str], *, tokenizer=None, preprocess=None,
                   text_embeddings: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                   n_texts: int = 5, rank: int = 80, batch_size: int = 32, output=None,
                   progress: bool = True) -> list[dict]:
    """TextSpan descriptions of every head of `layers` (default: the last 4).

    Args:
        images: what `fastinterp.textspan.head_contributions` takes (pixels, PIL images or
            paths with `preprocess`, or a loader).
        texts: the text bank (M descriptions). text_embeddings: their (M, d) embeddings, or
            None to encode them with `tokenizer` (cached on disk).
        output: folder for contributions/ (resumable batches), descriptions.json and .txt.

    Returns:
        [{"layer", "head", "descriptions": [n texts], "indices": [n], "stds": [n]}] in
        (layer, head) order.
    """
    from .concepts import ConceptDictionary
    from .textspan import head_contributions, textspan

    info = vit_info(model)
    layers = list(range(max(0, info.layers - 4), info.layers)) if layers is None else check_layers(model, list(layers))
    bank = ConceptDictionary(texts, name="textspan")
    if len(bank) != len(list(texts)):
        warnings.warn(f"the text bank has blank or repeated lines; {len(bank)} unique descriptions are used",
                      RuntimeWarning, stacklevel=2)
    if text_embeddings is None:
        if tokenizer is None:
            raise ValueError("pass tokenizer= (to encode the text bank) or text_embeddings=")
        cache = Path(output) / "cache" if output is not None else None
        text_embeddings = bank.encode(model, tokenizer, cache_dir=cache, progress=progress)
    elif text_embeddings.shape[0] != len(bank):
        raise ValueError(f"text_embeddings has {text_embeddings.shape[0]} rows but the bank has {len(bank)} "
                         f"unique texts")
    out = Path(output) if output is not None else None
    contrib = head_contributions(model, images, layers, preprocess=preprocess, batch_size=batch_size,
                                 output=None if out is None else out / "contributions", progress=progress)
    K = len(contrib)
    limit = min(rank, K - 1, info.output_dim, len(bank))
    if n_texts > limit:
        raise ValueError(f"TextSpan can pick at most min(rank={rank}, images - 1={K - 1}, dim={info.output_dim}, "
                         f"texts={len(bank)}) = {limit} texts per head; got n_texts={n_texts}. Use more images "
                         f"or a smaller n_texts")
    res = textspan(contrib.heads, text_embeddings, n_texts=n_texts, rank=rank, return_details=True,
                   progress=progress)
    records = []
    for li, layer in enumerate(layers):
        for head in range(info.heads):
            idx = res.indices[li, head].tolist()
            records.append({"layer": layer, "head": head, "descriptions": [bank[i] for i in idx],
                            "indices": idx, "stds": [round(float(s), 8) for s in res.stds[li, head]]})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "descriptions.json",
                          {"model": getattr(model, "fastinterp_name", None),
                           "weights": str(getattr(model, "fastinterp_weights", "")),
                           "images": K, "texts": len(bank), "rank": rank, "n_texts": n_texts,
                           "layers": layers, "heads": records}, indent=2, ensure_ascii=False)
        lines = []
        for r in records:
            lines += ["-" * 18, f"Layer {r['layer']}, Head {r['head']}", "-" * 18, *r["descriptions"]]
        atomic_write_text(out / "descriptions.txt", "\n".join(lines) + "\n")
    return records


def read_descriptions(path) -> list[dict]:
    """Records from a descriptions.json (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "descriptions.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; run `fastinterp ccs textspan` first")
    data = _read_json(path, None)
    heads = data.get("heads") if isinstance(data, dict) else data
    if not isinstance(heads, list) or not heads:
        raise ValueError(f"{str(path)!r} lists no heads")
    for r in heads:
        if not isinstance(r, dict) or not {"layer", "head", "descriptions"} <= set(r):
            raise ValueError(f"{str(path)!r}: every head needs layer, head and descriptions; got {r!r}")
    return heads


def _select(records, heads):
    if heads is None:
        return list(records)
    available = {(r["layer"], r["head"]): r for r in records}
    out = []
    for h in heads:
        layer, head = parse_head(h)
        if (layer, head) not in available:
            layers = sorted({k[0] for k in available})
            n_heads = 1 + max(k[1] for k in available)
            raise IndexError(f"head {_key(layer, head)} has no descriptions; available layers {layers}, "
                             f"heads 0..{n_heads - 1}")
        out.append(available[(layer, head)])
    return out


# --------------------------------------------------------------------------------------
# 2. labels
# --------------------------------------------------------------------------------------
def _load_step(path: Path | None, labeller_id, what: str) -> dict:
    """The saved heads of labels.json / judgements.json, {} unless they were made by the
    same labeller (`labeller_id`; files of older versions record none)."""
    data = _read_json(path, {}) if path is not None else {}
    recorded, heads = (data.get("labeller"), data.get("heads")) if "heads" in data else (None, data)
    heads = {k: v for k, v in (heads or {}).items() if isinstance(v, dict)}
    if heads and recorded != labeller_id:
        warnings.warn(f"{str(path)!r} holds {len(heads)} {what} made by another labeller ({recorded!r}; now "
                      f"{labeller_id!r}): they are not reused", RuntimeWarning, stacklevel=3)
        return {}
    return heads


def _save_step(path: Path | None, labeller_id, heads: dict) -> None:
    if path is not None:
        atomic_write_json(path, {"labeller": labeller_id, "heads": heads}, indent=2, ensure_ascii=False)


def label_heads(records: Sequence[dict], labeller, *, output=None, heads=None, progress: bool = True,
                labeller_id=None, stats: dict | None = None) -> dict:
    """Label every head: {"L11.H3": "location", ...}. Resumes from output/labels.json, whose
    labels are reused only when `labeller_id` (what identifies the labeller: LLM and endpoint,
    or CLIP model, vocabulary and threshold; recorded in the file) and the head's
    descriptions are the same. `stats` (a dict, if given) gets the counts "reused" and "new"."""
    from tqdm.auto import tqdm

    records = _select(records, heads)
    path = Path(output) / "labels.json" if output is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    saved = _load_step(path, labeller_id, "labels")
    # a saved label is reused only for the same descriptions (a new TextSpan run relabels)
    saved = {k: v for k, v in saved.items() if isinstance(v.get("label"), str)}
    current = {_key(r["layer"], r["head"]): list(r["descriptions"]) for r in records}
    todo = [r for r in records if saved.get(_key(r["layer"], r["head"]), {}).get("descriptions")
            != current[_key(r["layer"], r["head"])]]
    for r in tqdm(todo, disable=not progress, desc="labelling heads", unit="head"):
        key = _key(r["layer"], r["head"])
        try:
            label = labeller.label(r["descriptions"])
        except Exception as err:
            raise CCSError(_failure("labelling", r, err, len(saved), path)) from err
        saved[key] = {"label": label, "descriptions": current[key]}
        _save_step(path, labeller_id, saved)
    if not todo:
        _save_step(path, labeller_id, saved)
    if stats is not None:
        stats.update(reused=len(records) - len(todo), new=len(todo))
    return {k: saved[k]["label"] for k in current}


def read_labels(path) -> dict:
    """{"L11.H3": label} from a labels.json written by `label_heads` (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; run `fastinterp ccs label` first")
    data = _read_json(path, {})
    data = data["heads"] if isinstance(data.get("heads"), dict) else data
    return {k: v["label"] if isinstance(v, dict) else v for k, v in data.items()}


def read_labeller(path):
    """What labels.json (or judgements.json) records as its labeller (None for older files)."""
    path = Path(path)
    data = _read_json(path / "labels.json" if path.is_dir() else path, {})
    return data.get("labeller") if isinstance(data, dict) and "heads" in data else None


def _failure(step, r, err, n_done, path) -> str:
    where = f"; {n_done} finished head(s) are saved in {str(path)!r}: run the same command again to resume" \
        if path is not None else ""
    return f"{step} layer {r['layer']} head {r['head']} failed: {type(err).__name__}: {err}{where}"


# --------------------------------------------------------------------------------------
# 3. judgements and scores
# --------------------------------------------------------------------------------------
@dataclass
class HeadScore:
    layer: int
    head: int
    label: str
    descriptions: list[str]
    judgements: list[int]

    @property
    def ccs(self) -> int:
        return int(sum(self.judgements))

    @property
    def bucket(self) -> str:
        return bucket(self.ccs, len(self.judgements))

    def as_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "label": self.label, "ccs": self.ccs,
                "bucket": self.bucket, "descriptions": self.descriptions, "judgements": self.judgements}


def bucket(ccs: int, n: int = 5) -> str:
    """"high" (CCS = n), "moderate" (CCS = 3), "low" (CCS <= 1), else "" (unbucketed)."""
    if not 0 <= ccs <= n:
        raise ValueError(f"CCS {ccs} outside 0..{n}")
    if ccs == n:
        return "high"
    if ccs <= 1:
        return "low"
    if ccs == 3:
        return "moderate"
    return ""


def score_heads(records: Sequence[dict], labels: dict, labeller, *, output=None, heads=None,
                progress: bool = True, labeller_id=None, stats: dict | None = None) -> list[HeadScore]:
    """Judge each (description, label) of each head; resumes from output/judgements.json
    (a head is redone if its label or descriptions changed; nothing is reused from another
    labeller, see `label_heads`). `stats` gets the counts "reused" and "new"."""
    from tqdm.auto import tqdm

    records = _select(records, heads)
    missing = [_key(r["layer"], r["head"]) for r in records if _key(r["layer"], r["head"]) not in labels]
    if missing:
        raise ValueError(f"no labels for {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                         f"run `fastinterp ccs label` first")
    path = Path(output) / "judgements.json" if output is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    done = _load_step(path, labeller_id, "judgements")
    out = []
    n_new = 0
    for r in tqdm(records, disable=not progress, desc="judging heads", unit="head"):
        key = _key(r["layer"], r["head"])
        label = labels[key]
        prev = done.get(key)
        if not (isinstance(prev, dict) and prev.get("label") == label
                and prev.get("descriptions") == list(r["descriptions"])):
            try:
                judgements = [int(labeller.judge(d, label)) for d in r["descriptions"]]
            except Exception as err:
                raise CCSError(_failure("judging", r, err, len(done), path)) from err
            if any(j not in (0, 1) for j in judgements):
                raise CCSError(f"judging layer {r['layer']} head {r['head']}: judgements must be 0/1, got {judgements}")
            done[key] = prev = {"label": label, "descriptions": list(r["descriptions"]), "judgements": judgements}
            n_new += 1
            _save_step(path, labeller_id, done)
        out.append(HeadScore(r["layer"], r["head"], label, list(r["descriptions"]), list(prev["judgements"])))
    if not n_new:
        _save_step(path, labeller_id, done)
    if stats is not None:
        stats.update(reused=len(records) - n_new, new=n_new)
    return out


def summarize(scores: Sequence[HeadScore]) -> dict:
    """CCS@K for K = 0..n (fraction of heads with CCS = K), bucket members and counts."""
    if not scores:
        raise ValueError("no head scores to summarise")
    n = len(scores[0].judgements)
    if any(len(s.judgements) != n for s in scores):
        raise ValueError("heads were judged on different numbers of descriptions; CCS@K needs one n")
    counts = [0] * (n + 1)
    for s in scores:
        counts[s.ccs] += 1
    buckets = {b: [_key(s.layer, s.head) for s in scores if s.bucket == b] for b in BUCKETS}
    return {"heads": len(scores), "n_descriptions": n,
            "ccs_at_k": {str(k): counts[k] / len(scores) for k in range(n + 1)},
            "count_at_k": {str(k): counts[k] for k in range(n + 1)},
            "mean_ccs": sum(s.ccs for s in scores) / len(scores),
            "buckets": buckets, "bucket_counts": {b: len(v) for b, v in buckets.items()}}


def write_results(scores: Sequence[HeadScore], output, *, meta: dict | None = None) -> dict:
    """ccs.csv (one row per head) and ccs.json ({"heads": rows, "summary": ...}); returns the summary."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(scores)
    rows = [s.as_dict() for s in scores]
    with atomic_open(out / "ccs.csv", "w") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "head", "label", "ccs", "bucket", "judgements", "descriptions"])
        for r in rows:
            w.writerow([r["layer"], r["head"], r["label"], r["ccs"], r["bucket"],
                        " ".join(map(str, r["judgements"])), " | ".join(r["descriptions"])])
    atomic_write_json(out / "ccs.json", {"heads": rows, "summary": summary, "meta": meta or {}},
                      indent=2, ensure_ascii=False)
    return summary


def run_ccs(records: Sequence[dict], labeller, *, output=None, heads=None, progress: bool = True):
    """Label, judge and summarise; returns (scores, summary) and writes the results."""
    labels = label_heads(records, labeller, output=output, heads=heads, progress=progress)
    scores = score_heads(records, labels, labeller, output=output, heads=heads, progress=progress)
    summary = write_results(scores, output, meta={"labeller": repr(labeller)}) if output is not None \
        else summarize(scores)
    return scores, summary
