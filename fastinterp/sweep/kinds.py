"""The work of each task kind: the methods' public functions on one point of the sweep.

Each function takes the running task's `Context`, writes its outputs through it and returns
the task's headline figures (JSON-able; the results table's columns)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["KINDS", "warm_up"]


def warm_up(methods) -> None:
    """What a fresh worker's first task would otherwise pay once: the lazy imports and
    loading Numba's cached machine code (about 2 s before a first mutual task on 2 cores).
    Done at worker start-up so that it counts as start-up, not as a task's work."""
    import open_clip  # noqa: F401

    from .. import ccs, mutual, sith, textspan  # noqa: F401

    if "mutual" in methods:
        import cv2  # noqa: F401
        import pydensecrf.densecrf  # noqa: F401
        import scipy.ndimage  # noqa: F401
        import scipy.sparse.linalg  # noqa: F401
        import sklearn.decomposition  # noqa: F401
        import sklearn.preprocessing  # noqa: F401

        from ..kernels.mi import mi_curves
        from ..kernels.sinkhorn import sinkhorn_fixed

        sinkhorn_fixed([torch.ones((2, 3), dtype=torch.float64)], iters=2)  # the types mutual.explain passes
        mi_curves([[0, 1]], [[1, 2]])


# --------------------------------------------------------------------------------------
# shared work
# --------------------------------------------------------------------------------------
def encode(ctx) -> dict:
    """The dictionary's raw text embeddings, once per (model, dictionary)."""
    model, _, tokenizer = ctx.model()
    d = ctx.dictionary()
    if ctx.settings["labeller_cache"]:  # also into the cache the CLIP labeller reads its vocabulary from
        emb = d.encode(model, tokenizer, cache_dir=ctx.root / "cache", progress=False)
    else:
        emb = d.encode(model, tokenizer, use_cache=False, progress=False)
    ctx.save_pt("embeddings.pt", {"embeddings": emb.clone().contiguous()})
    return {"texts": len(d), "dim": int(emb.shape[1])}


def image_mean(ctx) -> dict:
    from ..sith import image_mean as mean_of

    model, preprocess, _ = ctx.model()
    mean = mean_of(model, preprocess, ctx.payload["folder"], batch_size=ctx.settings["batch_size"], progress=False)
    ctx.save_pt("image_mean.pt", {"image_mean": mean})
    return {}


def contributions(ctx) -> dict:
    """Per-head direct contributions of one shard of images, for all the model's sweep layers."""
    from ..textspan import head_contributions

    model, preprocess, _ = ctx.model()
    files = [Path(ctx.payload["folder"]) / f for f in ctx.payload["files"]]
    c = head_contributions(model, files, ctx.settings["layers"], preprocess=preprocess,
                           batch_size=ctx.settings["batch_size"], progress=False)
    ctx.save_pt("contributions.pt", {"heads": c.heads.contiguous(), "layers": torch.tensor(c.layers)})
    return {"images": len(files)}


# --------------------------------------------------------------------------------------
# SITH
# --------------------------------------------------------------------------------------
def _image_mean(ctx):
    return ctx.load_pt("image_mean", "image_mean.pt")["image_mean"] if "image_mean" in ctx.task["deps"] else None


def _sith_kw(s: dict) -> dict:
    return {"rank": s["rank"], "method": s["method"], "sparsity": s["sparsity"], "sv_type": s["sv_type"],
            "fold_ln": s["fold_ln"]}


def sith_decompose(ctx) -> dict:
    from ..sith import decompose, decomposition_filename

    model, _, _ = ctx.model()
    s, layer = ctx.settings, ctx.coords["layer"]
    name = ctx.payload["dictionary_name"]
    res = decompose(model, ctx.embeddings(), [layer], image_mean=_image_mean(ctx), dictionary_name=name,
                    output_dir=ctx.folder, batch_size=s["batch_size"], progress=False, **_sith_kw(s))
    r = next(iter(res.values()))
    ctx.add_output(decomposition_filename(next(iter(res)), sv_type=s["sv_type"], fold_ln=s["fold_ln"],
                                          dictionary=name, method=s["method"], sparsity=s["sparsity"]))
    return {"signals": int(r["scores"].shape[0] * r["scores"].shape[1]),
            "mean_top_score": float(r["scores"][..., 0].mean())}


def sith_fidelity(ctx) -> dict:
    from ..sith import fidelity, load_decomposition, prepare_dictionary

    model, _, _ = ctx.model()
    s = ctx.settings
    (name,) = [n for n in ctx.dep_record("decompose")["outputs"] if n.endswith(".pt")]
    data = load_decomposition(ctx.dep_path("decompose", name))
    res = fidelity(model, ctx.coords["layer"], data["scores"], data["indices"], prepare_dictionary(ctx.embeddings()),
                   sv_type=s["sv_type"], fold_ln=s["fold_ln"], image_mean=_image_mean(ctx))
    ctx.write_json("fidelity.json", {"cos": res["cos"].tolist(), "heads": res["heads"], "overall": res["overall"]})
    o = res["overall"]
    return {"fidelity": o["mean"], "fidelity_std": o["std"], "fidelity_min": o["min"], "fidelity_max": o["max"]}


# --------------------------------------------------------------------------------------
# CCS
# --------------------------------------------------------------------------------------
def ccs_textspan(ctx) -> dict:
    """TextSpan descriptions of the layer's heads over the merged contribution shards."""
    from ..textspan import textspan

    model, _, _ = ctx.model()
    s, layer = ctx.settings, ctx.coords["layer"]
    n_shards = len(ctx.task["deps"]["contributions"])
    heads = torch.cat([ctx.load_pt("contributions", "contributions.pt", i)["heads"] for i in range(n_shards)])
    li = ctx.payload["layers"].index(layer)
    bank = ctx.dictionary()
    K = heads.shape[0]
    limit = min(s["rank"], K - 1, heads.shape[-1], len(bank))
    if s["n_texts"] > limit:
        raise ValueError(f"TextSpan can pick at most {limit} texts per head here (rank {s['rank']}, {K} images, "
                         f"{len(bank)} texts); lower methods.ccs.n_texts or use more images")
    res = textspan(heads[:, li:li + 1], ctx.embeddings(), n_texts=s["n_texts"], rank=s["rank"], return_details=True)
    records = []
    for h in range(heads.shape[2]):
        idx = res.indices[0, h].tolist()
        records.append({"layer": layer, "head": h, "descriptions": [bank[i] for i in idx], "indices": idx,
                        "stds": [round(float(v), 8) for v in res.stds[0, h]]})
    ctx.write_json("descriptions.json", {"images": K, "texts": len(bank), "heads": records})
    return {"heads": len(records), "mean_top_std": float(np.mean([r["stds"][0] for r in records]))}


def _labeller(ctx):
    from ..llm import ClipLabeller, LLMLabeller, OpenAIChat

    if ctx.settings["labeller"] == "openai":
        return LLMLabeller(OpenAIChat())
    model, _, tokenizer = ctx.model()
    vocab = ctx.dictionary(ctx.settings["vocabulary"])
    ctx.embeddings("vocabulary")  # checks the encode task finished (its cache is what the labeller reads)
    return ClipLabeller(model, tokenizer, vocab, threshold=ctx.settings["threshold"], cache_dir=ctx.root / "cache")


def ccs_label(ctx) -> dict:
    from ..ccs import label_heads

    records = ctx.load_json("textspan", "descriptions.json")["heads"]
    labels = label_heads(records, _labeller(ctx), progress=False)
    ctx.write_json("labels.json", labels)
    return {"distinct_labels": len(set(labels.values()))}


def ccs_score(ctx) -> dict:
    from ..ccs import score_heads, summarize

    records = ctx.load_json("textspan", "descriptions.json")["heads"]
    labels = ctx.load_json("previous", "labels.json")
    scores = score_heads(records, labels, _labeller(ctx), progress=False)
    summary = summarize(scores)
    ctx.write_json("ccs.json", {"heads": [sc.as_dict() for sc in scores], "summary": summary})
    n = summary["n_descriptions"]
    return {"mean_ccs": summary["mean_ccs"], "ccs_at_max": summary["ccs_at_k"][str(n)],
            **{f"{b}_heads": c for b, c in summary["bucket_counts"].items()}}


def ccs_prune(ctx) -> dict:
    from ..pruning import HeadSet, build_head_sets, run_pruning

    model, preprocess, tokenizer = ctx.model()
    table = [{"layer": r["layer"], "head": r["head"], "ccs": float(r["ccs"]), "label": r["label"]}
             for r in ctx.load_json("previous", "ccs.json")["heads"]]
    skipped: list = []
    if any(r["ccs"] >= 5 or r["ccs"] <= 1 for r in table):
        sets = build_head_sets(table, seeds=tuple(range(ctx.settings["seeds"])), skipped=skipped)
    else:  # no high and no low heads: only the unpruned accuracy to report
        sets = [HeadSet(name="original", kind="original", seed=None, heads=[])]
        skipped.append({"set": "high, low, random", "reason": "no head has CCS 5 or CCS <= 1"})
    rows = run_pruning(model, preprocess, tokenizer, ctx.payload["folder"], sets, mode=ctx.settings["mode"],
                       progress=False, skipped=skipped)
    ctx.write_json("prune.json", {"rows": rows, "skipped": skipped})
    acc = {r["name"]: r["accuracy"] for r in rows}
    rand = [r["accuracy"] for r in rows if r["kind"] == "random"]
    return {"acc_original": acc.get("original"), "acc_high": acc.get("high"), "acc_low": acc.get("low"),
            "acc_random": float(np.mean(rand)) if rand else None}


# --------------------------------------------------------------------------------------
# mutual knowledge
# --------------------------------------------------------------------------------------
def _class_images(folder: Path, c: str) -> list[Path]:
    from ..images import IMAGE_SUFFIXES

    return sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def mutual_vision(ctx) -> dict:
    """The vision side of each class of the shard (a class's images together, as
    run_dataset), once per (model, image folder): every dictionary's language side reads it."""
    from ..images import load_images
    from ..mutual import part_methods
    from ..vision import extract_visual_concepts
    from .tasks import seed_everything

    model, preprocess, _ = ctx.model()
    s, p = ctx.settings, ctx.payload
    folder = Path(p["folder"])
    classes, unreadable = {}, []
    for c in p["shard_classes"]:
        loaded = load_images(_class_images(folder, c))
        unreadable += sorted({str(q.relative_to(folder)) for q in _class_images(folder, c)}
                             - {str(q.relative_to(folder)) for q, _ in loaded})
        if not loaded:
            continue
        seed_everything(ctx.run["seed"])  # each class as if explained alone (OpenCV's generator included)
        vc = extract_visual_concepts(model, preprocess, [im for _, im in loaded], methods=part_methods(s["parts"]),
                                     n_parts=s["n_parts"], facet=s["facet"], seed=ctx.run["seed"], crf=s["crf"],
                                     batch_size=s["batch_size"])
        classes[c] = {"images": [q.relative_to(folder).as_posix() for q, _ in loaded], "visual": vc.state()}
    ctx.save_pt("visual.pt", {"classes": classes, "unreadable": unreadable})
    return {"images": sum(len(v["images"]) for v in classes.values())}


def mutual_shard(ctx) -> dict:
    """The language side of each class of the shard for one dictionary, over the shard's
    shared vision pass (`mutual.explain(visual=...)`)."""
    from ..mutual import class_embeddings, explain
    from ..vision import VisualConcepts

    model, preprocess, tokenizer = ctx.model()
    s, names = ctx.settings, ctx.payload["classes"]
    bank, desc = ctx.dictionary(), ctx.embeddings()
    cls = class_embeddings(model, tokenizer, names, cache_dir=ctx.root / "cache", progress=False)
    vision = ctx.load_pt("vision", "visual.pt")
    records = []
    for c, v in vision["classes"].items():
        exp = explain(model, preprocess, tokenizer, None, names, bank, labels=[names.index(c)] * len(v["images"]),
                      parts=s["parts"], n_parts=s["n_parts"], facet=s["facet"], seed=ctx.run["seed"], crf=s["crf"],
                      language_from=s["language_from"], u=s["u"], batch_size=s["batch_size"],
                      descriptor_embeddings=desc, class_embeddings_=cls,
                      visual=VisualConcepts.from_state(v["visual"]))
        records += [dict(r, image=name, class_folder=c) for name, r in zip(v["images"], exp.records)]
    ctx.write_json("records.json", {"records": records, "unreadable": vision["unreadable"]})
    return {"images": len(records)}


def mutual_explain(ctx) -> dict:
    """The shards merged: per part method the dataset MI curve, its AUC and the mean MI."""
    from ..kernels.mi import curve_auc, dataset_curve
    from ..mutual import part_methods

    records, unreadable = [], []
    for i in range(len(ctx.task["deps"]["shards"])):
        part = ctx.load_json("shards", "records.json", i)
        records += part["records"]
        unreadable += part["unreadable"]
    methods = part_methods(ctx.settings["parts"])
    summary, out = {}, {"images": len(records)}
    for m in methods:
        curves = [r["methods"][m]["mi_curve"] for r in records if m in r["methods"]]
        if not curves:
            continue
        dc = dataset_curve(curves)
        mi = float(np.mean([r["methods"][m]["mi"] for r in records if m in r["methods"]]))
        summary[m] = {"images": len(curves), "mi": mi, "dataset_curve": [float(x) for x in dc], "auc": curve_auc(dc)}
        out[f"mi_{m}"], out[f"auc_{m}"] = mi, float(curve_auc(dc))
    ctx.write_json("summary.json", {"methods": summary, "images": len(records), "unreadable": unreadable,
                                    "empty_foreground": sum(r.get("foreground_patches", 1) == 0 for r in records)})
    return out


KINDS = {"encode": encode, "image-mean": image_mean, "contributions": contributions,
         "sith.decompose": sith_decompose, "sith.fidelity": sith_fidelity, "ccs.textspan": ccs_textspan,
         "ccs.label": ccs_label, "ccs.score": ccs_score, "ccs.prune": ccs_prune, "mutual.vision": mutual_vision,
         "mutual.shard": mutual_shard, "mutual.explain": mutual_explain}
