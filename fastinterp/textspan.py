"""Per-head direct contributions of a CLIP ViT and TextSpan (SPEC.md 2.1, 2.2).

Decomposition (`head_contributions`): the normalised image embedding of an open_clip ViT is
written exactly as a sum of terms, one for the embedding (ln_pre output of the CLS token),
one per MLP and one per (layer, head) (summed over source tokens), using the linearisation
of the final LayerNorm with the real per-image mean and std (SPEC 2.1):

    r_k = (gamma * (c_k - w_k * mu) / sigma + w_k * beta) @ P / ||z||,
    w_k = 1/(2L+1) for the embedding/MLP terms, 1/((2L+1) H) per head (summed over tokens)

so that `sum_k r_k == z / ||z||`. Only the CLS query row of each attention map is
used: each head's attention output for the CLS query (B, H, hd), taken from the one
attention pass the forward needs anyway, goes through that head's slice of W_o. Nothing
of size (B, N, N, H, D), as the reference hook builds, is formed. Towers that read more than
the class token (CLIPA's average pool, CoCa's attentional pooler, timm towers) go through
`vit.direct_terms` / `vit.linear_readout`: each term summed over the tokens with the
readout's own weights (the pooler's attention, 1/std of a norm per token), then the readout
linearised at the image's statistics; the same sum holds.

TextSpan (`textspan`): for every head at once, the greedy choice of the text whose
projection has the largest spread over the images, inside the rank-r principal subspace
of the head's data, with deflation of the data and the texts after each pick. The spread
of text t is `sqrt(t' S t)` with S the head's (centred) covariance in the subspace, so the
loop needs one d x d Gram matrix per head and works on r-dimensional text coordinates with
rank-1 updates; it never forms the images x texts product.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .io import CorruptFileError, atomic_write_json, load_checked, save_checked
from .vit import check_blocks, check_heads, check_layers, direct_terms, head_outputs, vit_view

__all__ = [
    "Contributions",
    "TextSpanResult",
    "head_contributions",
    "load_contributions",
    "textspan",
    "check_heads",
    "read_text_bank",
    "builtin_text_bank",
]

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------
# model checks
# --------------------------------------------------------------------------------------
def _decomposable_view(model):
    """The tower's `vit.ViTView`: open_clip ViTs with class-token / average pooling or CoCa's
    attentional pooler, timm towers with class-token / average pooling and a linear head
    (`vit.linear_readout`); MAP heads and anything `vit_view` does not read are refused."""
    view = vit_view(model).require("the direct-contribution decomposition", poolings=("tok", "avg", "attn_pool"))
    if view.family == "open_clip ViT":
        ln = view.visual.ln_post
        if not isinstance(ln, torch.nn.LayerNorm) or (view.pooling == "tok" and ln.weight is None):
            raise TypeError(f"the ViT's final norm is {type(ln).__name__}; the decomposition needs "
                            f"an nn.LayerNorm (linearised at each image's own mean and std)")
        check_blocks(view.visual, "the direct-contribution decomposition")
    return view


# --------------------------------------------------------------------------------------
# one batch
# --------------------------------------------------------------------------------------
def _attention_with_heads(block, x):
    """One attention pass of a block that also yields each head's CLS contribution.

    x: (B, N, D) residual entering the block. Returns (attn_out (B, N, D) through LayerScale,
    heads (B, H, D)): heads[:, i] = o[cls, i] @ W_o[:, i].T + out_proj.bias / H (through the
    LayerScale), where o[cls, i] = sum_m attn[cls, m, i] v[m, i] is head i's attention
    output for the CLS query, i.e. the head's term summed over source tokens.
    """
    attn = block.attn
    B, N, D = x.shape
    H = attn.num_heads
    o = head_outputs(block, x)  # (B, N, H, hd)
    wo, bo = attn.out_proj.weight, attn.out_proj.bias
    out = F.linear(o.reshape(B, N, D), wo, bo)
    heads = torch.einsum("bhe,dhe->bhd", o[:, 0], wo.view(D, H, D // H))  # per-head CLS row
    if bo is not None:
        heads = heads + bo / H
    return block.ls_1(out), block.ls_1(heads)


@torch.no_grad()
def _decompose_batch(visual, pixels, layer_set):
    """Raw CLS terms of one batch.

    Returns heads (B, L_sel, H, D), mlps (B, L+1, D) (index 0 = embedding), other (B, D)
    (sum of the unselected layers' head terms), residual (B, D) (the final CLS residual).
    """
    x = visual._embeds(pixels.to(visual.conv1.weight.dtype))
    mlps = [x[:, 0]]
    heads, other = [], torch.zeros_like(x[:, 0])
    for i, block in enumerate(visual.transformer.resblocks):
        attn_out, terms = _attention_with_heads(block, x)
        if i in layer_set:
            heads.append(terms)
        else:
            other = other + terms.sum(1)
        x = x + attn_out
        m = block.ls_2(block.mlp(block.ln_2(x)))
        mlps.append(m[:, 0])
        x = x + m
    B, _, D = x.shape
    heads = torch.stack(heads, 1) if heads else x.new_zeros(B, 0, visual.transformer.resblocks[0].attn.num_heads, D)
    return heads, torch.stack(mlps, 1), other, x[:, 0]


@torch.no_grad()
def _contributions_batch(view, pixels, layer_set, n_layers):
    """(heads, mlps, other, embedding) of one batch, each divided by ||z||: the class-token
    path below for open_clip 'tok' towers; any other readout through `vit.direct_terms`
    (every term summed over the tokens the readout reads, with its own weights, then the
    readout's linearisation at the batch's statistics), with the same shares of the
    constants (1/(2L+1) per MLP / the embedding, 1/((2L+1)H) per head)."""
    if view.family == "open_clip ViT" and view.pooling == "tok":
        return _linearise(view.visual, *_decompose_batch(view.visual, pixels, layer_set), n_layers)
    return _linearise_direct(*direct_terms(view, pixels, layer_set), n_layers)


def _linearise_direct(heads, mlps, other, readout, n_layers):
    """`vit.direct_terms`' token-summed terms through their `vit.LinearReadout`, / ||z||."""
    B, _, n_sel, H, _ = heads.shape
    w_mlp, w_head = 1.0 / (2 * n_layers + 1), 1.0 / ((2 * n_layers + 1) * H)
    z = readout.embedding
    norm = z.norm(dim=-1)
    out_heads = readout.terms(heads.flatten(2, 3), w_head).view(B, n_sel, H, -1) / norm.view(-1, 1, 1, 1)
    out_mlps = readout.terms(mlps, w_mlp) / norm.view(-1, 1, 1)
    out_other = readout.terms(other[:, :, None], w_head * (n_layers - n_sel) * H)[:, 0] / norm[:, None]
    return out_heads, out_mlps, out_other, z / norm[:, None]


@torch.no_grad()
def _linearise(visual, heads, mlps, other, residual, n_layers):
    """Apply the LN linearisation (SPEC 2.1) to raw terms; all outputs are divided by ||z||."""
    ln = visual.ln_post
    f32 = torch.float32
    heads, mlps, other, residual = (t.to(f32) for t in (heads, mlps, other, residual))
    gamma, beta = ln.weight.to(f32), ln.bias.to(f32) if ln.bias is not None else torch.zeros_like(ln.weight, dtype=f32)
    mu = residual.mean(-1)
    sigma = torch.sqrt(residual.var(-1, unbiased=False) + ln.eps)
    proj = visual.proj.to(f32) if visual.proj is not None else None
    H = heads.shape[2] if heads.dim() == 4 else visual.transformer.resblocks[0].attn.num_heads
    w_mlp = 1.0 / (2 * n_layers + 1)
    w_head = 1.0 / ((2 * n_layers + 1) * H)

    def lin(c, w):
        shape = (-1,) + (1,) * (c.dim() - 1)
        y = gamma * (c - w * mu.view(shape)) / sigma.view(shape) + w * beta
        y = y @ proj if proj is not None else y
        return y

    z = lin(residual, 1.0)
    norm = z.norm(dim=-1)
    n_other_heads = (n_layers - heads.shape[1]) * H
    out_heads = lin(heads, w_head) / norm.view(-1, 1, 1, 1)
    out_mlps = lin(mlps, w_mlp) / norm.view(-1, 1, 1)
    out_other = lin(other, w_head * n_other_heads) / norm[:, None]
    return out_heads, out_mlps, out_other, z / norm[:, None]


# --------------------------------------------------------------------------------------
# results and storage
# --------------------------------------------------------------------------------------
@dataclass
class Contributions:
    """Direct contributions to the normalised image embedding (each term divided by ||z||).

    heads: (n, L_sel, H, d) per-head terms of `layers`, summed over source tokens.
    mlps: (n, L+1, d): index 0 is the embedding (ln_pre) term, index l+1 the MLP of layer l.
    other: (n, d): sum of the head terms of the layers not in `layers`.
    embedding: (n, d) the normalised image embedding z/||z|| (= the sum of all terms).
    """

    heads: torch.Tensor
    mlps: torch.Tensor
    other: torch.Tensor
    embedding: torch.Tensor
    layers: list[int]
    n_layers: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.heads.shape[0]

    def total(self) -> torch.Tensor:
        """(n, d): sum of all stored terms (equals `embedding` up to rounding)."""
        return self.mlps.sum(1) + self.heads.sum((1, 2)) + self.other

    def head(self, layer: int, head: int) -> torch.Tensor:
        """(n, d) contribution of one head (layer index of the model, not of `layers`)."""
        (layer, head), = check_heads([(layer, head)], self.n_layers, self.heads.shape[2])
        if layer not in self.layers:
            raise IndexError(f"layer {layer} was not stored (stored layers: {self.layers}); "
                             f"recompute with layers= including it")
        return self.heads[:, self.layers.index(layer), head]

    def mean_ablate(self, heads: Iterable[tuple[int, int]], *, normalize: bool = False) -> torch.Tensor:
        """Embeddings (n, d) with each listed head's contribution replaced by its mean over
        the stored images (mean-ablation, SPEC 2.4); `normalize=True` re-normalises rows."""
        heads = check_heads(list(heads), self.n_layers, self.heads.shape[2])
        emb = self.embedding.clone()
        for layer, head in dict.fromkeys(heads):
            c = self.head(layer, head)
            emb -= c - c.mean(0, keepdim=True)
        return F.normalize(emb, dim=-1) if normalize else emb


def _meta_for(model, layers, batch_size, n_layers, *, hash_weights: bool) -> dict:
    from .models import weights_hash

    meta = {"format": FORMAT_VERSION, "model": getattr(model, "fastinterp_name", type(model).__name__),
            "weights": str(getattr(model, "fastinterp_weights", "unknown")),
            "layers": list(layers), "n_layers": n_layers, "batch_size": batch_size}
    if hash_weights:  # only for resumable outputs: random weights differ per seed
        meta["weights_sha256"] = weights_hash(getattr(model, "visual", model))[:16]
    return meta


def _batch_path(folder: Path, i: int) -> Path:
    return folder / f"batch_{i:06d}.pt"


def _load_batch(path: Path):
    """A batch file's tensors, or None when it is missing; a damaged one (checksum mismatch,
    unreadable, foreign) is reported by name and recomputed, never used."""
    if not path.exists():
        return None
    try:
        data = load_checked(path)
        if set(data) != {"heads", "mlps", "other", "embedding"} or not all(
                isinstance(v, torch.Tensor) for v in data.values()):
            raise CorruptFileError(f"{str(path)!r} is not a head-contributions batch file")
        return data
    except CorruptFileError as err:
        warnings.warn(f"{err} -- recomputing this batch", UserWarning, stacklevel=3)
        return None


def load_contributions(folder: str | os.PathLike) -> Contributions:
    """Read the batch files written by `head_contributions(..., output=folder)`."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no meta.json; write it with head_contributions(output=...) "
                                f"or `fastinterp ccs textspan`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    n_batches = meta.get("n_batches")
    if n_batches is None:
        raise ValueError(f"{str(folder)!r} is incomplete (the run did not finish); run it again to resume")
    parts = []
    for i in range(n_batches):
        data = _load_batch(_batch_path(folder, i))
        if data is None:
            raise ValueError(f"{str(_batch_path(folder, i))!r} is missing or corrupt; run again to recompute it")
        parts.append(data)
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("heads", "mlps", "other", "embedding")}
    return Contributions(cat["heads"], cat["mlps"], cat["other"], cat["embedding"], list(meta["layers"]),
                         int(meta["n_layers"]), meta)


def _batches(images, batch_size, preprocess):
    """Yield (index, loader) pairs: loader() returns the pixel batch (B, 3, H, W). Lazy for
    tensors and sequences so that finished batches are skipped without loading them."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor of preprocessed pixels, got shape "
                             f"{tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("no images given (an empty tensor)")
        for i, s in enumerate(range(0, images.shape[0], batch_size)):
            yield i, (lambda s=s: images[s:s + batch_size]), min(batch_size, images.shape[0] - s)
        return
    if isinstance(images, (list, tuple)) and not (
            images and (isinstance(images[0], (list, tuple))
                        or (isinstance(images[0], torch.Tensor) and images[0].dim() == 4))):
        if not images:
            raise ValueError("no images given (an empty list); check the image folder")
        if preprocess is None and not isinstance(images[0], torch.Tensor):
            raise ValueError("images are PIL images or paths: pass preprocess= (the model's image transform)")

        def load(chunk):
            from .images import load_images
            out = []
            for im in chunk:
                if isinstance(im, torch.Tensor):
                    out.append(im)
                    continue
                if isinstance(im, (str, os.PathLike)):
                    loaded = load_images([im])  # an unreadable file is skipped with a warning
                    if not loaded:
                        continue
                    im = loaded[0][1]
                out.append(preprocess(im))
            return torch.stack(out) if out else None

        for i, s in enumerate(range(0, len(images), batch_size)):
            chunk = images[s:s + batch_size]
            yield i, (lambda c=chunk: load(c)), len(chunk)
        return
    seen = False
    for i, item in enumerate(images):  # a DataLoader or any iterable of batches
        seen = True
        batch = item[0] if isinstance(item, (list, tuple)) else item
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise ValueError("an iterable of images must yield (B, 3, H, W) tensors or (tensor, ...) tuples")
        yield i, (lambda b=batch: b), batch.shape[0]
    if not seen:
        raise ValueError("the image loader yielded no batches")


def _input_fingerprint(images) -> dict:
    """What identifies the inputs of a resumable run: the paths' hash, or a tensor's shape."""
    if isinstance(images, (list, tuple)) and images and all(isinstance(p, (str, os.PathLike)) for p in images):
        # relative paths, sizes and mtimes: the same files however the folder is spelled or where the run starts
        from .io import files_fingerprint
        return {"inputs": files_fingerprint(images)["sha256"][:16], "n_inputs": len(images)}
    if isinstance(images, torch.Tensor):
        return {"inputs": f"tensor{tuple(images.shape)}"}
    return {}


def _open_output(folder: Path, meta: dict) -> Path:
    """Create or resume an output folder: its meta.json must match this run's."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        # with a weights hash on both sides, how the weights were named (a checkpoint path) does not matter
        keys = [k for k in meta if not (k == "weights" and "weights_sha256" in meta and "weights_sha256" in old)]
        diff = [f"{k}: {old.get(k)!r} there, {meta[k]!r} now" for k in keys if old.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{str(folder)!r} holds contributions of another run ({'; '.join(diff)}); "
                             f"use a new output folder or delete it")
    atomic_write_json(meta_path, meta, indent=2)
    return folder


def _count_batches(images, batch_size) -> int | None:
    """The number of batches `_batches` will yield, where it is known up front (progress bar)."""
    if isinstance(images, torch.Tensor):
        return math.ceil(images.shape[0] / batch_size)
    if isinstance(images, (list, tuple)) and images and not isinstance(images[0], (list, tuple)) and not (
            isinstance(images[0], torch.Tensor) and images[0].dim() == 4):
        return math.ceil(len(images) / batch_size)
    return len(images) if hasattr(images, "__len__") else None


def head_contributions(model, images, layers: Sequence[int] | None = None, *, preprocess=None,
                       batch_size: int = 32, output: str | os.PathLike | None = None,
                       device=None, progress: bool = True) -> Contributions:
    """Per-head direct contributions to the normalised image embedding, batch by batch.

    Args:
        model: a CLIP model (or its image tower) whose readout is linear given the image's
            statistics: open_clip ViTs with class-token or average pooling (CLIPA) or CoCa's
            attentional pooler, timm towers with class-token / average pooling and a linear
            head (README "Model support"); a MAP head (SigLIP) is refused.
        images: (n, 3, H, W) preprocessed pixels; a list of PIL images or paths (with
            `preprocess`); or an iterable / DataLoader of (B, 3, H, W) tensors or (tensor, ...)
            tuples.
        layers: layers whose heads are kept (default: all; negative counts from the end).
        output: folder for resumable per-batch files (`batch_000000.pt`, `meta.json`);
            batches already there (same model, weights, layers, batch size) are not recomputed.
        progress: tqdm progress bar.

    Returns:
        `Contributions` with heads (n, L_sel, H, d), mlps (n, L+1, d), other (n, d),
        embedding (n, d), all fp32 on CPU. Memory per batch is O(B N D) (no N x N tensor).
    """
    view = _decomposable_view(model)
    info = view.info
    layers = list(range(info.layers)) if layers is None else check_layers(model, list(layers))
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} lists a layer twice")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev = view.device if device is None else torch.device(device)
    meta = _meta_for(model, layers, batch_size, info.layers, hash_weights=output is not None)
    meta.update(_input_fingerprint(images))
    folder = None if output is None else _open_output(Path(output), meta)
    layer_set = set(layers)
    total = _count_batches(images, batch_size)
    from tqdm.auto import tqdm

    parts = []
    n_batches = 0
    bar = tqdm(_batches(images, batch_size, preprocess), total=total, disable=not progress,
               desc="head contributions", unit="batch")
    for i, loader, _ in bar:
        n_batches = i + 1
        data = _load_batch(_batch_path(folder, i)) if folder is not None else None
        if data is None:
            pixels = loader()
            if pixels is None:  # every file of this batch was unreadable
                d = info.output_dim
                data = {"heads": torch.zeros(0, len(layers), info.heads, d), "mlps": torch.zeros(0, info.layers + 1, d),
                        "other": torch.zeros(0, d), "embedding": torch.zeros(0, d)}
            else:
                h, m, o, e = _contributions_batch(view, pixels.to(dev), layer_set, info.layers)
                data = {"heads": h.cpu(), "mlps": m.cpu(), "other": o.cpu(), "embedding": e.cpu()}
            if folder is not None:
                save_checked(data, _batch_path(folder, i))
        parts.append(data)
    if folder is not None:
        meta["n_batches"] = n_batches
        meta["n_images"] = sum(p["heads"].shape[0] for p in parts)
        atomic_write_json(folder / "meta.json", meta, indent=2)
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("heads", "mlps", "other", "embedding")}
    if cat["heads"].shape[0] == 0:
        raise ValueError("no image could be read (all were skipped); check the image files")
    return Contributions(cat["heads"], cat["mlps"], cat["other"], cat["embedding"], layers, info.layers, meta)


# --------------------------------------------------------------------------------------
# TextSpan
# --------------------------------------------------------------------------------------
@dataclass
class TextSpanResult:
    """indices: (..., n_texts) text indices in pick order; stds: (..., n_texts) the std over
    images of the picked text's projection at its step; reconstruction: (K, ..., d) the
    rank-n reconstruction (mean + centred data projected on the picked texts) or None."""

    indices: torch.Tensor
    stds: torch.Tensor
    reconstruction: torch.Tensor | None = None


def _as_tensor(x, what):
    if isinstance(x, Contributions):
        x = x.heads
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}")
    return x


def _top_eigenvectors(G: torch.Tensor, r: int, *, low_precision: bool, oversample: int = 16) -> torch.Tensor:
    """(hc, d, r) eigenvectors of the r largest eigenvalues of symmetric fp64 G (hc, d, d).

    With `low_precision` the full eigendecomposition runs in fp32 (several times faster
    than fp64 on CPU) on r + `oversample` vectors, then one fp64 subspace iteration and a
    Rayleigh-Ritz step (an (r+o) x (r+o) fp64 eigh) bring the subspace to fp64 accuracy.
    """
    d = G.shape[-1]
    k = min(d, r + oversample)
    with _lapack_threads(G):
        if not low_precision or k >= d:
            return torch.linalg.eigh(G)[1][..., -r:].flip(-1)
        start = torch.linalg.eigh(G.float())[1][..., -k:].double()
        Q = torch.linalg.qr(G @ start)[0]  # (hc, d, k)
        w, Z = torch.linalg.eigh(Q.transpose(1, 2) @ G @ Q)
    return (Q @ Z[..., -r:]).flip(-1)


class _lapack_threads:
    """On CPU, run the batched eigh / qr single-threaded: LAPACK's tridiagonalisation of a
    few-hundred-wide matrix gains little from threads and loses badly (10x measured) when
    the cores are shared with other processes. No effect on CUDA tensors."""

    def __init__(self, t: torch.Tensor):
        self.active = t.device.type == "cpu"

    def __enter__(self):
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.saved)


def _check_textspan_args(contributions, text_embeddings, n_texts, rank):
    """(C (K, L, H, d), T (M, d), single, rr): the inputs as tensors, whether a 2-D (one
    head) input was given, and the subspace rank used."""
    C = _as_tensor(contributions, "contributions")
    T = _as_tensor(text_embeddings, "text_embeddings")
    single = C.dim() == 2
    if single:
        C = C[:, None, None]
    if C.dim() != 4:
        raise ValueError(f"contributions must be (images, layers, heads, d) (or (images, d)), got {tuple(C.shape)}")
    if T.dim() != 2:
        raise ValueError(f"text_embeddings must be (texts, d), got {tuple(T.shape)}")
    K, L, H, d = C.shape
    M = T.shape[0]
    if T.shape[1] != d:
        raise ValueError(f"text embeddings have dim {T.shape[1]} but contributions have dim {d}; "
                         f"use the same model's joint space")
    if K < 2:
        raise ValueError(f"TextSpan needs at least 2 images (std over images), got {K}")
    if M == 0:
        raise ValueError("the text bank is empty")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    rr = min(rank, K, d)
    limit = min(rr, K - 1, M)  # the centred data has rank <= K - 1: later picks would rank pure noise
    if not isinstance(n_texts, int) or not 1 <= n_texts <= limit:
        raise ValueError(f"n_texts={n_texts!r} must be in 1..{limit} (at most the subspace rank "
                         f"min(rank={rank}, d={d}), the rank of the centred data (images - 1 = {K - 1}) and the "
                         f"number of texts {M}); use more images or fewer texts per head")
    if not torch.isfinite(T).all():
        raise ValueError("text embeddings contain NaN/inf")
    tnorm = T.norm(dim=-1)
    if (tnorm == 0).any():
        raise ValueError(f"text embedding row {int((tnorm == 0).nonzero()[0])} is all zeros")
    return C, T, single, rr


def _pick_texts(A: torch.Tensor, S: torch.Tensor, n_texts: int):
    """The greedy picks for a chunk of heads.

    A: (hc, M, rr) text coordinates in each head's subspace; S: (hc, rr, rr) the images'
    covariance there. Each step takes the text of largest projected variance a' S a and
    projects it out of every text. Returns indices (hc, n), stds (hc, n) and the picked
    unit directions (hc, n, rr).
    """
    hc, _, rr = A.shape
    AS = A @ S
    idx = torch.empty(hc, n_texts, dtype=torch.long, device=A.device)
    std = torch.empty(hc, n_texts, dtype=A.dtype, device=A.device)
    picked = torch.empty(hc, n_texts, rr, dtype=A.dtype, device=A.device)
    ar = torch.arange(hc, device=A.device)
    for step in range(n_texts):
        score = (AS * A).sum(-1)  # (hc, M) variance of each text's projection
        j = score.argmax(-1)
        idx[:, step] = j
        std[:, step] = score[ar, j].clamp_min(0).sqrt()
        a = A[ar, j]  # (hc, rr)
        nrm2 = (a * a).sum(-1, keepdim=True)
        if (nrm2 <= 0).any():
            raise ValueError("a picked text has no component left in the subspace; lower n_texts")
        picked[:, step] = a / nrm2.sqrt()
        w = (A @ a[:, :, None])[..., 0] / nrm2  # (hc, M)
        Sa = (S @ a[:, :, None])[..., 0]  # (hc, rr)
        A = A - w[:, :, None] * a[:, None, :]
        AS = AS - w[:, :, None] * Sa[:, None, :]
    return idx, std, picked


def textspan(contributions, text_embeddings, n_texts: int = 5, rank: int = 80, *,
             return_details: bool = False, head_chunk: int = 16, progress: bool = False):
    """TextSpan (SPEC 2.2) for all heads at once.

    Args:
        contributions: (K, L, H, d) per-head contributions (or `Contributions`, or (K, d) for
            one head); fp64 input computes everything in fp64, otherwise the d x d Gram
            matrices are fp32 (on centred data) and the rest fp64.
        text_embeddings: (M, d) text bank embeddings; rows are L2-normalised here.
        n_texts: texts per head (CCS uses 5). rank: principal subspace rank r (paper: 80).
        return_details: return a `TextSpanResult` (indices, stds, rank-n reconstruction).

    Returns:
        indices (L, H, n_texts) (or (n_texts,) for 2-D input), int64, in pick order.

    Numerics: the pick at each step is the argmax of sqrt(a' S a) over texts; texts whose
    spreads agree to ~1e-12 (fp64) / ~1e-6 (fp32 Gram) relative can be ordered differently
    than by a loop that forms images x texts explicitly. Exact duplicates pick the first.
    """
    C, T, single, rr = _check_textspan_args(contributions, text_embeddings, n_texts, rank)
    K, L, H, d = C.shape
    tnorm = T.norm(dim=-1)
    f64 = torch.float64
    gram_dtype = f64 if C.dtype == f64 else torch.float32
    dev = C.device
    Tn = (T.to(f64) / tnorm.to(f64)[:, None]).to(dev)
    Tg = Tn.to(gram_dtype)

    idx_out = torch.empty(L * H, n_texts, dtype=torch.long)
    std_out = torch.empty(L * H, n_texts, dtype=f64)
    recon = torch.empty(K, L * H, d, dtype=C.dtype) if return_details else None
    flat = C.reshape(K, L * H, d)
    from tqdm.auto import tqdm

    for s in tqdm(range(0, L * H, head_chunk), disable=not progress, desc="textspan", unit="chunk"):
        X = flat[:, s:s + head_chunk].to(gram_dtype).transpose(0, 1)  # (hc, K, d)
        hc = X.shape[0]
        mu = X.mean(1, keepdim=True)  # (hc, 1, d)
        if not torch.isfinite(mu).all():  # any NaN/inf in a head's data reaches its mean
            bad = int((~torch.isfinite(mu)).any(-1).any(-1).nonzero()[0]) + s
            raise ValueError(f"contributions of layer index {bad // H}, head {bad % H} contain NaN/inf")
        Xc = X - mu
        Gc = (Xc.transpose(1, 2) @ Xc).to(f64)  # centred Gram (hc, d, d)
        mu64 = mu.to(f64)
        Gu = Gc + K * (mu64.transpose(1, 2) @ mu64)  # uncentred Gram = C' C
        V = _top_eigenvectors(Gu, rr, low_precision=gram_dtype != f64)  # (hc, d, rr) top right sing. vectors of C
        S = V.transpose(1, 2) @ Gc @ V / (K - 1)  # (hc, rr, rr) covariance in the subspace
        A = (Tg @ V.to(gram_dtype)).to(f64) if gram_dtype != f64 else Tn @ V  # (hc, M, rr) text coords
        idx, std, picked = _pick_texts(A, S, n_texts)
        idx_out[s:s + hc], std_out[s:s + hc] = idx.cpu(), std.cpu()
        if return_details:
            U = picked @ V.transpose(1, 2)  # (hc, n, d) orthonormal picked directions
            Ug = U.to(gram_dtype)
            rec = mu + (Xc @ Ug.transpose(1, 2)) @ Ug  # (hc, K, d)
            recon[:, s:s + hc] = rec.transpose(0, 1).to(C.dtype).cpu()
    indices = idx_out.view(L, H, n_texts)
    stds = std_out.view(L, H, n_texts)
    if single:
        indices, stds = indices[0, 0], stds[0, 0]
    if not return_details:
        return indices
    recon = recon.view(K, L, H, d)
    if single:
        recon = recon[:, 0, 0]
    return TextSpanResult(indices, stds, recon)


# --------------------------------------------------------------------------------------
# text banks
# --------------------------------------------------------------------------------------
def read_text_bank(path: str | os.PathLike) -> list[str]:
    """One description per line of a UTF-8 file; blank lines dropped, duplicates kept once."""
    from .concepts import ConceptDictionary

    return ConceptDictionary.from_file(path).texts


def builtin_text_bank() -> list[str]:
    """The built-in list of general image descriptions (fastinterp/data/textspan_descriptions.txt)."""
    from importlib import resources

    from .concepts import ConceptDictionary

    text = resources.files("fastinterp.data").joinpath("textspan_descriptions.txt").read_text(encoding="utf-8")
    return ConceptDictionary(text.splitlines(), name="textspan").texts
