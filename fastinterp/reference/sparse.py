"""SITH's sparse coding (`sith.sdl`), reference semantics (SPEC.md section 1.5), plainly.

Dense (B, M) score matrices every step, a dense (B, M) selection mask, and the reference
NNLS (Cholesky start + projected coordinate descent, 100 sweeps). Slow on purpose: this is
what the parity tests compare against and what the benchmarks time as the baseline.

Shapes: x (B, D) signals; dictionary G (M, D) with unit rows; codes (B, M).
"""
from __future__ import annotations

import torch

__all__ = [
    "coherent_orthogonal_matching_pursuit",
    "lstsq",
    "matching_pursuit",
    "nnls",
    "orthogonal_matching_pursuit",
    "topk_nnls",
]


def nnls(A: torch.Tensor, b: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Reference NNLS: min_{c >= 0} ||A c - b||, A (B, D, K), b (B, D) -> c (B, K).

    Normal equations N = A^T A, h = A^T b; start from the ridge-regularised unconstrained
    solution clamped at 0; then up to `max_iter` sweeps of projected coordinate descent
    c_j <- max(0, c_j - (N_j . c - h_j) / (N_jj + 1e-10)), stopping when the change of the
    whole batch is below tol times the batch's norm.
    """
    n_mat = A.transpose(1, 2) @ A  # (B, K, K)
    h = (A.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1)  # (B, K)
    k = n_mat.shape[-1]
    try:
        chol = torch.linalg.cholesky(n_mat + 1e-6 * torch.eye(k, dtype=A.dtype, device=A.device))
        c = torch.cholesky_solve(h.unsqueeze(-1), chol).squeeze(-1)
    except RuntimeError:
        c = torch.zeros_like(h)
    c = c.clamp(min=0)
    for _ in range(max_iter):
        previous = c.clone()
        for j in range(k):
            gradient = (n_mat[:, j, :] * c).sum(dim=1) - h[:, j]
            c[:, j] = (c[:, j] - gradient / (n_mat[:, j, j] + 1e-10)).clamp(min=0)
        if torch.linalg.vector_norm(c - previous) < tol * torch.linalg.vector_norm(previous).clamp(min=1e-10):
            break
    return c


def lstsq(A: torch.Tensor, b: torch.Tensor, *, positive: bool = False) -> torch.Tensor:
    """min_c ||A c - b|| for A (B, D, K), b (B, D): torch.linalg.lstsq, or `nnls` if positive."""
    if positive:
        return nnls(A, b)
    return torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)


def _refit(x, dictionary, selected, positive, k):
    """Least squares of the ORIGINAL x on each row's selected atoms; dense (B, M) codes."""
    B, M = selected.shape
    atom_ids = selected.nonzero()[:, 1].reshape(B, k)  # ascending atom index per row
    basis = dictionary[atom_ids]  # (B, k, D)
    coefs = lstsq(basis.transpose(1, 2), x, positive=positive)  # (B, k)
    codes = torch.zeros((B, M), dtype=x.dtype, device=x.device)
    codes.scatter_(1, atom_ids, coefs)
    return codes


def coherent_orthogonal_matching_pursuit(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int,
                                         coh: float = 0.1, coh_dictionary: torch.Tensor | None = None,
                                         positive: bool = True, selection: str = "signed") -> torch.Tensor:
    """COMP, reference semantics: x (B, D), dictionary (M, D) -> codes (B, M).

    Each step: score = r @ G^T, plus (from the 2nd step) coh * mean_{i in S}(C[i]) @ C^T with
    C = coh_dictionary (default G); selected atoms get -inf; argmax (of the score, or of its
    absolute value when selection="abs"); refit on the original x; r = x - codes @ G.
    """
    if coh_dictionary is None:
        coh_dictionary = dictionary
    B, M = x.shape[0], dictionary.shape[0]
    selected = torch.zeros((B, M), dtype=torch.bool, device=x.device)
    rows = torch.arange(B, device=x.device)
    residual = x.clone()
    codes = torch.zeros((B, M), dtype=x.dtype, device=x.device)
    for k in range(max_sparsity):
        score = residual @ dictionary.T  # (B, M)
        if k > 0 and coh != 0:
            chosen = selected.nonzero()[:, 1].reshape(B, k)
            mean_atom = coh_dictionary[chosen].mean(dim=1)  # (B, Dc)
            score = score + coh * (mean_atom @ coh_dictionary.T)
        if selection == "abs":
            score = score.abs()
        score = score.masked_fill(selected, float("-inf"))
        best = score.argmax(dim=1)
        selected[rows, best] = True
        codes = _refit(x, dictionary, selected, positive, k + 1)
        residual = x - codes @ dictionary
    return codes


def orthogonal_matching_pursuit(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int,
                                positive: bool = False, selection: str = "signed") -> torch.Tensor:
    """OMP (NNOMP when positive=True), reference semantics: COMP without the coherence term."""
    return coherent_orthogonal_matching_pursuit(x, dictionary, max_sparsity=max_sparsity, coh=0.0,
                                                positive=positive, selection=selection)


def matching_pursuit(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int | None = None,
                     tol: float | None = 1e-6, positive: bool = False) -> torch.Tensor:
    """Classic MP, reference semantics: x (B, D), dictionary (M, D) -> codes (B, M).

    Scores of atoms with a nonzero code are set to 0 (not -inf); argmax of the score
    (clamped at 0 when positive) or of |score|; the code of the chosen atom is SET to its
    score; a signal stops updating once ||r|| < tol.
    """
    if max_sparsity is None and tol is None:
        raise ValueError("give max_sparsity or tol")
    B, M = x.shape[0], dictionary.shape[0]
    codes = torch.zeros((B, M), dtype=x.dtype, device=x.device)
    residual = x.clone()
    stopped = None if tol is None else torch.zeros(B, dtype=torch.bool, device=x.device)
    rows = torch.arange(B, device=x.device)
    for _ in range(M if max_sparsity is None else max_sparsity):
        score = (residual @ dictionary.T).masked_fill(codes != 0, 0.0)
        best = score.argmax(dim=1) if positive else score.abs().argmax(dim=1)
        value = score[rows, best]
        if positive:
            value = value.clamp(min=0)
        if stopped is not None:
            value = value.masked_fill(stopped, 0.0)
        codes[rows, best] = value
        residual = residual - value.unsqueeze(1) * dictionary[best]
        if stopped is not None:
            stopped |= torch.linalg.vector_norm(residual, dim=1) < tol
            if bool(stopped.all()):
                break
    return codes


def topk_nnls(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int,
              positive: bool = True) -> torch.Tensor:
    """The K atoms of highest x @ G^T, then (NN)LS of x on them: dense (B, M) codes."""
    B, M = x.shape[0], dictionary.shape[0]
    similarity = x @ dictionary.T
    ids = similarity.topk(max_sparsity, dim=1).indices  # (B, K)
    coefs = lstsq(dictionary[ids].transpose(1, 2), x, positive=positive)
    codes = torch.zeros((B, M), dtype=x.dtype, device=x.device)
    codes.scatter_(1, ids, coefs)
    return codes
