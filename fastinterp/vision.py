"""Visual concepts of the mutual-knowledge method (SPEC.md section 3.1).

For a batch of B images (the reference processes the images of one class together):

1. features: the last block's residual tokens before ``ln_post`` (CLS dropped), or the last
   block's keys ``ln_1(x) @ W_k^T`` (no bias, as the reference): (B, N, D);
2. foreground: the second left singular vector ``u1`` of the stacked, L2-normalised patch
   tokens of all B images ((B*N, D)), sign-flipped so its positive side is the minority;
   ``u1 > 0`` is foreground;
3. per image, the largest 8-connected component of the patch mask (plus the second largest
   when it has >= 5 patches); an empty foreground stays empty (no parts), never a crash;
4. a dense CRF at image resolution trims the nearest-upsampled patch mask;
5. parts (L = 5) over all foreground patches of the batch: PCA (MinMax-scaled components,
   argmax) or seeded K-means on L2-normalised tokens;
6. per part present in an image: the largest contour of its (CRF-trimmed) pixel mask, a fitted
   ellipse and three prompted images (red outline; grey outside + outline; Gaussian blur
   outside + outline), all encoded in batches; the part embedding is the mean of the three
   normalised image embeddings.

Everything the images go through is at the model's input resolution (S x S), the
preprocessed image turned back into uint8 RGB, as the reference does.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models import vision_transformer, vit_info
from .vit import vit_view

FACETS = ("tokens", "keys")
PART_METHODS = ("pca", "kmeans")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# dense CRF parameters (SPEC.md 3.1)
CRF_PARAMS = {"bilateral_sxy": 40.0, "bilateral_srgb": 13.0, "bilateral_compat": 10.0,
              "gaussian_sxy": 3.0, "gaussian_compat": 3.0, "iterations": 5}


def stage(timings: dict | None, name: str):
    """Context manager adding the seconds spent inside it to ``timings[name]`` (a no-op when
    `timings` is None): the per-stage breakdown of ``extract_visual_concepts`` and
    ``fastinterp.mutual.explain``. Stages nest exclusively: time in an inner stage counts
    for the inner one only, so the values add up to the wall time of the outermost ones."""
    if timings is None:
        return contextlib.nullcontext()
    return _Stage(timings, name)


_STAGE_STACKS: dict[int, list] = {}


class _Stage:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def _add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def __enter__(self):
        now = time.perf_counter()
        stack = _STAGE_STACKS.setdefault(id(self.timings), [])
        if stack:  # pause the enclosing stage
            self._add(stack[-1].name, now - stack[-1].t0)
        stack.append(self)
        self.t0 = now

    def __exit__(self, *exc):
        now = time.perf_counter()
        self._add(self.name, now - self.t0)
        stack = _STAGE_STACKS[id(self.timings)]
        stack.pop()
        if stack:
            stack[-1].t0 = now
        else:
            del _STAGE_STACKS[id(self.timings)]
        return False


# ----------------------------------------------------------------------------------------
# images <-> model tensors
# ----------------------------------------------------------------------------------------

def normalization_of(preprocess, model=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step in an open_clip/torchvision preprocess; else the
    model's ``visual.image_mean/std``; else OpenAI CLIP's values."""
    for t in getattr(preprocess, "transforms", ()):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "image_mean", None) is not None:
        return tuple(visual.image_mean), tuple(visual.image_std)
    return OPENAI_MEAN, OPENAI_STD


def to_uint8_images(pixels: torch.Tensor, mean, std) -> np.ndarray:
    """Undo Normalize: (B, 3, S, S) float -> (B, S, S, 3) uint8, clipped to [0, 1] and
    truncated (``(x * 255).astype(uint8)``, as the reference)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (pixels.detach().float().cpu() * s + m).clamp(0, 1)
    return np.ascontiguousarray((x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))


def from_uint8_images(images: np.ndarray, mean, std) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) float32: ToTensor + Normalize of
    same-size images (what the preprocess does to an image already at the model size)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def patch_features(model, pixels: torch.Tensor, *, facet: str = "tokens",
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features and image embeddings in one forward pass per batch.

    Args:
        model: CLIP model with a ViT image tower: an open_clip ViT, or a timm
            VisionTransformer tower `vit.vit_view` reads (clear TypeError otherwise).
        pixels: (B, 3, S, S) preprocessed images.
        facet: "tokens" (last-block residual stream before ln_post / timm's norm) or "keys"
            (last block's keys, ``ln_1(x) @ W_k^T``, no bias).
    Returns:
        features (B, N, D) fp32 on CPU (class / register tokens dropped), image embeddings
        (B, d) fp32 on CPU (unnormalised ``encode_image`` output).
    """
    if facet not in FACETS:
        raise ValueError(f"facet={facet!r}; choose one of {FACETS}")
    try:
        visual = vision_transformer(model)
    except TypeError:  # a timm tower; vit_view refuses (saying why) any tower it cannot read
        return _timm_patch_features(model, vit_view(model), pixels, facet, batch_size)
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    device = next(model.parameters()).device
    dtype = next(visual.parameters()).dtype
    captured: list[torch.Tensor] = []

    if facet == "tokens":
        def hook(module, args, output):
            out = output if batch_first else output.transpose(0, 1)
            captured.append(out.detach())
        handle = visual.transformer.register_forward_hook(hook)
    else:
        attn = blocks[-1].attn
        width = attn.embed_dim

        def hook(module, args):
            k_in = args[1] if len(args) > 1 else args[0]
            if not getattr(module, "batch_first", False):
                k_in = k_in.transpose(0, 1)
            w_k = module.in_proj_weight[width:2 * width]
            captured.append((k_in @ w_k.T).detach())
        handle = attn.register_forward_pre_hook(hook)
    feats, embs = [], []
    try:
        for start in range(0, pixels.shape[0], batch_size):
            captured.clear()
            x = pixels[start:start + batch_size].to(device=device, dtype=dtype)
            emb = model.encode_image(x, normalize=False)
            if len(captured) != 1:
                raise RuntimeError(f"expected one captured activation per forward, got {len(captured)}")
            feats.append(captured[0][:, 1:].float().cpu())
            embs.append(emb.float().cpu())
    finally:
        handle.remove()
    return torch.cat(feats), torch.cat(embs)


def _timm_patch_features(model, view, pixels, facet, batch_size):
    """`patch_features` of a timm tower: its last block's output (tokens) or its norm1
    output through the fused qkv's key rows (keys), captured in encode_image's own forward."""
    last = view.visual.trunk.blocks[-1]
    width = view.blocks[-1].heads * view.blocks[-1].head_dim
    w_k = view.blocks[-1].qkv_weight[width:2 * width]
    captured: list[torch.Tensor] = []
    if facet == "tokens":
        handle = last.register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    else:
        handle = last.norm1.register_forward_hook(lambda m, args, out: captured.append((out @ w_k.T).detach()))
    feats, embs = [], []
    try:
        for start in range(0, pixels.shape[0], batch_size):
            captured.clear()
            emb = model.encode_image(pixels[start:start + batch_size].to(device=view.device, dtype=view.dtype),
                                     normalize=False)
            if len(captured) != 1:
                raise RuntimeError(f"expected one captured activation per forward, got {len(captured)}")
            feats.append(captured[0][:, view.prefix_tokens:].float().cpu())
            embs.append(emb.float().cpu())
    finally:
        handle.remove()
    return torch.cat(feats), torch.cat(embs)


# ----------------------------------------------------------------------------------------
# foreground
# ----------------------------------------------------------------------------------------

def orient_minority_positive(u: np.ndarray) -> np.ndarray:
    """The reference's sign rule: flip u if 0.5 < mean(u > 0) < 1 (so the positive side is the
    minority). At exactly 0.5 (where the reference keeps whatever sign the SVD returned) the
    largest-magnitude entry is made positive, so the result is deterministic."""
    u = np.asarray(u, dtype=np.float64).copy()
    frac = float(np.mean(u > 0)) if u.size else 0.0
    if 0.5 < frac < 1.0:
        u = -u
    elif frac == 0.5 and u.size and u[np.argmax(np.abs(u))] < 0:
        u = -u
    return u


def second_singular_vector(features: torch.Tensor) -> np.ndarray:
    """u1, the second left singular vector of the row-L2-normalised (n, D) matrix, float64,
    before the sign rule.

    Only the top two singular pairs are needed, so they come from a Lanczos eigensolver
    (ARPACK `eigsh`, k=2, tolerance 0 = machine precision, fixed start vector) applied as
    matrix-vector products with the smaller Gram matrix (X X^T when n <= D, else X^T X with
    u1 = X v1 / s1), never formed; small matrices (min(n, D) <= 64) use a dense `eigh`.
    Both give the same vector to ~1e-12 and the sign rule makes the result sign-free, except
    for a one-signed u1, where the sign decides (all or nothing) and the dense path is used.
    """
    X = F.normalize(features.reshape(-1, features.shape[-1]).double(), dim=-1)
    n, d = X.shape
    if n < 2:
        return np.zeros(n)
    if min(n, d) <= 64:
        return _second_singular_vector_dense(X)
    from scipy.sparse.linalg import LinearOperator, eigsh

    A = X.numpy()
    if n <= d:
        op = LinearOperator((n, n), matvec=lambda v: A @ (A.T @ v), dtype=np.float64)
    else:
        op = LinearOperator((d, d), matvec=lambda v: A.T @ (A @ v), dtype=np.float64)
    m = op.shape[0]
    v0 = np.ones(m) / math.sqrt(m)
    w, V = eigsh(op, k=2, which="LA", tol=0, v0=v0, ncv=min(m, 32))
    i = int(np.argmin(w))
    if n <= d:
        u = np.ascontiguousarray(V[:, i])
    else:
        s1 = math.sqrt(max(float(w[i]), 0.0))
        if s1 == 0.0:
            return np.zeros(n)
        u = A @ V[:, i] / s1
    if (u > 0).all() or (u < 0).all():
        # one-signed u1: the sign rule keeps whatever sign the solver returned, so take the
        # dense solver's, as before (rare; the foreground is then all or nothing)
        return _second_singular_vector_dense(X)
    return u


def _second_singular_vector_dense(X: torch.Tensor) -> np.ndarray:
    """`second_singular_vector` by a full `eigh` of the smaller Gram matrix (the reference
    computation, used for small matrices and to check the Lanczos path)."""
    n, d = X.shape
    if n <= d:
        w, V = torch.linalg.eigh(X @ X.T)
        return V[:, -2].numpy()
    w, V = torch.linalg.eigh(X.T @ X)
    s1 = math.sqrt(max(float(w[-2]), 0.0))
    if s1 == 0.0:
        return np.zeros(n)
    return (X @ V[:, -2] / s1).numpy()


_EIGHT = np.ones((3, 3), dtype=bool)


def largest_components(mask: np.ndarray, *, second_min: int = 5) -> np.ndarray:
    """Largest 8-connected component of a 2-D boolean mask, united with the second largest
    when that has >= `second_min` pixels. Ties go to the component met first in raster
    order. An empty mask gives an empty mask. (h, w) -> (h, w) bool."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(mask)
    counts = np.bincount(labels.ravel())[1:]
    first = int(np.argmax(counts))
    out = labels == first + 1
    if n > 1:
        counts = counts.copy()
        counts[first] = -1
        second = int(np.argmax(counts))
        if counts[second] >= second_min:
            out |= labels == second + 1
    return out


def foreground_masks(features: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Foreground patch masks of a batch.

    Args:
        features: (B, N, D) patch features, N = grid[0] * grid[1].
    Returns:
        masks (B, h, w) bool (largest components of u1 > 0), and u1 (B, h, w) float64 after
        the sign rule.
    """
    B, N, _ = features.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"{N} patch tokens do not fill a {h}x{w} grid")
    u = orient_minority_positive(second_singular_vector(features)).reshape(B, h, w)
    masks = np.stack([largest_components(u[b] > 0) for b in range(B)]) if B else np.zeros((0, h, w), bool)
    return masks, u


def upsample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) label/bool map to (size, size) (cv2 INTER_NEAREST)."""
    import cv2

    src = np.ascontiguousarray(mask)
    dtype = src.dtype
    work = src.astype(np.int16) if dtype == bool else src
    out = cv2.resize(work, dsize=(size, size), interpolation=cv2.INTER_NEAREST)
    return out.astype(dtype)


def crf_refine(image: np.ndarray, mask: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Dense-CRF refinement of a binary mask at image resolution (pydensecrf).

    Unary -log(clip(onehot, 0.01, 0.99)); bilateral (sxy 40, srgb 13, compat 10); gaussian
    (sxy 3, compat 3); 5 mean-field iterations. Returns the CRF's foreground (label != 0) AND
    the input mask: the CRF only trims. image (H, W, 3) uint8, mask (H, W) bool -> (H, W) bool.
    """
    import pydensecrf.densecrf as dcrf

    p = dict(CRF_PARAMS, **(params or {}))
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    H, W = mask.shape
    if image.shape[:2] != (H, W):
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} sizes differ")
    onehot = np.stack([~mask, mask]).astype(np.float32)
    unary = np.ascontiguousarray(-np.log(np.clip(onehot, 0.01, 0.99)).reshape(2, -1), dtype=np.float32)
    crf = dcrf.DenseCRF2D(W, H, 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=p["gaussian_sxy"], compat=p["gaussian_compat"])
    crf.addPairwiseBilateral(sxy=p["bilateral_sxy"], srgb=p["bilateral_srgb"],
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=p["bilateral_compat"])
    q = np.asarray(crf.inference(int(p["iterations"]))).reshape(2, H, W)
    return (q.argmax(0) != 0) & mask


# ----------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------

def pca_parts(tokens: torch.Tensor | np.ndarray, n_parts: int = 5) -> np.ndarray:
    """Part labels by PCA: PCA(n_parts) of the raw tokens, each component MinMax-scaled
    (clipped) to [0, 1], argmax. (n, D) -> (n,) int64. Fewer rows than parts uses
    min(n_parts, n) components; fewer than 2 rows are all part 0."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import MinMaxScaler

    X = np.asarray(tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.float32)
    n = X.shape[0]
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    k = min(n_parts, n, X.shape[1])
    comps = PCA(n_components=k).fit_transform(X)
    comps = MinMaxScaler(clip=True).fit_transform(comps)
    return comps.argmax(axis=1).astype(np.int64)


def kmeans_parts(tokens: torch.Tensor | np.ndarray, n_parts: int = 5, *, seed: int = 0,
                 max_iter: int = 500, tol: float = 1e-4) -> np.ndarray:
    """Part labels by K-means on L2-normalised tokens (euclidean), seeded.

    Initial centres: `n_parts` distinct rows drawn by ``numpy.random.default_rng(seed)``.
    Each step assigns rows to the nearest centre and moves centres to their means (an empty
    cluster takes a row drawn from the same generator); stops when (sum of centre shifts)^2
    < tol or after max_iter steps. Returns the last assignment, (n, D) -> (n,) int64.
    """
    X = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).double()
    X = F.normalize(X, dim=-1)
    n = X.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n_parts, n)
    rng = np.random.default_rng(seed)
    centres = X[torch.from_numpy(rng.choice(n, size=k, replace=False))].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(max_iter):
        dist = torch.cdist(X, centres)
        labels = dist.argmin(dim=1)
        previous = centres.clone()
        sums = torch.zeros_like(centres).index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=k)
        for c in range(k):
            if counts[c] > 0:
                centres[c] = sums[c] / counts[c]
            else:
                centres[c] = X[int(rng.integers(n))]
        shift = torch.sqrt(((centres - previous) ** 2).sum(dim=1)).sum()
        if float(shift) ** 2 < tol:
            break
    return labels.numpy().astype(np.int64)


def assign_parts(features: torch.Tensor, fg: np.ndarray, *, method: str = "pca", n_parts: int = 5,
                 seed: int = 0) -> np.ndarray:
    """Part label per patch for a batch: (B, N, D) features, (B, h, w) foreground ->
    (B, h, w) int64, -1 on background. The foreground patches of all images (image order,
    raster order within each) are clustered together."""
    if method not in PART_METHODS:
        raise ValueError(f"parts={method!r}; choose one of {PART_METHODS}")
    B, h, w = fg.shape
    flat = torch.from_numpy(fg.reshape(B * h * w))
    tokens = features.reshape(B * h * w, -1)[flat]
    out = np.full(B * h * w, -1, dtype=np.int64)
    if tokens.shape[0]:
        if method == "pca":
            out[fg.reshape(-1)] = pca_parts(tokens, n_parts)
        else:
            out[fg.reshape(-1)] = kmeans_parts(tokens, n_parts, seed=seed)
    return out.reshape(B, h, w)


# ----------------------------------------------------------------------------------------
# visual prompts
# ----------------------------------------------------------------------------------------

Ellipse = tuple  # ((cx, cy), (width, height), angle), OpenCV's RotatedRect form


def fit_part_ellipse(mask: np.ndarray) -> Ellipse | None:
    """Ellipse fitted to the largest external contour of a binary (H, W) mask; None if the mask
    is empty. Contours with fewer than 5 points, or degenerate (straight-line) ones, get the
    corners of their bounding box grown by one pixel added, so the fit is always defined (the
    reference pads with random points here)."""
    import cv2

    m = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8))
    if not m.any():
        return None
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    best = max(contours, key=cv2.contourArea)  # first of the largest on ties, as max() does
    pts = best.reshape(-1, 2).astype(np.int32)
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    if len(pts) < 5 or x0 == x1 or y0 == y1:
        corners = np.array([[x0 - 1, y0 - 1], [x1 + 1, y0 - 1], [x1 + 1, y1 + 1], [x0 - 1, y1 + 1]], np.int32)
        pts = np.concatenate([pts, corners])
    cv2.setRNGSeed(0)  # fitEllipse jitters near-degenerate point sets with OpenCV's global RNG: same mask, same fit
    (cx, cy), (ew, eh), angle = cv2.fitEllipse(pts.reshape(-1, 1, 2))
    if not all(np.isfinite(v) for v in (cx, cy, ew, eh, angle)) or ew <= 0 or eh <= 0:
        (cx, cy), (ew, eh), angle = ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0 + 2, y1 - y0 + 2), 0.0
    return ((float(cx), float(cy)), (float(ew), float(eh)), float(angle))


def visual_prompts(image: np.ndarray, ellipses: Sequence[Ellipse], *, thickness: int = 1,
                   blur_ksize: int = 11, blur_sigma: float = 2.0) -> np.ndarray:
    """The three prompted images per ellipse.

    Args:
        image: (S, S, 3) uint8 RGB.
        ellipses: P OpenCV ellipses.
    Returns:
        (P, 3, S, S, 3) uint8: [red outline, grey outside + outline, blurred outside + outline].
    """
    import cv2

    img = np.ascontiguousarray(image, dtype=np.uint8)
    grey = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    blurred = cv2.GaussianBlur(img, (blur_ksize, blur_ksize), blur_sigma)
    out = np.empty((len(ellipses), 3) + img.shape, dtype=np.uint8)
    red = (255, 0, 0)
    for i, ell in enumerate(ellipses):
        inside = np.zeros(img.shape[:2], dtype=np.uint8)
        cv2.ellipse(inside, ell, color=255, thickness=-1)
        inside = inside[:, :, None] != 0
        variants = (img.copy(), np.where(inside, img, grey), np.where(inside, img, blurred))
        for j, v in enumerate(variants):
            v = np.ascontiguousarray(v)
            cv2.ellipse(v, ell, color=red, thickness=thickness)
            out[i, j] = v
    return out


@torch.no_grad()
def encode_prompts(model, prompts: np.ndarray, mean, std, *, batch_size: int = 64,
                   progress: bool = False, timings: dict | None = None) -> torch.Tensor:
    """Part embeddings from prompted images: (P, 3, S, S, 3) uint8 -> (P, d) fp32 on CPU, the
    mean of the three L2-normalised image embeddings of each part. `timings`: the
    ``encode_image`` calls add to "clip_forward_parts" (see `stage`)."""
    from tqdm.auto import tqdm

    P = prompts.shape[0]
    if P == 0:
        return torch.zeros(0, vit_info(model).output_dim)
    flat = prompts.reshape((P * 3,) + prompts.shape[2:])
    device = next(model.parameters()).device
    dtype = next(model.visual.parameters()).dtype
    embs = []
    for start in tqdm(range(0, flat.shape[0], batch_size), desc="encoding visual prompts",
                      disable=not progress, unit="batch", leave=False):
        x = from_uint8_images(flat[start:start + batch_size], mean, std).to(device=device, dtype=dtype)
        with stage(timings, "clip_forward_parts"):
            emb = model.encode_image(x, normalize=False)
        embs.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(embs).reshape(P, 3, -1).mean(1)


# ----------------------------------------------------------------------------------------
# the whole vision side
# ----------------------------------------------------------------------------------------

@dataclass
class PartResult:
    """Parts of one decomposition (PCA or K-means) of a batch."""

    method: str
    patch_parts: np.ndarray          # (B, h, w) int64, -1 background
    pixel_parts: np.ndarray          # (B, S, S) int16, -1 background (upsampled, CRF-trimmed)
    part_ids: list[list[int]]        # per image, the part labels present (ascending)
    ellipses: list[list[Ellipse]]    # per image, one ellipse per present part
    embeddings: list[torch.Tensor]   # per image, (P_b, d) part embeddings


@dataclass
class VisualConcepts:
    """Vision-side result of a batch of B images at model resolution S."""

    images: np.ndarray | None        # (B, S, S, 3) uint8 (preprocessed image, denormalised);
    #                                  None when read back by `from_state` without images
    image_embeddings: torch.Tensor   # (B, d) raw encode_image output
    foreground: np.ndarray           # (B, h, w) bool patch foreground (after components)
    fiedler: np.ndarray              # (B, h, w) float64 u1 after the sign rule
    crf_masks: np.ndarray            # (B, S, S) bool pixel foreground (upsampled, CRF-trimmed)
    parts: dict = field(default_factory=dict)  # method -> PartResult
    settings: dict = field(default_factory=dict)  # n_parts, facet, seed, crf it was made with

    def state(self, *, images: bool = False) -> dict:
        """Tensors and plain lists for `io.save_checked` (read back by `from_state`): all the
        language side needs. Pixel part maps are not stored (rebuilt exactly from the patch
        parts and CRF masks), nor the images unless `images` (150 KB each at 224 px)."""
        t = torch.from_numpy
        return {"image_embeddings": self.image_embeddings, "foreground": t(self.foreground),
                "fiedler": t(self.fiedler), "crf_masks": t(self.crf_masks), "settings": dict(self.settings),
                "images": t(self.images) if images and self.images is not None else None,
                "parts": {m: {"patch_parts": t(p.patch_parts), "part_ids": p.part_ids,
                              "ellipses": [[None if e is None else [list(e[0]), list(e[1]), e[2]] for e in ells]
                                           for ells in p.ellipses],
                              "embeddings": p.embeddings} for m, p in self.parts.items()}}

    @classmethod
    def from_state(cls, d: dict) -> "VisualConcepts":
        crf = d["crf_masks"].numpy()
        vc = cls(None if d["images"] is None else d["images"].numpy(), d["image_embeddings"],
                 d["foreground"].numpy(), d["fiedler"].numpy(), crf, settings=dict(d["settings"]))
        for m, p in d["parts"].items():
            patch = p["patch_parts"].numpy()
            ells = [[None if e is None else (tuple(e[0]), tuple(e[1]), e[2]) for e in row] for row in p["ellipses"]]
            vc.parts[m] = PartResult(m, patch, pixel_parts(patch, crf), p["part_ids"], ells, list(p["embeddings"]))
        return vc


def preprocess_images(images, preprocess) -> torch.Tensor:
    """PIL images (any mode: converted to RGB) -> (B, 3, S, S) with the model's preprocess."""
    out = []
    for i, im in enumerate(images):
        if not hasattr(im, "convert"):
            raise TypeError(f"image #{i} is {type(im).__name__}; pass PIL images "
                            f"(fastinterp.images.open_rgb opens files)")
        out.append(preprocess(im.convert("RGB") if im.mode != "RGB" else im))
    return torch.stack(out)


def extract_visual_concepts(model, preprocess, images, *, methods: Sequence[str] = ("pca",),
                            n_parts: int = 5, facet: str = "tokens", seed: int = 0, crf: bool = True,
                            batch_size: int = 64, progress: bool = False,
                            timings: dict | None = None) -> VisualConcepts:
    """Run the vision side on a batch of PIL images (processed together, as the reference
    processes one class). See the module docstring for the steps. `timings` (a dict) gets
    the seconds of each stage added: "preprocess", "clip_forward_images", "foreground",
    "crf", "parts" (parts, ellipses, prompted images) and "clip_forward_parts"."""
    methods = tuple(methods)
    for m in methods:
        if m not in PART_METHODS:
            raise ValueError(f"parts={m!r}; choose from {PART_METHODS}")
    if n_parts < 1:
        raise ValueError(f"n_parts={n_parts}; need at least 1")
    info = vit_info(model)  # clear TypeError for a non-ViT tower
    if len(images) == 0:
        raise ValueError("no images given")
    mean, std = normalization_of(preprocess, model)
    with stage(timings, "preprocess"):
        pixels = preprocess_images(images, preprocess)
    S = pixels.shape[-1]
    if pixels.shape[-2:] != tuple(info.image_size):
        raise ValueError(f"preprocess gives {tuple(pixels.shape[-2:])} images but the model takes "
                         f"{info.image_size}; use the preprocess returned by load_clip")
    with stage(timings, "clip_forward_images"):
        feats, img_emb = patch_features(model, pixels, facet=facet, batch_size=batch_size)
    with stage(timings, "preprocess"):
        uint8 = to_uint8_images(pixels, mean, std)
    with stage(timings, "foreground"):
        fg, u = foreground_masks(feats, info.patch_grid)
    B = len(images)
    crf_masks = np.zeros((B, S, S), dtype=bool)
    with stage(timings, "crf"):
        for b in range(B):
            up = upsample_mask(fg[b], S)
            crf_masks[b] = crf_refine(uint8[b], up) if crf else up
    vc = VisualConcepts(uint8, img_emb, fg, u, crf_masks,
                        settings={"n_parts": n_parts, "facet": facet, "seed": seed, "crf": crf})
    for method in methods:
        with stage(timings, "parts"):  # the prompts' encode_image calls count as clip_forward_parts
            patch_parts, pixels, part_ids, ellipses, allp = _method_parts(
                feats, fg, crf_masks, uint8, method=method, n_parts=n_parts, seed=seed)
            emb = encode_prompts(model, allp, mean, std, batch_size=batch_size, progress=progress,
                                 timings=timings)
        vc.parts[method] = PartResult(method, patch_parts, pixels, part_ids, ellipses,
                                      list(torch.split(emb, [len(ids) for ids in part_ids])))
    return vc


def _method_parts(feats, fg, crf_masks, uint8, *, method: str, n_parts: int, seed: int):
    """One part method on a batch: (patch parts, pixel parts, part ids and ellipses per
    image, all prompted images (P, 3, S, S, 3))."""
    S = uint8.shape[1]
    patch_parts = assign_parts(feats, fg, method=method, n_parts=n_parts, seed=seed)
    pixels = pixel_parts(patch_parts, crf_masks)
    part_ids, ellipses, prompts = [], [], []
    for b, pp in enumerate(pixels):
        ids = [int(v) for v in np.unique(pp) if v >= 0]
        ells = [fit_part_ellipse(pp == i) for i in ids]
        part_ids.append(ids)
        ellipses.append(ells)
        if ids:
            prompts.append(visual_prompts(uint8[b], ells))
    allp = np.concatenate(prompts) if prompts else np.zeros((0, 3, S, S, 3), np.uint8)
    return patch_parts, pixels, part_ids, ellipses, allp


def pixel_parts(patch_parts: np.ndarray, crf_masks: np.ndarray) -> np.ndarray:
    """(B, h, w) patch part labels -> (B, S, S) int16 pixel labels: nearest-upsampled, -1
    outside the (B, S, S) CRF masks."""
    B, S = crf_masks.shape[0], crf_masks.shape[1]
    out = np.full((B, S, S), -1, dtype=np.int16)
    for b in range(B):
        pp = upsample_mask(patch_parts[b].astype(np.int16), S)
        pp[~crf_masks[b]] = -1
        out[b] = pp
    return out
