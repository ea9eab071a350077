"""Mutual knowledge, the straightforward per-image flow of the reference (SPEC.md section 3).

What the reference notebook does for the images of one class, written plainly:

* the class's images go through the image tower together (features by a forward hook);
* foreground: a full SVD of the stacked, L2-normalised patch tokens; the second left singular
  vector with the sign rule; per image, ``skimage.measure.label`` components (8-connected),
  the largest plus the second largest if it has >= 5 patches; nearest upsampling + dense CRF;
* parts over all foreground tokens (PCA or K-means, the same algorithms as fastinterp.vision);
* then image by image: the three prompts per part opened through PIL and the preprocess,
  encoded per image; descriptor logits against the precomputed descriptor classifier; top-500
  per part and a Python-set intersection; the common descriptors' TEXTS re-encoded to get their
  relevance to the image (the image re-encoded too); the 1000-iteration Sinkhorn of small
  tensor ops (``fastinterp.reference.mi.sinkhorn_reference``); top-3 per part; the picked
  descriptors' texts encoded AGAIN for the 2.5 * cosine ordering; the MI curve by the O(N M)
  Python loop (``fastinterp.reference.mi.mi_curve_reference``).

This is the baseline the benchmark times and the parity tests compare with. Slow on purpose.
Deliberate differences from the original: an empty foreground gives an image with no
parts (the original crashes there); ties in the Sinkhorn plan (a single part's plan is all
ones) go to the higher similarity (the original leaves them to torch.topk's order).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .mi import curve_auc_reference, dataset_curve_reference, mi_curve_reference, sinkhorn_reference


def _largest_cc_reference(mask: np.ndarray, exclude=None) -> np.ndarray:
    from skimage.measure import label as measure_label

    mask = np.array(mask, dtype=np.float64)
    mask[mask != 0] = 1
    if exclude is not None:
        mask[exclude] = 0
    labels = measure_label(mask.astype(np.int64), connectivity=2)
    if labels.sum() == 0:
        return np.zeros(mask.shape, dtype=bool)
    largest = np.argmax(np.bincount(labels.flat)[1:]) + 1
    return labels == largest


def foreground_reference(features: torch.Tensor, grid) -> np.ndarray:
    """(B, N, D) -> (B, h, w) bool foreground masks, the reference's way (full SVD)."""
    B, N, D = features.shape
    h, w = grid
    X = F.normalize(features.reshape(B * N, D).double(), p=2, dim=-1)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    u = U[:, 1].numpy().copy()
    frac = np.mean(u > 0)
    if 0.5 < frac < 1.0:
        u = 0 - u
    elif frac == 0.5 and u[np.argmax(np.abs(u))] < 0:  # fastinterp's tie rule (the original keeps the SVD's sign)
        u = 0 - u
    fg_values = u.copy()
    fg_values[u < 0] = 0
    masks = []
    for i in range(B):
        m = fg_values[i * N:(i + 1) * N].reshape(h, w)
        first = _largest_cc_reference(m)
        second = _largest_cc_reference(m, first)
        if second.sum() >= 5:
            first = np.logical_or(first, second)
        masks.append(first)
    return np.stack(masks)


@torch.no_grad()
def _encode_text_reference(model, tokenizer, texts, device):
    tokens = tokenizer(list(texts)).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def explain_reference(model, preprocess, tokenizer, images, descriptor_texts, descriptor_weights,
                      class_weights, *, method: str = "pca", n_parts: int = 5, seed: int = 0,
                      facet: str = "tokens", crf: bool = True, u: int = 50, top_initial: int = 500,
                      relevance_offset: float = 0.02, per_part: int = 3, sinkhorn_iters: int = 1000) -> list[dict]:
    """The reference flow for one class's images.

    Args:
        images: B PIL RGB images.
        descriptor_texts: the M descriptor strings.
        descriptor_weights: (M, d) unit rows, the precomputed descriptor classifier.
        class_weights: (C, d) unit rows, the precomputed zero-shot classifier.
    Returns:
        B dicts: "predicted", "foreground_patches", "part_ids" (part labels present),
        "common_descriptors" (the parts' top-k intersection) and "relevant_descriptors" (after
        the relevance filter) when a part is present, "part_descriptors" (ids per part),
        "vision_ids", "scores", "language_ids", "mi_curve".
    """
    from ..vision import (crf_refine, fit_part_ellipse, kmeans_parts, normalization_of, patch_features,
                          pca_parts, to_uint8_images, upsample_mask, visual_prompts)
    from ..models import vit_info

    info = vit_info(model)
    device = next(model.parameters()).device
    mean, std = normalization_of(preprocess, model)
    pixels = torch.stack([preprocess(im) for im in images])
    feats, _ = patch_features(model, pixels, facet=facet)
    B, N, D = feats.shape
    h, w = info.patch_grid
    S = pixels.shape[-1]
    fg = foreground_reference(feats, (h, w))
    uint8 = to_uint8_images(pixels, mean, std)

    crf_masks = []
    for i in range(B):
        up = upsample_mask(fg[i], S)
        crf_masks.append(crf_refine(uint8[i], up) if crf else up)

    fg_flat = fg.reshape(-1)
    fg_feats = feats.reshape(B * N, D)[torch.from_numpy(fg_flat)]
    labels = np.full(B * N, -1, dtype=np.int64)
    if fg_feats.shape[0]:
        labels[fg_flat] = pca_parts(fg_feats, n_parts) if method == "pca" else kmeans_parts(fg_feats, n_parts, seed=seed)
    labels = labels.reshape(B, h, w)

    weight_dissection = class_weights @ descriptor_weights.T
    results = []
    for i in range(B):
        img_t = pixels[i:i + 1].to(device)
        image_feature = F.normalize(model.encode_image(img_t).float(), dim=-1)
        predicted = int((image_feature.cpu() @ class_weights.T).argmax())
        _, w_idx = weight_dissection[predicted].topk(min(u, len(descriptor_texts)))
        w_idx = w_idx.tolist()
        part_map = upsample_mask(labels[i].astype(np.int16), S)
        part_map[~crf_masks[i]] = -1
        present = [int(v) for v in np.unique(part_map) if v >= 0]
        rec = {"predicted": predicted, "foreground_patches": int(fg[i].sum()), "part_ids": present,
               "part_descriptors": [], "vision_ids": [], "scores": [], "language_ids": w_idx}
        if present:
            prompts = visual_prompts(uint8[i], [fit_part_ellipse(part_map == p) for p in present])
            stacks = []
            for a in range(3):  # [red outline], [grey], [blur]: each through PIL and the preprocess
                stacks.append(torch.stack([preprocess(Image.fromarray(prompts[j, a])) for j in range(len(present))]))
            x = torch.stack(stacks).reshape(3 * len(present), 3, S, S).to(device)
            emb = F.normalize(model.encode_image(x).float(), dim=-1).reshape(3, len(present), -1).mean(0).cpu()
            logits = emb @ descriptor_weights.T
            _, top = torch.topk(logits, min(top_initial, logits.shape[1]), dim=1)
            common = set(top[0].tolist())
            for r in range(1, logits.shape[0]):
                common.intersection_update(top[r].tolist())
            common = torch.tensor(sorted(common), dtype=torch.long)
            rec["common_descriptors"] = common.tolist()
            if len(common):
                texts = [descriptor_texts[v] for v in common.tolist()]
                rel = (_encode_text_reference(model, tokenizer, texts, device) @ image_feature.T).squeeze(-1).cpu()
                common = common[rel.double() > (rel.double().mean() - relevance_offset)]
            rec["relevant_descriptors"] = common.tolist()
            if len(common):
                S_common = torch.stack([logits[r, common] for r in range(logits.shape[0])])
                P = sinkhorn_reference(S_common.double(), scale=2.5, epsilon=1.0, iters=sinkhorn_iters)
                k = min(per_part, len(common))
                part_descs = []
                for r in range(P.shape[0]):
                    # plan value first, similarity breaking ties (a single part's plan is all ones)
                    picks = sorted(range(P.shape[1]), key=lambda j: (-float(P[r, j]), -float(S_common[r, j])))[:k]
                    ids = []
                    for v in picks:
                        if int(common[v]) not in ids:
                            ids.append(int(common[v]))
                    part_descs.append(ids)
                flat = [d for row in part_descs for d in row]
                scores = (_encode_text_reference(model, tokenizer, [descriptor_texts[d] for d in flat], device)
                          @ image_feature.T).squeeze(-1).cpu().double() * 2.5
                kept, kept_scores = [], []
                for d, s in zip(flat, scores.tolist()):
                    if d not in kept:
                        kept.append(d)
                        kept_scores.append(s)
                order = sorted(range(len(kept)), key=lambda k: kept_scores[k], reverse=True)
                rec["part_descriptors"] = part_descs
                rec["vision_ids"] = [kept[k] for k in order]
                rec["scores"] = [kept_scores[k] for k in order]
            else:
                rec["part_descriptors"] = [[] for _ in present]
        rec["mi_curve"] = mi_curve_reference(rec["vision_ids"], w_idx, oov_id=len(descriptor_texts) + 1)
        results.append(rec)
    return results


def dataset_auc_reference(records: list[dict]) -> tuple[list[float], float]:
    """Dataset MI curve (zero-padded point-wise mean, float32) and its AUC."""
    curve = dataset_curve_reference([r["mi_curve"] for r in records])
    return curve, curve_auc_reference(curve)
