"""Evaluation for head-pruning experiments (SPEC.md 2.4): zero-shot classification with
prompt-template ensembles, text-to-video / video-to-text retrieval metrics with frames
mean-pooled, and the MaxSkew bias metric.

Image embeddings may carry a leading configuration axis (C, B, d), as `masked_forward`
returns them, so every head set of an experiment is scored in one call.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_TEMPLATES",
    "class_names_from_folders",
    "evaluate_image_folder",
    "max_skew",
    "pool_frames",
    "retrieval_metrics",
    "retrieval_ranks",
    "text_classifier",
    "top1_accuracy",
]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "art of the {}.",
    "a drawing of a {}.",
)
"""A small prompt ensemble ("{}" is the class name); pass the dataset's own list for paper numbers."""


def _check_templates(templates) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates given; pass e.g. fastinterp.zeroshot.DEFAULT_TEMPLATES")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"templates must be strings with a '{{}}' slot for the class name; bad: {bad[:3]}")
    return templates


@torch.no_grad()
def text_classifier(model, tokenizer, class_names, templates=DEFAULT_TEMPLATES, *, device=None) -> torch.Tensor:
    """Zero-shot classifier weights by prompt ensembling.

    For each class: encode every template filled with the class name, L2-normalise each,
    average, L2-normalise the average.

    Returns:
        (K, d) float32 unit rows, one per class, on `device` (default: the model's).
    """
    from .concepts import encode_texts

    class_names = list(class_names)
    if not class_names:
        raise ValueError("no class names given")
    templates = _check_templates(templates)
    if device is None:
        device = next(model.parameters()).device
    # one length-bucketed encode of every (class, template) prompt, then per class the mean
    emb = encode_texts(model, tokenizer, [t.format(name) for name in class_names for t in templates],
                       progress=False, device=device)
    emb = F.normalize(emb, dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1).to(device)


def top1_accuracy(image_embeddings: torch.Tensor, classifier: torch.Tensor, labels) -> torch.Tensor:
    """Top-1 accuracy in percent.

    Args:
        image_embeddings: (B, d) or (C, B, d) (normalised here).
        classifier: (K, d) unit class rows.
        labels: (B,) class indices.

    Returns:
        scalar tensor, or (C,) per configuration. Ties go to the lowest class index.
    """
    labels = torch.as_tensor(labels, device=image_embeddings.device)
    if image_embeddings.shape[-2] != labels.shape[0]:
        raise ValueError(f"{image_embeddings.shape[-2]} images but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("no images to score")
    if (labels < 0).any() or (labels >= classifier.shape[0]).any():
        raise ValueError(f"labels must lie in 0..{classifier.shape[0] - 1}")
    logits = F.normalize(image_embeddings.float(), dim=-1) @ classifier.float().to(image_embeddings.device).T
    pred = logits.argmax(-1)
    return (pred == labels).float().mean(-1) * 100


def class_names_from_folders(classes) -> list[str]:
    """ImageFolder sub-folder names -> prompt class names ('golden_retriever' -> 'golden retriever')."""
    return [c.replace("_", " ").replace("-", " ").strip() for c in classes]


@torch.no_grad()
def evaluate_image_folder(model, preprocess, tokenizer, folder, masks, *, templates=DEFAULT_TEMPLATES,
                          mode: str = "zero", means=None, batch_size: int = 32, backend=None,
                          config_chunk=None, progress: bool = True):
    """Zero-shot top-1 accuracy of every head-mask configuration over an ImageFolder.

    Class names come from the sub-folder names. The images of each batch are encoded once
    per configuration by `fastinterp.ablation.masked_forward` (all configurations at once).

    Returns:
        dict with "accuracy" (C,) percent, "correct" (C,) counts, "n_images", "classes",
        "skipped" (unreadable files).
    """
    from tqdm.auto import tqdm

    from .ablation import check_masks, masked_forward
    from .images import list_image_folder, load_images
    from .models import vit_info

    listing = list_image_folder(folder, labelled=True)
    if len(listing.classes) < 2:
        raise ValueError(f"{str(folder)!r} needs at least two class sub-folders (ImageFolder layout: "
                         f"root/<class name>/*.jpg) for zero-shot classification; found {listing.classes}")
    info = vit_info(model)
    masks = check_masks(masks, info.layers, info.heads)
    device = next(model.parameters()).device
    classes = listing.classes
    classifier = text_classifier(model, tokenizer, class_names_from_folders(classes), templates, device=device)
    index = {c: i for i, c in enumerate(classes)}
    correct = torch.zeros(masks.shape[0], dtype=torch.long)
    n = 0
    items = listing.items
    for start in tqdm(range(0, len(items), batch_size), desc="zero-shot", disable=not progress, unit="batch"):
        chunk = items[start:start + batch_size]
        loaded = load_images([p for p, _ in chunk], listing=listing)
        if not loaded:
            continue
        label_of = {p: c for p, c in chunk}
        labels = torch.tensor([index[label_of[p]] for p, _ in loaded], device=device)
        batch = torch.stack([preprocess(im) for _, im in loaded]).to(device)
        emb = masked_forward(model, batch, masks, mode=mode, means=means, backend=backend, config_chunk=config_chunk)
        pred = (F.normalize(emb.float(), dim=-1) @ classifier.T).argmax(-1)
        correct += (pred == labels).sum(-1).cpu()
        n += len(loaded)
    if n == 0:
        raise ValueError(f"none of the images under {str(folder)!r} could be read")
    return {"accuracy": correct.double() / n * 100, "correct": correct, "n_images": n, "classes": classes,
            "skipped": [(str(p), r) for p, r in listing.skipped]}


def pool_frames(frame_embeddings: torch.Tensor) -> torch.Tensor:
    """Video embeddings as the CCS reference pools them: L2-normalise each frame, then the
    plain mean over frames (not re-normalised). (..., F, d) -> (..., d)."""
    if frame_embeddings.shape[-2] == 0:
        raise ValueError("videos with no frames")
    return F.normalize(frame_embeddings.float(), dim=-1).mean(-2)


def retrieval_ranks(text: torch.Tensor, visual: torch.Tensor, *, direction: str = "t2v") -> torch.Tensor:
    """0-based rank of the matching item for each query (item i matches query i).

    Args:
        text: (Q, d) or (C, Q, d) text embeddings (used as given: normalise them first).
        visual: (Q, d) or (C, Q, d) video/image embeddings (e.g. from `pool_frames`).
        direction: "t2v" ranks videos for each text, "v2t" texts for each video.

    Scores are dot products; ties are broken by item index (a stable sort, as Python's).
    """
    if direction not in ("t2v", "v2t"):
        raise ValueError(f"direction={direction!r}: choose 't2v' or 'v2t'")
    if text.shape[-2] != visual.shape[-2]:
        raise ValueError(f"{text.shape[-2]} texts but {visual.shape[-2]} videos; retrieval pairs item i with query i")
    if text.shape[-2] == 0:
        raise ValueError("no retrieval pairs")
    q, items = (text, visual) if direction == "t2v" else (visual, text)
    scores = q.float() @ items.float().transpose(-1, -2)  # (..., Q, Q)
    Q = scores.shape[-1]
    own = scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    idx = torch.arange(Q, device=scores.device)
    before = (scores > own) | ((scores == own) & (idx[None, :] < idx[:, None]))
    return before.sum(-1)


def retrieval_metrics(text: torch.Tensor, visual: torch.Tensor, *, direction: str = "t2v") -> dict:
    """R@1/5/10/50 (percent), MedR and MeanR (1-based) as the CCS reference reports them.

    Shapes as `retrieval_ranks`; with a leading C axis every value is a (C,) tensor.
    """
    ranks = retrieval_ranks(text, visual, direction=direction).double()
    out = {f"R{k}": (ranks < k).double().mean(-1) * 100 for k in (1, 5, 10, 50)}
    out["MedR"] = ranks.quantile(0.5, dim=-1) + 1  # numpy's median (mean of the middle two)
    out["MeanR"] = ranks.mean(-1) + 1
    return out


def max_skew(similarities: torch.Tensor, groups, k: int, *, n_groups: int | None = None) -> dict:
    """MaxSkew@k (the CCS reference's fairness metric).

    For each query (e.g. an occupation prompt), rank the images by similarity (stable:
    ties keep image order), count each attribute group in the top k, and take
    `max_g log((count_g / k) / (n_g / N))` over the groups that appear in the top k
    (n_g: the group's size among all N images).

    Args:
        similarities: (Q, N) or (C, Q, N) query-image similarities.
        groups: (N,) group index of each image.
        k: top-k size, 1 <= k <= N.

    Returns:
        {"per_query": (..., Q) MaxSkew, "mean": (...) mean over queries,
         "min_per_query": (..., Q) the smallest skew over the groups present}.
    """
    groups = torch.as_tensor(groups, dtype=torch.long, device=similarities.device)
    N = similarities.shape[-1]
    if groups.shape != (N,):
        raise ValueError(f"groups must be ({N},), one group per image; got {tuple(groups.shape)}")
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must lie in 1..{N} (the number of images)")
    if (groups < 0).any():
        raise ValueError("group indices must be >= 0")
    G = int(n_groups if n_groups is not None else int(groups.max()) + 1)
    sizes = torch.bincount(groups, minlength=G).double()
    order = torch.sort(similarities.double(), dim=-1, descending=True, stable=True).indices[..., :k]
    top_groups = groups[order]  # (..., Q, k)
    counts = F.one_hot(top_groups, G).sum(-2).double()  # (..., Q, G)
    present = counts > 0
    skew = torch.log((counts / k) / (sizes / N).clamp_min(1e-300))
    per_query = skew.masked_fill(~present, float("-inf")).amax(-1)
    min_per_query = skew.masked_fill(~present, float("inf")).amin(-1)
    return {"per_query": per_query, "mean": per_query.mean(-1), "min_per_query": min_per_query}


def read_templates(path) -> list[str]:
    """One template per line ('{}' = class name); blank lines and '#' comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return _check_templates([ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])
