"""Mutual knowledge, reference semantics (SPEC.md section 3.2 and 3.3), written plainly.

What the reference code computes per image, loop for loop:

* ``paper_mi_reference(X, Y)``: Eq. (1) as the reference evaluates it. An N x M table with a 1
  wherever ``X[i] == Y[j]``, divided by its sum into ``p``; ``H = -sum p * ln(p + 1e-9)``;
  ``MI = ln N + ln M + H`` (plus sign, as in the reference), and 0 when the result is NaN
  (no match: 0 / 0).
* ``mi_curve_reference(X, Y)``: the MI dynamics. Replace X[0], then X[1], ... (most important
  first) with an id that no language concept has, recomputing MI after each step: N + 1 points.
* ``dataset_curve_reference(curves)``: zero-pad to the longest curve and average point-wise,
  in float32 (the reference stacks the curves into a ``torch.FloatTensor``).
* ``curve_auc_reference(curve)``: ``sum(curve) / len(curve)``.
* ``textbook_mi_reference(X, Y)``: the textbook mutual information of the same N x M table
  (sum p_ij ln(p_ij / (p_i p_j)), what ``sklearn.metrics.mutual_info_score`` computes from a
  contingency table); 0 when nothing matches.
* ``sinkhorn_reference(S, scale=2.5, epsilon=1.0, iters=1000)``: the fixed-iteration
  Sinkhorn of the textual-concept step: ``P = exp(scale * S * epsilon)``, then ``iters`` times
  rows normalised to sum 1, then columns normalised to sum 1.

One deliberate difference: with an empty X or Y the original code evaluates ``ln 0 = -inf``
and returns -inf (it only maps NaN to 0). SPEC.md says "0 when nothing matches", and an empty
list matches nothing, so these functions (and the fast kernels) return 0 there.

Slow on purpose: the MI loop is O(N * M) pure Python, run N + 1 times per image.
"""
from __future__ import annotations

import numpy as np
import torch


def paper_mi_reference(X, Y) -> float:
    """Eq. (1) as the reference computes it. X: N ids (vision), Y: M ids (language)."""
    N = len(X)
    M = len(Y)
    if N == 0 or M == 0:  # the original gives -inf here (ln 0); SPEC.md: 0 when nothing matches
        return 0.0
    table = np.zeros((N, M))
    for i, x in enumerate(X):
        for j, y in enumerate(Y):
            if x == y:
                table[i, j] = 1
    with np.errstate(invalid="ignore", divide="ignore"):
        table /= np.sum(table)
        joint_entropy = -np.sum(np.sum(table * np.log(table + 1e-9)))
    mutual_info = np.log(N) + np.log(M) + joint_entropy
    if np.isnan(mutual_info):
        return 0.0
    return float(mutual_info)


def textbook_mi_reference(X, Y) -> float:
    """Textbook MI (natural log) of the N x M match table of X and Y; 0 when nothing matches.

    Loop-for-loop: p = T / sum(T); MI = sum over cells with p_ij > 0 of p_ij ln(p_ij / (p_i p_j)).
    """
    N = len(X)
    M = len(Y)
    table = [[1.0 if X[i] == Y[j] else 0.0 for j in range(M)] for i in range(N)]
    total = sum(sum(row) for row in table)
    if total == 0 or N <= 1 or M <= 1:  # one row or one column: MI is 0 (as in scikit-learn)
        return 0.0
    row_p = [sum(table[i]) / total for i in range(N)]
    col_p = [sum(table[i][j] for i in range(N)) / total for j in range(M)]
    mi = 0.0
    for i in range(N):
        for j in range(M):
            p = table[i][j] / total
            if p > 0:
                mi += p * np.log(p / (row_p[i] * col_p[j]))
    return float(max(mi, 0.0))


def mi_curve_reference(X, Y, *, variant: str = "reference", oov_id=None) -> list[float]:
    """MI after removing 0, 1, ..., N vision concepts (most important first): N + 1 values.

    X: vision concept ids in importance order; Y: language concept ids. A removed concept is
    replaced by ``oov_id`` (default: one more than the largest id in X and Y), an id that no
    language concept has, as the reference does with ``len(all_descriptors) + 1``.
    """
    score = {"reference": paper_mi_reference, "textbook": textbook_mi_reference}[variant]
    X = [int(x) for x in X]
    Y = [int(y) for y in Y]
    if oov_id is None:
        oov_id = max(X + Y, default=0) + 1
    if oov_id in Y:
        raise ValueError(f"oov_id={oov_id} occurs among the language ids; pick an id they lack")
    perturbed = list(X)
    curve = [score(perturbed, Y)]
    for i in range(len(perturbed)):
        perturbed[i] = oov_id
        curve.append(score(perturbed, Y))
    return curve


def dataset_curve_reference(curves) -> list[float]:
    """Zero-pad each curve to the longest and average point-wise (float32, as the reference)."""
    max_len = max(len(c) for c in curves)
    padded = [list(c) + [0 for _ in range(max_len - len(c))] for c in curves]
    return torch.FloatTensor(padded).mean(0).tolist()


def curve_auc_reference(curve) -> float:
    """Area under a curve as the reference computes it: the plain mean of its points."""
    return sum(curve) / len(curve)


def sinkhorn_reference(S, scale: float = 2.5, epsilon: float = 1.0, iters: int = 1000) -> torch.Tensor:
    """The reference's Sinkhorn on a (L, K) similarity matrix S (parts x descriptors).

    P = exp((S * scale) * epsilon); then ``iters`` times: rows divided by their sums, then
    columns divided by theirs. Returns P, (L, K), in S's dtype (torch).
    """
    S = torch.as_tensor(S)
    P = torch.exp((S * scale) * epsilon)
    for _ in range(iters):
        P /= P.sum(dim=1, keepdim=True)
        P /= P.sum(dim=0, keepdim=True)
    return P
