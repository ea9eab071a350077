"""SITH edits (SPEC 1.7, paper Sec 5): scale singular values and write them into the model.

`apply_multipliers` edits a block in place (undo with the returned `EditHandle`); the
recipes turn per-singular-vector decisions into multipliers: `suppress_multipliers`,
`sign_flip_multipliers` (from 1-5 scores, e.g. `score_singular_vectors` with an
`fastinterp.llm.LLMScorer`, kept in decisions files: `read_decisions` / `write_decisions`)
and `classification_multipliers` (from `task_concepts`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..io import atomic_write_text
from ..llm import PROMPT_BACKGROUND, score_concept_lists
from .vo import _block, _check_finite, _factored_svd, _factors, _resolve_center

__all__ = ["EditHandle", "apply_multipliers", "classification_multipliers", "read_decisions",
           "score_singular_vectors", "sign_flip_multipliers", "suppress_multipliers", "task_concepts",
           "write_decisions"]


class EditHandle:
    """Returned by `apply_multipliers`: `undo()` restores the block's original weights."""

    def __init__(self, attn, weight: torch.Tensor, bias: torch.Tensor | None, layer: int):
        self._attn, self._w, self._b, self.layer = attn, weight, bias, layer

    @torch.no_grad()
    def undo(self) -> None:
        self._attn.in_proj_weight.copy_(self._w)
        if self._b is not None:
            self._attn.in_proj_bias.copy_(self._b)


def _multiplier_tensor(multipliers, H: int, hd: int) -> torch.Tensor:
    """-> (H, r) float64. Accepts an (H, r) tensor/array/list, {head: (r,)} or {(head, sv): value}."""
    if isinstance(multipliers, Mapping):
        m = torch.ones(H, hd, dtype=torch.float64)
        for key, value in multipliers.items():
            if isinstance(key, tuple):
                h, j = key
                if not (0 <= h < H and 0 <= j < hd):
                    raise IndexError(f"multiplier key {key} is out of range (heads 0..{H - 1}, singular "
                                     f"vectors 0..{hd - 1})")
                m[h, j] = float(value)
            else:
                h = int(key)
                if not 0 <= h < H:
                    raise IndexError(f"head {h} is out of range (0..{H - 1})")
                v = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
                if v.numel() > hd:
                    raise ValueError(f"head {h}: {v.numel()} multipliers for {hd} singular vectors")
                m[h, :v.numel()] = v
        return m
    m = torch.as_tensor(multipliers, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != H or not 1 <= m.shape[1] <= hd:
        raise ValueError(f"multipliers must have shape (heads={H}, r) with 1 <= r <= head dim {hd}, got "
                         f"{tuple(m.shape)}")
    _check_finite(m, "multipliers", "use finite numbers")
    return m


@torch.no_grad()
def apply_multipliers(model, layer: int, multipliers, *, fold_ln: bool = True, center: bool | None = None,
                      truncate: bool = False) -> EditHandle:
    """Scale the singular values of every head's VO matrix and write the result into the model.

    W'_h = U_h diag(s_h * m_h) Vh_h (SPEC 1.7), in the same basis SITH decomposes (fold_ln,
    center), then written back exactly into the block's nn.MultiheadAttention: since W'_h's
    input side lies in the span of the head's value rows and its output side in the span of
    its output columns, W'_h = W_v^T C_h W_o^T for an (hd, hd) C_h, so the value rows become
    C_h^T W_v (and the value bias absorbs the LN-bias term). out_proj, queries, keys and
    ln_1 are untouched. The forward then equals SITH's edited model (its output differs at
    most by a multiple of the all-ones vector per token where center=True, which every
    following LayerNorm removes). All-ones multipliers change nothing.

    Args:
        multipliers: (H, r) (r <= hd; singular vectors beyond r keep multiplier 1 unless
            `truncate`, then 0, as the reference does when it edits with rank < hd), or
            {head: (r,)} or {(head, sv): value}.

    Returns:
        EditHandle (call .undo() to restore).
    """
    center = _resolve_center(fold_ln, center)
    if center and not fold_ln:
        raise ValueError("editing with center=True and fold_ln=False is not function-preserving (centering "
                         "is exact only on the LayerNorm-normalised input); use fold_ln=True or center=False")
    _, block, layer = _block(model, layer, open_clip_only=True)  # writes the packed in_proj weights
    attn = block.attn
    H, hd = attn.num_heads, attn.head_dim
    m = _multiplier_tensor(multipliers, H, hd)
    m_full = torch.zeros(H, hd, dtype=torch.float64) if truncate else torch.ones(H, hd, dtype=torch.float64)
    m_full[:, :m.shape[1]] = m
    handle = EditHandle(attn, attn.in_proj_weight.detach().clone(),
                        None if attn.in_proj_bias is None else attn.in_proj_bias.detach().clone(), layer)
    if bool((m_full == 1).all()):
        return handle
    f = _factors(block, fold_ln, center)
    svd = _factored_svd(f)
    dev = f.w_v.device
    delta_s = svd.s * (m_full.to(dev) - 1)  # (H, hd)
    # C = I + A^+ U diag(ds) Vh B^+ with A = Qa Ra, B^T = Qb Rb: A^+ U = Ra^+ Um, Vh B^+ = Vmh Rb^+T
    left = torch.linalg.pinv(svd.ra) @ svd.um  # (H, hd, hd)
    right = svd.vmh @ torch.linalg.pinv(svd.rb).transpose(1, 2)
    eye = torch.eye(hd, dtype=torch.float64, device=dev)
    c = eye + left @ torch.diag_embed(delta_s) @ right  # (H, hd, hd)
    w_v_new = c.transpose(1, 2) @ f.raw_w_v  # (H, hd, D)
    b_v_new = f.raw_b_v + ((eye - c.transpose(1, 2)) @ (f.raw_w_v @ f.beta).unsqueeze(-1)).squeeze(-1)
    D = attn.embed_dim
    dtype = attn.in_proj_weight.dtype
    attn.in_proj_weight[2 * D:].copy_(w_v_new.reshape(D, D).to(dtype))
    if attn.in_proj_bias is not None:
        attn.in_proj_bias[2 * D:].copy_(b_v_new.reshape(D).to(dtype))
    elif bool((b_v_new != 0).any()):
        handle.undo()
        raise ValueError("this attention has no value bias to absorb the LayerNorm bias; edit with fold_ln=False")
    return handle


def _decisions_to_multipliers(decisions, table: dict, name: str) -> torch.Tensor:
    d = torch.as_tensor(decisions)
    if d.dtype.is_floating_point:
        if not bool((d == d.round()).all()):
            raise ValueError(f"{name}: scores must be integers 1-5")
        d = d.long()
    bad = ~torch.isin(d, torch.tensor(sorted(table)))
    if bool(bad.any()):
        raise ValueError(f"{name}: scores must be integers 1-5, found {d[bad][:5].tolist()}")
    out = torch.zeros(d.shape, dtype=torch.float64)
    for k, v in table.items():
        out[d == k] = v
    return out


def suppress_multipliers(decisions) -> torch.Tensor:
    """Spurious-correlation recipe: score 1-2 -> 1 (keep), 3-5 -> 0. (H, r) ints -> (H, r)."""
    return _decisions_to_multipliers(decisions, {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0}, "suppress")


def sign_flip_multipliers(decisions) -> torch.Tensor:
    """Unsafe-concept recipe: score 1-2 -> 1, 3 -> -1, 4-5 -> 0. (H, r) ints -> (H, r)."""
    return _decisions_to_multipliers(decisions, {1: 1.0, 2: 1.0, 3: -1.0, 4: 0.0, 5: 0.0}, "sign-flip")


def task_concepts(class_embeddings: torch.Tensor, dictionary: torch.Tensor, *, sparsity: int = 10,
                  coh: float = 0.3, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Task-related atoms for the classification recipe: the union of the atoms COMP
    (positive, coh) selects with a nonzero coefficient for each class embedding.

    Args:
        class_embeddings: (C, d) class-name text embeddings (normalised here).
        dictionary: (M, d) unit rows (the classification experiment normalises only).
        exclude: optional (M,) bool mask of atoms to leave out (e.g. the class names).

    Returns:
        (T, d) the selected atoms.
    """
    from ..sparse import comp_topk

    g = dictionary if exclude is None else dictionary[~exclude.bool()]
    cls = F.normalize(class_embeddings.float(), dim=-1).to(g.device)
    k = min(sparsity, g.shape[0])
    s, i = comp_topk(cls, g, k=k, coh=coh, positive=True)
    chosen = torch.unique(i[s != 0])
    return g[chosen]


def classification_multipliers(scores: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor,
                               task_atoms: torch.Tensor, *, offset: float = 0.3, min_threshold: float | None = 0.8,
                               max_threshold: float | None = None) -> torch.Tensor:
    """Classification recipe: R = sum_k score_k * max_t <G[idx_k], t>; alpha = clamp(R + offset,
    min_threshold, max_threshold) (reference: clamp_min(R + 0.3, 0.8)).

    Args:
        scores, indices: (H, r, K) decomposition; dictionary: (M, d) unit rows (indexed by
            `indices`; the reference uses the normalise-only dictionary here);
        task_atoms: (T, d) from `task_concepts`.

    Returns:
        (H, r) multipliers.
    """
    atoms = dictionary[indices.reshape(-1).to(dictionary.device)].reshape(*indices.shape, -1).float()
    sims = (atoms @ task_atoms.float().T).amax(dim=-1)  # (H, r, K)
    r = (sims * scores.float().to(sims.device)).sum(dim=-1) + offset
    if min_threshold is not None:
        r = r.clamp_min(min_threshold)
    if max_threshold is not None:
        r = r.clamp_max(max_threshold)
    return r.cpu()


# --------------------------------------------------------------------------------------
# decisions (scores 1-5 per singular vector)
# --------------------------------------------------------------------------------------
def score_singular_vectors(scores: torch.Tensor, indices: torch.Tensor, concepts: Sequence[str],
                           scorer: Callable[[str], int], *, template: str = PROMPT_BACKGROUND,
                           cache: str | os.PathLike | None = None, progress: bool = True) -> torch.Tensor:
    """Ask `scorer` about every singular vector of a layer: an LLM (`prompt -> int` 1-5, e.g.
    `fastinterp.llm.LLMScorer`) or the offline `fastinterp.sith.ClipScorer` (scores the
    (weight, concept) list by CLIP text similarity; `template` unused).

    Args:
        scores, indices: (H, r, K) decomposition; concepts: the dictionary's texts.
        cache: optional decisions file (one integer per line, head-major, the reference's
            format); answers already there are reused and new ones appended, so an
            interrupted run resumes.

    Returns:
        (H, r) int64 scores.

    The prompting itself is `fastinterp.llm.score_concept_lists`; this adds the decisions file.
    """
    H, r, _ = scores.shape
    flat_s, flat_i = scores.reshape(H * r, -1), indices.reshape(H * r, -1)
    done: list[int] = []
    if cache is not None and Path(cache).exists():
        done = read_decisions(cache, allow_partial=True)[: H * r]
    # an append-only log (one line per answer, flushed), not an atomic rewrite: it is what resumes
    fh = open(cache, "a", encoding="utf-8") if cache is not None else None

    def append(value: int) -> None:
        fh.write(f"{value}\n")
        fh.flush()

    prepare = getattr(scorer, "prepare", None)  # a scorer that embeds concepts does it in one batched pass
    if prepare is not None and len(done) < H * r:
        prepare([concepts[int(k)] for k in torch.unique(flat_i[len(done):][flat_s[len(done):] > 0]).tolist()])
    try:
        done += score_concept_lists(flat_s, flat_i, concepts, scorer, template=template, start=len(done),
                                    on_score=append if fh is not None else None, progress=progress)
    finally:
        if fh is not None:
            fh.close()
    return torch.tensor(done, dtype=torch.long).reshape(H, r)


def read_decisions(path: str | os.PathLike, *, allow_partial: bool = False) -> list[int]:
    """A decisions file: one integer per line (the reference writes 'Error' for failures)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(int(line))
        except ValueError:
            if allow_partial:
                break
            raise ValueError(f"{path}:{n}: {line!r} is not an integer score; re-score that singular vector") from None
    return out


def write_decisions(decisions: torch.Tensor, path: str | os.PathLike) -> None:
    """(H, r) ints -> one per line, head-major."""
    atomic_write_text(path, "".join(f"{int(v)}\n" for v in torch.as_tensor(decisions).reshape(-1)))
