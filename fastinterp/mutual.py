"""Mutual knowledge between CLIP's image and text encoders (SPEC.md section 3).

Pipeline for a batch of images (the images of one class, processed together):

* vision side (``fastinterp.vision``): foreground by the second singular vector, parts by PCA
  or K-means, three visual prompts per part, part embeddings;
* text side (here): every part is described by descriptors of a class-agnostic bank D
  (encoded ONCE and cached on disk; the reference re-encodes ~500 descriptor texts per image):
  top-500 per part, intersection across parts, relevance filter, fixed-iteration Sinkhorn,
  top-3 per part, de-duplicated and ordered by 2.5 * cos(image, descriptor): the vision
  concepts D_v. The language concepts D_y are the top-u descriptors of the predicted (or
  ground-truth) class's text embedding;
* mutual information of D_v and D_y and its dynamics (``fastinterp.kernels.mi``), curves
  batched over all images in one call.

Public entry points: ``explain`` (a batch), ``run_dataset`` (an ImageFolder, resumable,
per-image JSON + dataset curve + figures) and the figure functions. The ``fastinterp mutual``
command and the demo section are in ``fastinterp.cli.mutual``.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .concepts import ConceptDictionary
from .io import atomic_write_json, read_json, safe_name
from .kernels.mi import curve_auc, dataset_curve, mi_curves
from .mutual_figures import PART_COLORS, overlay_parts, part_colors, plot_concept_sets, plot_mi_curves, plot_parts  # noqa: F401
from .vision import PART_METHODS, VisualConcepts, extract_visual_concepts, stage

__all__ = [
    "IMAGENET_TEMPLATES", "curve_auc", "dataset_curve", "mi_curves", "load_descriptors",
    "class_embeddings", "vision_descriptors", "language_descriptors", "explain",
    "MutualExplanation", "run_dataset", "read_class_names", "plot_parts", "plot_mi_curves",
    "plot_concept_sets", "demo_descriptors", "part_colors", "part_methods",
]

IMAGENET_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of a {}.",
)
"""The paper's zero-shot prompt templates for ImageNet (appendix L), averaged per class."""


# ----------------------------------------------------------------------------------------
# descriptors and classes
# ----------------------------------------------------------------------------------------

def load_descriptors(source) -> ConceptDictionary:
    """The descriptor bank D.

    `source`: a ConceptDictionary; a list of strings; a plain-text file (one descriptor per
    line); or a JSON file holding a list, or an object class -> [descriptors] (as LLM
    descriptor files are shipped): the descriptors of all classes pooled, class-agnostic,
    de-duplicated in first-seen order.
    """
    if isinstance(source, ConceptDictionary):
        return source
    if isinstance(source, (list, tuple)):
        return ConceptDictionary(source, name="descriptors")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"descriptor file {str(path)!r} does not exist; give a .txt file "
                                f"(one descriptor per line) or a .json file (class -> descriptors)")
    if path.suffix.lower() != ".json":
        return ConceptDictionary.from_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"descriptor file {str(path)!r} is not valid UTF-8 JSON: {err}") from err
    if isinstance(data, dict):
        texts = []
        for cls, items in data.items():
            if isinstance(items, str):
                items = [items]
            if not isinstance(items, list):
                raise ValueError(f"descriptor file {str(path)!r}: class {cls!r} maps to "
                                 f"{type(items).__name__}; expected a list of strings")
            texts += items
    elif isinstance(data, list):
        texts = data
    else:
        raise ValueError(f"descriptor file {str(path)!r} holds a JSON {type(data).__name__}; "
                         f"expected a list or an object class -> [descriptors]")
    return ConceptDictionary(texts, name=path.stem)


def demo_descriptor_path():
    """The built-in small class-agnostic descriptor list's file (one descriptor per line)."""
    from importlib import resources

    return resources.files("fastinterp.data").joinpath("demo_descriptors.txt")


def demo_descriptors() -> ConceptDictionary:
    """The built-in small class-agnostic descriptor list."""
    text = demo_descriptor_path().read_text(encoding="utf-8")
    return ConceptDictionary(text.splitlines(), name="demo_descriptors")


def class_embeddings(model, tokenizer, class_names: Sequence[str], *, templates=IMAGENET_TEMPLATES,
                     cache_dir=None, progress: bool = False) -> torch.Tensor:
    """Zero-shot class embeddings: per class the mean of its L2-normalised template
    embeddings, re-normalised. (C, d) fp32 on CPU, unit rows (cached on disk per template)."""
    names = [str(c).strip() for c in class_names]
    if not names:
        raise ValueError("no class names given")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup or any(not c for c in names):
        raise ValueError(f"class names must be unique and non-empty; repeated: {dup}")
    if isinstance(templates, str):
        templates = (templates,)
    classes = ConceptDictionary(names, name="classes")
    acc = None
    for tpl in templates:
        e = F.normalize(classes.encode(model, tokenizer, template=tpl, cache_dir=cache_dir,
                                       progress=progress), dim=-1)
        acc = e if acc is None else acc + e
    return F.normalize(acc, dim=-1)


# ----------------------------------------------------------------------------------------
# text side on similarity matrices
# ----------------------------------------------------------------------------------------

def vision_descriptors(part_logits: Sequence[torch.Tensor], relevance: torch.Tensor, *,
                       top_initial: int = 500, relevance_offset: float = 0.02, per_part: int = 3,
                       scale: float = 2.5, sinkhorn_iters: int = 1000,
                       timings: dict | None = None) -> list[dict]:
    """Descriptors of each image's parts, batched over images (SPEC.md 3.2, D_v).

    Args:
        part_logits: B tensors (P_b, M): part embedding @ normalised descriptor embeddings^T.
        relevance: (B, M) cosine of each image with each descriptor.
    Per image: top-`top_initial` descriptors per part; their intersection over parts (in
    ascending id order); kept where rel > mean(rel over them) - `relevance_offset`; Sinkhorn
    with P = exp(scale * S) over `sinkhorn_iters` row-then-column normalisations;
    top-min(per_part, K) per part (ties in the plan, e.g. the all-ones plan of a single part,
    broken by the higher similarity); all parts' picks pooled, de-duplicated (first kept) and
    stably sorted by scale * rel, descending.

    Returns:
        B dicts: "part_ids" (list of P_b lists of descriptor ids), "ids" (ordered vision
        concepts), "scores" (scale * rel of each), "common" (size of the intersection) and
        "kept" (after the relevance filter).
    `timings`: the Sinkhorn call's seconds are added to "sinkhorn" (``vision.stage``).
    """
    from .kernels.sinkhorn import sinkhorn_fixed

    B = len(part_logits)
    if relevance.ndim != 2 or relevance.shape[0] != B:
        raise ValueError(f"relevance must be (B={B}, M), got {tuple(relevance.shape)}")
    M = relevance.shape[1]
    counts = [int(x.shape[0]) for x in part_logits]
    for b, x in enumerate(part_logits):
        if x.ndim != 2 or x.shape[1] != M:
            raise ValueError(f"part_logits[{b}] must be (P_b, {M}), got {tuple(x.shape)}")
    out = [{"part_ids": [], "ids": [], "scores": [], "common": 0, "kept": 0} for _ in range(B)]
    if sum(counts) == 0 or M == 0:
        return out
    hits = _top_hits(part_logits, counts, M, top_initial)
    rel = relevance.double()
    problems, where = [], []
    for b in range(B):
        if counts[b] == 0:
            continue
        common = keep = torch.nonzero(hits[b] == counts[b]).flatten()
        if common.numel():
            r = rel[b, common]
            keep = common[r > r.mean() - relevance_offset]
        out[b]["common"], out[b]["kept"] = int(common.numel()), int(keep.numel())
        if keep.numel() == 0:
            out[b]["part_ids"] = [[] for _ in range(counts[b])]
            continue
        problems.append(part_logits[b].double()[:, keep])
        where.append((b, keep))
    with stage(timings, "sinkhorn"):
        plans = sinkhorn_fixed(problems, scale=scale, epsilon=1.0, iters=sinkhorn_iters) if problems else []
    for P, S, (b, keep) in zip(plans, problems, where):
        out[b].update(_plan_picks(P, S, keep, rel[b], min(per_part, keep.numel()), scale))
    return out


def _top_hits(part_logits: Sequence[torch.Tensor], counts: list[int], M: int, top_initial: int) -> torch.Tensor:
    """(B, M) int64: for each image, in how many of its parts' top-`top_initial` lists each
    descriptor is."""
    B = len(part_logits)
    allp = torch.cat([x.double() for x in part_logits])
    top = allp.topk(min(int(top_initial), M), dim=1).indices
    owner = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
    hits = torch.zeros(B, M, dtype=torch.int64)
    hits.index_put_((owner[:, None].expand_as(top), top), torch.ones_like(top), accumulate=True)
    return hits


def _plan_picks(P, S: torch.Tensor, keep: torch.Tensor, rel: torch.Tensor, k: int, scale: float) -> dict:
    """One image's picks from its transport plan P (parts x kept descriptors): the top-k of
    each part, then all parts' picks pooled and ordered by scale * rel (see
    `vision_descriptors`)."""
    # Top-k of the plan, ties broken by the similarity: with a single part every column
    # of the plan normalises to 1 (exactly in the reference's row-then-column form, within
    # an ulp in our scaling form), and topk alone would pick arbitrary ties. Plan values
    # equal to 12 digits relative to the row's largest count as tied.
    P = np.asarray(P)
    tied = np.round(P / P.max(axis=1, keepdims=True), 12)
    order = np.lexsort((-S.numpy(), -tied), axis=1)
    part_ids = [[int(keep[j]) for j in row[:k]] for row in order.tolist()]
    seen: dict[int, None] = {}
    for row in part_ids:
        for i in row:
            seen.setdefault(i, None)
    ids = list(seen)
    sc = (scale * rel[torch.tensor(ids)]).tolist()
    order = sorted(range(len(ids)), key=lambda i: sc[i], reverse=True)
    return {"part_ids": part_ids, "ids": [ids[i] for i in order], "scores": [float(sc[i]) for i in order]}


def language_descriptors(class_emb: torch.Tensor, descriptor_emb: torch.Tensor, class_ids, u: int) -> torch.Tensor:
    """D_y: the top-u descriptors by cosine with each class's text embedding.

    class_emb (C, d), descriptor_emb (M, d) (any norm: both are normalised), class_ids (B,)
    -> (B, min(u, M)) int64 descriptor ids, most similar first.
    """
    sims = F.normalize(class_emb.float(), dim=-1)[torch.as_tensor(class_ids, dtype=torch.long)] \
        @ F.normalize(descriptor_emb.float(), dim=-1).T
    return sims.topk(min(int(u), sims.shape[1]), dim=1).indices


# ----------------------------------------------------------------------------------------
# explain a batch
# ----------------------------------------------------------------------------------------

@dataclass
class MutualExplanation:
    """`records`: one JSON-able dict per image; `visual`: the vision side's arrays (images,
    masks, part maps, ellipses) for figures; `descriptors`: the bank."""

    records: list
    visual: VisualConcepts
    descriptors: ConceptDictionary


def part_methods(parts) -> tuple[str, ...]:
    """`parts` ("pca", "kmeans", "both" or a list of them) as a tuple of part methods."""
    if isinstance(parts, str):
        parts = PART_METHODS if parts == "both" else (parts,)
    parts = tuple(parts)
    for p in parts:
        if p not in PART_METHODS:
            raise ValueError(f"parts={p!r}; choose from {PART_METHODS} or 'both'")
    if not parts:
        raise ValueError("no part method given")
    return parts


_SIZE_ARGS = ("n_parts", "u", "u_venn", "top_initial", "per_part", "batch_size")


def _check_sizes(**sizes) -> None:
    """Counts of `explain` (n_parts, u, ...) must be ints >= 1: u = 0 would give an empty D_y and
    MI 0 for every image, a silent wrong answer."""
    for name, value in sizes.items():
        if name in _SIZE_ARGS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name}={value!r} ({flag}) must be an integer >= 1")


def explain(model, preprocess, tokenizer, images, class_names: Sequence[str], descriptors, *,
            labels=None, parts="pca", n_parts: int = 5, facet: str = "tokens", seed: int = 0,
            crf: bool = True, language_from: str = "predicted", u: int = 50, u_venn: int = 15,
            top_initial: int = 500, relevance_offset: float = 0.02, per_part: int = 3,
            templates=IMAGENET_TEMPLATES, descriptor_template: str = "{}", batch_size: int = 64,
            cache_dir=None, descriptor_embeddings: torch.Tensor | None = None,
            class_embeddings_: torch.Tensor | None = None, visual: VisualConcepts | None = None,
            progress: bool = False, timings: dict | None = None) -> MutualExplanation:
    """Mutual-knowledge explanations of a batch of images (processed together).

    Args:
        model, preprocess, tokenizer: from ``fastinterp.load_clip`` (a ViT image tower).
        images: B PIL images (any mode; converted to RGB).
        class_names: the C candidate classes (zero-shot prediction among them).
        descriptors: the bank D (see ``load_descriptors``).
        labels: optional (B,) ground-truth class indices.
        parts: "pca", "kmeans", "both" or a list of them.
        language_from: "predicted" (the paper) or "label" (ground truth; needs `labels`).
        u, u_venn: sizes of D_y for the MI (50) and for the concept-set figure (15).
        descriptor_embeddings, class_embeddings_: precomputed raw (M, d) / unit (C, d)
            embeddings (skip encoding; the dataset runner passes them).
        visual: these images' vision side, from ``extract_visual_concepts`` with the same
            parts, n_parts, facet, seed and crf (checked, as is the number of images; the
            images themselves are not compared): skips it, so one vision pass serves many
            descriptor banks; `images` may then be None.
        timings: a dict that gets the seconds of each stage added (``vision.stage``):
            "text_embeddings" (encoding or cache reads), the vision side's stages (see
            ``extract_visual_concepts``: "clip_forward_images", "clip_forward_parts",
            "preprocess", "foreground", "crf", "parts"), "language" (prediction, D_y,
            relevance), "descriptor_selection", "sinkhorn", "mi" and "records".
    Returns:
        MutualExplanation; each record holds the prediction, foreground sizes, D_y, and per
        part method the parts (with ellipses and descriptors), D_v with scores, the MI curve,
        MI (its first point), AUC (its mean) and the concept sets (vision, language, mutual).
    """
    methods = part_methods(parts)
    _check_sizes(n_parts=n_parts, u=u, u_venn=u_venn, top_initial=top_initial, per_part=per_part,
                 batch_size=batch_size)
    if language_from not in ("predicted", "label"):
        raise ValueError(f"language_from={language_from!r}; use 'predicted' or 'label'")
    bank = load_descriptors(descriptors)
    B = len(images) if images is not None else len(visual.image_embeddings) if visual is not None else 0
    if B == 0:
        raise ValueError("explain needs at least one image")
    labels = _check_labels(labels, B, class_names, language_from)
    with stage(timings, "text_embeddings"):
        desc, cls = _text_embeddings(model, tokenizer, bank, class_names, templates, descriptor_template,
                                     cache_dir, descriptor_embeddings, class_embeddings_, progress)
    if visual is None:
        vc = extract_visual_concepts(model, preprocess, images, methods=methods, n_parts=n_parts, facet=facet,
                                     seed=seed, crf=crf, batch_size=batch_size, progress=progress, timings=timings)
    else:
        vc = _checked_visual(visual, B, methods, n_parts=n_parts, facet=facet, seed=seed, crf=crf)
    with stage(timings, "language"):
        img = F.normalize(vc.image_embeddings, dim=-1)
        predicted = (img @ cls.T).argmax(dim=1).tolist()
        lang = language_descriptors(cls, desc, labels if language_from == "label" else predicted, u)
        lang_venn = lang[:, :min(u_venn, lang.shape[1])]
        relevance = img @ desc.T
    texts = bank.texts
    records = [{
        "predicted": predicted[b],
        "predicted_class": str(class_names[predicted[b]]),
        "label": labels[b] if labels is not None else None,
        "label_class": str(class_names[labels[b]]) if labels is not None else None,
        "language_from": language_from,
        "foreground_patches": int(vc.foreground[b].sum()),
        "foreground_pixels": int(vc.crf_masks[b].sum()),
        "language_ids": lang[b].tolist(),
        "language_concepts": [texts[i] for i in lang[b].tolist()],
        "methods": {},
    } for b in range(B)]
    for method in methods:
        with stage(timings, "descriptor_selection"):
            logits = [e @ desc.T for e in vc.parts[method].embeddings]
            vis = vision_descriptors(logits, relevance, top_initial=top_initial,
                                     relevance_offset=relevance_offset, per_part=per_part, timings=timings)
        for b, rec in enumerate(_method_records(vc.parts[method], vis, lang, lang_venn, texts, timings)):
            records[b]["methods"][method] = rec
    for b in range(B):
        if records[b]["foreground_patches"] == 0:
            records[b]["note"] = "empty foreground: no parts, no vision concepts, MI 0"
    return MutualExplanation(records, vc, bank)


def _checked_visual(vc: VisualConcepts, B: int, methods, **settings) -> VisualConcepts:
    """A given vision side, refused when it holds another number of images, lacks a part
    method or was made with other settings (its parts would silently stand for another
    explanation)."""
    if len(vc.image_embeddings) != B:
        raise ValueError(f"visual holds {len(vc.image_embeddings)} images but {B} were given")
    missing = [m for m in methods if m not in vc.parts]
    if missing:
        raise ValueError(f"visual has no {missing} parts (it has {sorted(vc.parts)}); extract them with "
                         f"methods={tuple(methods)}")
    wrong = {k: (vc.settings[k], v) for k, v in settings.items() if k in vc.settings and vc.settings[k] != v}
    if wrong:
        raise ValueError("visual was extracted with other settings: " + ", ".join(
            f"{k}={had!r} there, {k}={want!r} here" for k, (had, want) in wrong.items()))
    return vc


def _text_embeddings(model, tokenizer, bank, class_names, templates, descriptor_template, cache_dir,
                     descriptor_embeddings, class_embeddings_, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit descriptor embeddings (M, d), unit class embeddings (C, d)), encoded (or read
    from the cache) unless given."""
    if descriptor_embeddings is None:
        descriptor_embeddings = bank.encode(model, tokenizer, template=descriptor_template,
                                            cache_dir=cache_dir, progress=progress)
    if descriptor_embeddings.shape[0] != len(bank):
        raise ValueError(f"{descriptor_embeddings.shape[0]} descriptor embeddings for {len(bank)} descriptors")
    if class_embeddings_ is None:
        class_embeddings_ = class_embeddings(model, tokenizer, class_names, templates=templates,
                                             cache_dir=cache_dir, progress=progress)
    return F.normalize(descriptor_embeddings.float(), dim=-1), F.normalize(class_embeddings_.float(), dim=-1)


def _check_labels(labels, B: int, class_names, language_from: str):
    """Ground-truth class indices as ints (or None), checked against the batch and the classes."""
    if labels is not None:
        labels = [int(v) for v in labels]
        if len(labels) != B:
            raise ValueError(f"{len(labels)} labels for {B} images")
        bad = [v for v in labels if not 0 <= v < len(class_names)]
        if bad:
            raise ValueError(f"labels {bad} are outside 0..{len(class_names) - 1} (the class list)")
    elif language_from == "label":
        raise ValueError("language_from='label' needs labels= (ground-truth class indices)")
    return labels


def _method_records(pr, vis: list[dict], lang: torch.Tensor, lang_venn: torch.Tensor, texts,
                    timings: dict | None = None) -> list[dict]:
    """One part method's record per image: its parts, D_v, the MI curve and the concept sets.

    pr: the method's parts (`VisualConcepts.parts[method]`); vis: `vision_descriptors` of
    them; lang / lang_venn: (B, u) / (B, u_venn) D_y ids.
    """
    with stage(timings, "mi"):
        curves = mi_curves([v["ids"] for v in vis], [lang[b].tolist() for b in range(len(vis))])
    with stage(timings, "records"):
        return _records_of(pr, vis, curves, lang_venn, texts)


def _records_of(pr, vis: list[dict], curves, lang_venn: torch.Tensor, texts) -> list[dict]:
    out = []
    for b, v in enumerate(vis):
        vision_set = [texts[i] for i in v["ids"]]
        venn_lang = [texts[i] for i in lang_venn[b].tolist()]
        venn_set = set(venn_lang)
        mutual = [t for t in vision_set if t in venn_set]
        parts_out = []
        for j, pid in enumerate(pr.part_ids[b]):
            ids = v["part_ids"][j] if j < len(v["part_ids"]) else []
            (cx, cy), (ew, eh), ang = pr.ellipses[b][j]
            parts_out.append({"part": pid, "pixels": int((pr.pixel_parts[b] == pid).sum()),
                              "ellipse": {"center": [cx, cy], "axes": [ew, eh], "angle": ang},
                              "descriptor_ids": ids, "descriptors": [texts[i] for i in ids]})
        curve = curves[b]
        out.append({
            "parts": parts_out,
            "common_descriptors": v["common"],
            "relevant_descriptors": v["kept"],
            "vision_ids": v["ids"],
            "vision_concepts": vision_set,
            "scores": v["scores"],
            "mi_curve": [float(x) for x in curve],
            "mi": float(curve[0]),
            "auc": curve_auc(curve),
            "concept_sets": {"vision": vision_set, "language": venn_lang, "mutual": mutual},
        })
    return out


# ----------------------------------------------------------------------------------------
# figures: fastinterp/mutual_figures.py (re-exported above)


# ----------------------------------------------------------------------------------------
# dataset runner
# ----------------------------------------------------------------------------------------

def _norm_class(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).casefold()


def read_class_names(source, folders: Sequence[str]) -> list[str]:
    """Display names of the class folders: None -> the folder names ('_' as spaces); a
    .json object folder -> name (every folder named, no other keys); or a text file of one
    name per line that must be the same set as the folder names (compared ignoring case,
    '_' / spaces): names are never matched to folders by position. A mismatch is a
    ValueError listing the differences."""
    if source is None:
        return [f.replace("_", " ") for f in folders]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"class names file {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{str(path)!r}: expected a JSON object folder -> class name")
        missing, extra = [f for f in folders if f not in data], sorted(set(data) - set(folders))
        if missing or extra:
            raise ValueError(f"{str(path)!r} does not match the class folders: no name for folders {missing[:10]}"
                             f"; names for folders that do not exist {extra[:10]}")
        return [str(data[f]) for f in folders]
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    by_norm = {_norm_class(n): n for n in names}
    missing = [f for f in folders if _norm_class(f) not in by_norm]
    extra = sorted(n for n in names if _norm_class(n) not in {_norm_class(f) for f in folders})
    if missing or extra or len(by_norm) != len(names):
        dup = sorted({n for n in names if [_norm_class(m) for m in names].count(_norm_class(n)) > 1})
        raise ValueError(f"{str(path)!r} is not the set of class folder names: folders without a name {missing[:10]}, "
                         f"names without a folder {extra[:10]}" + (f", repeated names {dup[:10]}" if dup else "")
                         + "; to give folders other names, pass a .json object folder -> class name")
    return [by_norm[_norm_class(f)] for f in folders]


def run_dataset(root, model, preprocess, tokenizer, descriptors, *, output, class_names=None,
                parts="both", seed: int = 0, language_from: str = "predicted", figures: int = 1,
                progress: bool = True, cache_dir=None, **explain_kwargs) -> dict:
    """Mutual knowledge over an image folder (ImageFolder layout: root/<class>/<image>).

    The images of each class are processed together (as the reference does). Writes
    ``output/images/<class>/<file>.json`` per image, ``figures/`` (parts overlays for the
    first `figures` images of each class, their concept sets, the dataset MI curves) and
    ``summary.json``: per part method the dataset curve (zero-padded point-wise mean), its
    AUC and the mean MI, plus counts of processed / resumed / unreadable images and empty
    classes. Unreadable files are skipped with a warning, listed in the summary and marked by
    a small JSON (``{"unreadable": reason}``, retried when the file changes). The run's duration goes
    to ``timing.json``, not the summary (the same run writes the same summary). Resumable: a class
    whose images all have JSON files is skipped (a partly done class is recomputed whole, so
    its results equal an uninterrupted run's).

    Returns the summary dict.
    """
    from tqdm.auto import tqdm

    from .images import load_images

    t0 = time.perf_counter()
    methods = part_methods(parts)
    _check_sizes(**explain_kwargs)  # before any encoding
    out = Path(output)
    listing = _list_classes(root)
    names = read_class_names(class_names, listing.classes)
    bank = load_descriptors(descriptors)
    desc_emb = bank.encode(model, tokenizer, cache_dir=cache_dir, progress=progress)
    cls_emb = class_embeddings(model, tokenizer, names, cache_dir=cache_dir, progress=progress)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    store = _RecordStore(out)
    by_class: dict[str, list[Path]] = {c: [] for c in listing.classes}
    for p, c in listing.items:
        by_class[c].append(p)

    processed = resumed = 0
    bar = tqdm(total=len(listing.items), desc="mutual: images", disable=not progress, unit="image")
    for ci, c in enumerate(listing.classes):
        paths = by_class[c]
        if not paths:
            continue
        bar.set_postfix_str(c, refresh=False)
        if all(store.done(p, c) for p in paths):
            resumed += sum("unreadable" not in (store.read(p, c) or {}) for p in paths)
            bar.update(len(paths))
            continue
        n_skipped = len(listing.skipped)
        loaded = load_images(paths, listing=listing)
        for p, err in listing.skipped[n_skipped:]:
            store.write(p, c, {"image": str(p), "class_folder": c, "unreadable": err, "stamp": _stamp(p)})
        if not loaded:
            continue
        exp = explain(model, preprocess, tokenizer, [im for _, im in loaded], names, bank,
                      labels=[ci] * len(loaded), parts=methods, seed=seed, language_from=language_from,
                      descriptor_embeddings=desc_emb, class_embeddings_=cls_emb, progress=False,
                      **explain_kwargs)
        processed += _write_class(store, c, loaded, exp, methods, figures)
        bar.update(len(paths))
    bar.close()

    agg = _aggregate(listing, store, methods)
    summary = {"root": str(root), "classes": len(listing.classes),
               "images_listed": len(listing.items), "images_with_results": agg["images"],
               "processed_this_run": processed, "resumed": resumed, "unreadable": agg["unreadable"],
               "empty_classes": listing.empty_classes, "empty_foreground": agg["empty_foreground"],
               "language_from": language_from, "descriptors": len(bank), "methods": agg["methods"]}
    if summary["methods"]:
        plot_mi_curves({m: v["dataset_curve"] for m, v in summary["methods"].items()},
                       out / "figures" / "dataset_mi_curves.png", title=f"dataset MI dynamics ({agg['images']} images)")
    atomic_write_json(out / "summary.json", summary)  # no timings here: the same run gives the same file
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / "timing.json", {"seconds": summary["seconds"]})
    if summary["unreadable"]:
        warnings.warn(f"{len(summary['unreadable'])} unreadable image(s) skipped; listed in summary.json",
                      RuntimeWarning, stacklevel=2)
    return summary


def _list_classes(root):
    """The ImageFolder listing of `root`, with a clear error when it has no class folders."""
    from .images import list_image_folder

    root_path = Path(root)
    if root_path.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in root_path.iterdir()):
        raise ValueError(f"{str(root)!r} has no class sub-folders; use the ImageFolder layout root/<class>/<image>")
    listing = list_image_folder(root, labelled=True)
    if not listing.classes:
        raise ValueError(f"{str(root)!r} has no class sub-folders; use the ImageFolder layout root/<class>/<image>")
    return listing


def _stamp(p: Path) -> list:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


class _RecordStore:
    """The per-image JSON files of a dataset run: output/images/<class>/<file>.json."""

    def __init__(self, out: Path):
        self.out = out

    def path(self, p: Path, c: str) -> Path:
        return self.out / "images" / safe_name(c) / (safe_name(p.name) + ".json")

    def read(self, p: Path, c: str):
        return read_json(self.path(p, c))

    def write(self, p: Path, c: str, rec: dict) -> None:
        atomic_write_json(self.path(p, c), rec, indent=1)

    def done(self, p: Path, c: str) -> bool:
        rec = self.read(p, c)
        if rec is None:
            return False
        # an unreadable file's marker holds only while the file is unchanged
        return "unreadable" not in rec or rec.get("stamp") == _stamp(p)


def _write_class(store: _RecordStore, c: str, loaded, exp: MutualExplanation, methods, figures: int) -> int:
    """Each explained image's record, and figures for the first `figures` of them; returns
    the number of records written."""
    figdir = store.out / "figures"
    for b, ((p, _), rec) in enumerate(zip(loaded, exp.records)):
        rec = dict(rec, image=str(p), class_folder=c)
        store.write(p, c, rec)
        if b < figures:
            stem = f"{safe_name(c)}__{safe_name(p.stem)}"
            for m in methods:
                plot_parts(exp.visual.images[b], exp.visual.parts[m].pixel_parts[b], rec, m,
                           figdir / f"{stem}__{m}_parts.png",
                           title=f"{c}/{p.name}: predicted {rec['predicted_class']}")
            plot_concept_sets(rec["methods"][methods[0]]["concept_sets"], figdir / f"{stem}__concept_sets.png",
                              image=f"{c}/{p.name}", method=methods[0])
    return len(exp.records)


def _aggregate(listing, store: _RecordStore, methods) -> dict:
    """Over every image that has a record (this run's and earlier runs'): "images" (with
    results), "unreadable" (path, error), "empty_foreground" and per method ("methods") the
    dataset curve, its AUC and the mean MI."""
    unreadable = {str(p): e for p, e in listing.skipped}
    curves = {m: [] for m in methods}
    mis = {m: [] for m in methods}
    empty_fg = 0
    records = 0
    for p, c in listing.items:
        rec = store.read(p, c)
        if rec is None:
            continue
        if "unreadable" in rec:
            unreadable.setdefault(str(p), rec["unreadable"])
            continue
        records += 1
        empty_fg += rec.get("foreground_patches", 1) == 0
        for m in methods:
            if m in rec.get("methods", {}):
                curves[m].append(rec["methods"][m]["mi_curve"])
                mis[m].append(rec["methods"][m]["mi"])
    per_method = {}
    for m in methods:
        if curves[m]:
            dc = dataset_curve(curves[m])
            per_method[m] = {"images": len(curves[m]), "mi": float(np.mean(mis[m])),
                             "dataset_curve": [float(x) for x in dc], "auc": curve_auc(dc)}
    return {"images": records, "unreadable": [{"path": p, "error": e} for p, e in unreadable.items()],
            "empty_foreground": int(empty_fg), "methods": per_method}
