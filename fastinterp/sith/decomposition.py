"""SITH decompositions: the `decompose` driver and its file format.

A layer's decomposition is one file, `layer-{LL}_{left|right}_{foldln|nofoldln}_{dictionary}_
{method}_sparsity-{K}.pt` (SITH's name; readers split the stem on '_'), holding
{"scores", "indices"} (H, r, K), "singular_values" (H, r) and "meta" (what a reused file
must match). `decompose` skips a layer whose valid file exists and checkpoints its progress
within a layer to `<file>.partial`, which a later run resumes (SPEC 1.4-1.5).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..io import CorruptFileError, MissingChecksumError, load_checked, save_checked
from ..vit import check_layers, vit_info
from .vo import (_block, _check_image_mean, _check_rank, _check_sv_type, _factored_svd, _factors, _resolve_center,
                 prepare_dictionary, project)

__all__ = ["FILE_FORMAT", "decompose", "decomposition_filename", "load_decomposition", "parse_decomposition_filename"]

FILE_FORMAT = 1


# --------------------------------------------------------------------------------------
# file names, files
# --------------------------------------------------------------------------------------
def decomposition_filename(layer: int, *, sv_type: str = "right", fold_ln: bool = True, dictionary: str,
                           method: str, sparsity: int) -> str:
    """SITH's file name: layer-{LL}_{left|right}_{foldln|nofoldln}_{dictionary}_{method}_sparsity-{K}.pt

    Readers split the stem on '_', so `dictionary` and `method` must not contain '_'.
    """
    _check_sv_type(sv_type)
    for what, value in (("dictionary", dictionary), ("method", method)):
        if not value or "_" in value or "/" in value or os.sep in value:
            raise ValueError(f"{what} name {value!r} cannot go into a SITH file name (no '_', '/' or empty "
                             f"names: readers split on '_'); rename it, e.g. {value.replace('_', '-')!r}")
    return (f"layer-{int(layer):02d}_{sv_type}_{'foldln' if fold_ln else 'nofoldln'}_{dictionary}_{method}_"
            f"sparsity-{int(sparsity)}.pt")


_NAME_RE = re.compile(r"layer-(\d+)_(left|right)_(foldln|nofoldln)_([^_]+)_([^_]+)_sparsity-(\d+)")


def parse_decomposition_filename(path: str | os.PathLike) -> dict:
    """Inverse of `decomposition_filename`: {layer, sv_type, fold_ln, dictionary, method, sparsity}."""
    stem = Path(path).name
    stem = stem[:-3] if stem.endswith(".pt") else stem
    m = _NAME_RE.fullmatch(stem)
    if not m:
        raise ValueError(f"{Path(path).name!r} is not a SITH decomposition file name "
                         f"(layer-LL_right_foldln_DICT_METHOD_sparsity-K.pt)")
    return {"layer": int(m.group(1)), "sv_type": m.group(2), "fold_ln": m.group(3) == "foldln",
            "dictionary": m.group(4), "method": m.group(5), "sparsity": int(m.group(6))}


def _tensor_hash(t: torch.Tensor, max_elements: int = 1 << 24) -> str:
    """Fingerprint of a 2-D tensor: all bytes when small; for very large dictionaries a
    strided sample of rows plus the float64 column sums (computed in chunks, no full copy)."""
    t = t.detach()
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    if t.numel() > max_elements:
        step = t.numel() // max_elements + 1
        col = torch.zeros(t.shape[1], dtype=torch.float64, device=t.device)
        for s0 in range(0, t.shape[0], 1 << 14):
            col += t[s0:s0 + (1 << 14)].to(torch.float64).sum(0)
        h.update(col.cpu().numpy().tobytes())
        t = t[::step]
    h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def load_decomposition(path: str | os.PathLike, *, require_checksum: bool = False) -> dict:
    """Read a decomposition file (ours or the reference's): {"scores", "indices", ...}
    with scores/indices (H, r, K). Ours carry a content checksum, verified here (the
    reference's have none, accepted unless `require_checksum`). Raises ValueError
    (CorruptFileError for a damaged file) naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise CorruptFileError(f"decomposition file {str(path)!r} is a folder; move it away")
    if not path.is_file():
        raise FileNotFoundError(f"decomposition file {str(path)!r} does not exist")
    try:
        data = load_checked(path, require_checksum=require_checksum)
    except CorruptFileError as err:
        raise type(err)(f"decomposition file {err}; or decompose again with --force") from None
    if "scores" not in data or "indices" not in data:
        raise ValueError(f"{str(path)!r} is not a SITH decomposition (needs 'scores' and 'indices')")
    s, i = data["scores"], data["indices"]
    if not (isinstance(s, torch.Tensor) and isinstance(i, torch.Tensor) and s.shape == i.shape and s.ndim == 3):
        raise ValueError(f"{str(path)!r}: scores and indices must both be (H, rank, K) tensors, got "
                         f"{getattr(s, 'shape', None)} and {getattr(i, 'shape', None)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{str(path)!r}: scores contain NaN or Inf")
    return data


def _valid_existing(path: Path, meta: dict) -> dict | None:
    if not path.exists():
        return None
    try:  # ours carry a checksum; a file without one is reused only if it is the reference's (no meta)
        data = load_decomposition(path, require_checksum=True)
    except MissingChecksumError as err:
        data = load_decomposition(path)
        if "meta" in data:
            warnings.warn(f"{err} -- not reused: decomposing the layer again", UserWarning, stacklevel=4)
            return None
    except (ValueError, FileNotFoundError) as err:
        warnings.warn(f"{err} -- not reused: decomposing the layer again", UserWarning, stacklevel=4)
        return None
    expect = (meta["heads"], meta["rank"], meta["sparsity"])
    if tuple(data["scores"].shape) != expect:
        return None
    old = data.get("meta")
    if isinstance(old, dict):
        keys = ("signals", "dictionary_hash", "method", "sparsity", "sv_type", "fold_ln", "center")
        if any(old.get(k) != meta.get(k) for k in keys):
            return None
    return data


# --------------------------------------------------------------------------------------
# the decompose driver
# --------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One `decompose` call's validated settings."""

    layers: list[int]
    rank: int
    method: str
    sparsity: int
    sv_type: str
    fold_ln: bool
    center: bool
    image_mean: torch.Tensor | None
    atoms: torch.Tensor  # (M, d) prepared dictionary on the coding device
    dictionary_name: str
    dictionary_hash: str
    output_dir: Path | None
    device: object
    batch_size: int
    chunk_size: int | None
    backend: str | None
    save_every: int

    def path(self, layer: int) -> Path | None:
        if self.output_dir is None:
            return None
        return self.output_dir / decomposition_filename(layer, sv_type=self.sv_type, fold_ln=self.fold_ln,
                                                        dictionary=self.dictionary_name, method=self.method,
                                                        sparsity=self.sparsity)


def _check_positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def _prepare_run(model, dictionary_embeddings, layers, *, rank, method, sparsity, sv_type, fold_ln, center,
                 image_mean, dictionary_mode, dictionary_name, output_dir, batch_size, device, chunk_size,
                 backend, save_every) -> _Run:
    """Validate everything before any work (names, shapes, method), prepare the atoms."""
    from ..sparse import parse_method

    if isinstance(layers, int):
        layers = [layers]
    layers = list(dict.fromkeys(check_layers(model, list(layers))))  # -1 and L-1 are one layer
    _check_sv_type(sv_type)
    parse_method(method)
    _check_positive_int(sparsity, "sparsity")
    _check_positive_int(batch_size, "batch_size")
    info = vit_info(model)
    if not isinstance(dictionary_embeddings, torch.Tensor) or dictionary_embeddings.ndim != 2:
        raise ValueError("dictionary_embeddings must be an (M, d) tensor of text embeddings")
    if dictionary_embeddings.shape[1] != info.output_dim:
        raise ValueError(f"dictionary embeddings have dimension {dictionary_embeddings.shape[1]} but the model's "
                         f"joint space has dimension {info.output_dim}; encode the dictionary with this same "
                         f"model (ConceptDictionary.encode)")
    if sparsity > dictionary_embeddings.shape[0]:
        raise ValueError(f"sparsity={sparsity} exceeds the dictionary size {dictionary_embeddings.shape[0]}")
    image_mean = _check_image_mean(image_mean, info.output_dim)
    center = _resolve_center(fold_ln, center)
    if device is None:
        device = next(model.parameters()).device
    g = prepare_dictionary(dictionary_embeddings, dictionary_mode).to(device=device, dtype=torch.float32)
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:  # validate names before any work
        decomposition_filename(0, sv_type=sv_type, fold_ln=fold_ln, dictionary=dictionary_name, method=method,
                               sparsity=sparsity)
    r = _check_rank(rank, info.head_dim, stacklevel=4)  # the warning names decompose's caller
    return _Run(layers=layers, rank=r, method=method, sparsity=sparsity, sv_type=sv_type, fold_ln=fold_ln,
                center=center, image_mean=image_mean, atoms=g, dictionary_name=dictionary_name,
                dictionary_hash=_tensor_hash(g), output_dir=out_dir, device=device, batch_size=batch_size,
                chunk_size=chunk_size, backend=backend, save_every=save_every)


def _layer_signals(model, layer: int, run: _Run):
    """The layer's singular vectors in the joint space (H r, d), singular values (H, r) and
    the file's meta (what a reused file must match)."""
    _, block, _ = _block(model, layer)
    svd = _factored_svd(_factors(block, run.fold_ln, run.center))
    r = run.rank
    x = (svd.u[..., :r].transpose(1, 2) if run.sv_type == "left" else svd.vh[:, :r, :]).float()  # (H, r, D)
    H = x.shape[0]
    z = project(model, x.reshape(H * r, -1).to(run.device), image_mean=run.image_mean)  # (H r, d)
    meta = {"format": FILE_FORMAT, "layer": layer, "heads": H, "rank": r, "sparsity": run.sparsity,
            "method": run.method, "sv_type": run.sv_type, "fold_ln": bool(run.fold_ln), "center": run.center,
            "dictionary": run.dictionary_name, "dictionary_size": int(run.atoms.shape[0]),
            "dictionary_hash": run.dictionary_hash, "image_mean": run.image_mean is not None,
            "signals": _tensor_hash(z), "model": getattr(model, "fastinterp_name", None),
            "weights": getattr(model, "fastinterp_weights", None)}
    return z, svd.s[:, :r].float().cpu(), meta


def _reuse_existing(path: Path, meta: dict, s_vals: torch.Tensor, progress: bool) -> dict | None:
    """The layer's valid existing file, marked "resumed", or None to compute it."""
    from tqdm.auto import tqdm

    existing = _valid_existing(path, meta)
    if existing is None:
        return None
    if progress:
        tqdm.write(f"layer {meta['layer']}: {path.name} exists and is valid, skipping")
    existing["resumed"] = True
    existing.setdefault("singular_values", s_vals)
    existing.setdefault("meta", meta)
    return existing


def _start_codes(n: int, sparsity: int, partial: Path | None, meta: dict):
    """(scores (n, K), indices (n, K), rows done): empty, or resumed from a matching partial file."""
    scores = torch.zeros(n, sparsity)
    indices = torch.zeros(n, sparsity, dtype=torch.long)
    if partial is not None and partial.exists():
        try:
            part = load_checked(partial)
        except CorruptFileError as err:  # reported, never used: the layer starts over
            warnings.warn(f"{err} -- not resumed: coding the layer from the start", UserWarning, stacklevel=4)
            return scores, indices, 0
        if (part.get("meta") == meta and isinstance(part.get("scores"), torch.Tensor)
                and part["scores"].shape == scores.shape and isinstance(part.get("indices"), torch.Tensor)
                and part["indices"].shape == indices.shape):
            return part["scores"], part["indices"], int(part["done"])
    return scores, indices, 0


def _code_signals(z: torch.Tensor, run: _Run, meta: dict, partial: Path | None, *, resume: bool,
                  progress: bool):
    """Sparse-code the rows of z in batches; every `save_every` batches the codes so far go
    to `partial` (atomically), and a matching partial file is resumed when `resume`."""
    from tqdm.auto import tqdm

    from ..sparse import sparse_code

    n = z.shape[0]
    scores, indices, start = _start_codes(n, run.sparsity, partial if resume else None, meta)
    bar = tqdm(total=n, initial=start, desc=f"SITH layer {meta['layer']}", unit="sv", disable=not progress)
    n_batches = 0
    for s0 in range(start, n, run.batch_size):
        batch = z[s0:s0 + run.batch_size]
        sc, ix = sparse_code(batch, run.atoms, method=run.method, sparsity=run.sparsity, chunk_size=run.chunk_size,
                             backend=run.backend)
        scores[s0:s0 + len(batch)] = sc.float().cpu()
        indices[s0:s0 + len(batch)] = ix.cpu()
        bar.update(len(batch))
        n_batches += 1
        if partial is not None and n_batches % run.save_every == 0 and s0 + len(batch) < n:
            save_checked({"scores": scores, "indices": indices, "done": s0 + len(batch), "meta": meta}, partial)
    bar.close()
    return scores, indices


def _decompose_layer(model, layer: int, run: _Run, *, force: bool, progress: bool) -> dict:
    z, s_vals, meta = _layer_signals(model, layer, run)
    path = run.path(layer)
    if path is not None and not force:
        existing = _reuse_existing(path, meta, s_vals, progress)
        if existing is not None:
            return existing
    partial = path.with_name(path.name + ".partial") if path is not None else None
    scores, indices = _code_signals(z, run, meta, partial, resume=not force, progress=progress)
    H = meta["heads"]
    res = {"scores": scores.reshape(H, run.rank, run.sparsity), "indices": indices.reshape(H, run.rank, run.sparsity),
           "singular_values": s_vals, "meta": meta}
    if path is not None:
        save_checked(res, path)
        partial.unlink(missing_ok=True)
    return res


def decompose(model, dictionary_embeddings: torch.Tensor, layers: Sequence[int] | int, *, rank: int | None = 64,
              method: str = "comp-0.3", sparsity: int = 5, sv_type: str = "right", fold_ln: bool = True,
              center: bool | None = None, image_mean: torch.Tensor | None = None,
              dictionary_mode: str = "center", dictionary_name: str = "custom",
              output_dir: str | os.PathLike | None = None, batch_size: int = 64, force: bool = False,
              progress: bool = True, device=None, chunk_size: int | None = None,
              backend: str | None = None, save_every: int = 10) -> dict[int, dict]:
    """SITH decomposition of the VO singular vectors of whole layers (SPEC 1.1-1.5).

    Args:
        model: open_clip CLIP with a ViT image tower.
        dictionary_embeddings: (M, d) raw text embeddings (one row per concept), prepared
            with `dictionary_mode` ("center": SITH; "normalize"; "none": already unit rows).
        layers: layer indices (negative from the end).
        rank: singular vectors per head (clipped to the head dim, with a warning).
        method: "comp-<coh>", "omp", "nnomp", "mp" or "topk" (see fastinterp.sparse).
        sparsity: K concepts per singular vector.
        sv_type: "right" or "left".
        fold_ln, center: see `vo_matrices` (center defaults to fold_ln).
        image_mean: optional (d,) mean image embedding (modality-gap correction).
        dictionary_name: used in the file name (no '_').
        output_dir: if given, each layer is written to
            `output_dir/layer-{LL}_{sv}_{foldln|nofoldln}_{dictionary}_{method}_sparsity-{K}.pt`;
            a valid existing file is reused (skipped) unless `force`; progress within a layer
            is checkpointed to `<file>.partial` every `save_every` batches and resumed.
        batch_size: singular vectors coded per call (the reference uses 64).

    Returns:
        {layer: {"scores" (H, r, K) float32, "indices" (H, r, K) int64,
                 "singular_values" (H, r), "meta": dict}}, sorted by coefficient
        descending per singular vector (as topk of the dense codes).
    """
    run = _prepare_run(model, dictionary_embeddings, layers, rank=rank, method=method, sparsity=sparsity,
                       sv_type=sv_type, fold_ln=fold_ln, center=center, image_mean=image_mean,
                       dictionary_mode=dictionary_mode, dictionary_name=dictionary_name, output_dir=output_dir,
                       batch_size=batch_size, device=device, chunk_size=chunk_size, backend=backend,
                       save_every=save_every)
    return {layer: _decompose_layer(model, layer, run, force=force, progress=progress) for layer in run.layers}
