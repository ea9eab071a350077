"""SITH: data-free interpretation of a CLIP ViT's attention heads from their weights.

For each head of a block, the value-output (VO) matrix (what the head can write, given what
it reads) is factorised by SVD; each singular vector is projected into CLIP's joint space
and explained as a sparse, non-negative combination of concept embeddings (COMP). Editing
the singular values (multipliers per head and singular vector) changes the model.
Behaviour follows SPEC.md section 1 (reference: frangente/SITH).

Shapes: H heads, hd head dim, D width, d joint dim, r rank (<= hd), K sparsity, M atoms.

Where things live (all re-exported here, so `from fastinterp import sith; sith.decompose(...)`):
    sith/vo.py             vo_matrices (H, D, D), vo_svd -> U (H, D, r), S (H, r), Vh (H, r, D),
                           singular_vectors, project, image_mean, prepare_dictionary, SV_TYPES
    sith/decomposition.py  decompose(model, dictionary_embeddings, layers, ...)
                           -> {layer: {"scores", "indices"} (H, r, K), ...}; the file format:
                           decomposition_filename, parse_decomposition_filename, load_decomposition
                           (resume of whole layers and of `.partial` checkpoints within one)
    sith/reconstruction.py fidelity(model, layer, scores, indices, dictionary, ...), fidelity_from_file
                           (how well the codes reconstruct the singular vectors; not named
                           fidelity.py so that the module never shadows the function)
    sith/edits.py          apply_multipliers (in place, undo-able EditHandle), suppress_multipliers /
                           sign_flip_multipliers / classification_multipliers, task_concepts (paper Sec 5),
                           score_singular_vectors, read_decisions / write_decisions
    sith/scoring.py        ClipScorer: offline 1-5 scores for the suppress / sign-flip recipes by CLIP
                           text similarity (the LLM's counterpart; same driver, score_singular_vectors)
    sith/explanations.py   explanation_rows, write_explanations, plot_explanations / explanations_figure
    fastinterp/llm.py      the LLM side of scoring: LLMScorer, parse_score, PROMPT_BACKGROUND,
                           PROMPT_UNSAFE, format_concepts_prompt
    fastinterp/cli/sith.py `fastinterp sith decompose | fidelity | edit` and the demo section

Speed: the SVD of each rank-hd product W_v^T W_o^T is computed from thin QR factors of the
two (D, hd) factors and an (hd, hd) SVD (O(D hd^2) instead of a dense D x D SVD); the coding
uses `fastinterp.sparse` (streamed COMP/OMP, never a (B, M) matrix).
"""
from __future__ import annotations

# parse_score and FILE_FORMAT are public here too, outside __all__ (as they were)
from ..llm import PROMPT_BACKGROUND, PROMPT_UNSAFE, LLMScorer, format_concepts_prompt, parse_score
from .decomposition import (FILE_FORMAT, decompose, decomposition_filename, load_decomposition,
                            parse_decomposition_filename)
from .edits import (EditHandle, apply_multipliers, classification_multipliers, read_decisions,
                    score_singular_vectors, sign_flip_multipliers, suppress_multipliers, task_concepts,
                    write_decisions)
from .explanations import explanation_rows, explanations_figure, plot_explanations, write_explanations
from .reconstruction import fidelity, fidelity_from_file
from .scoring import CLIP_TARGETS, ClipScorer
from .vo import SV_TYPES, image_mean, prepare_dictionary, project, singular_vectors, vo_matrices, vo_svd

__all__ = [
    "CLIP_TARGETS",
    "ClipScorer",
    "EditHandle",
    "LLMScorer",
    "PROMPT_BACKGROUND",
    "PROMPT_UNSAFE",
    "SV_TYPES",
    "apply_multipliers",
    "classification_multipliers",
    "decompose",
    "decomposition_filename",
    "explanation_rows",
    "explanations_figure",
    "fidelity",
    "fidelity_from_file",
    "format_concepts_prompt",
    "image_mean",
    "load_decomposition",
    "parse_decomposition_filename",
    "plot_explanations",
    "prepare_dictionary",
    "project",
    "read_decisions",
    "score_singular_vectors",
    "sign_flip_multipliers",
    "singular_vectors",
    "suppress_multipliers",
    "task_concepts",
    "vo_matrices",
    "vo_svd",
    "write_decisions",
    "write_explanations",
]
