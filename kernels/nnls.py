"""Batched small least-squares solvers: many independent problems with few unknowns.

Every problem is given in its normal-equation ("Gram") form: for min ||A c - b||^2 with
A of shape (D, K) the solvers take `gram = A^T A` (K, K) and `h = A^T b` (K,), batched
over a leading dimension B. K is small (the sparsity of a pursuit, 1-20) and B large, so
everything is vectorised over B with no per-problem Python loop; the only Python loops
run over iterations of the active-set method (a handful, bounded by `max_iter`).

- `solve_gram`: unconstrained least squares (the normal equations, solved in float64).
- `nnls_gram`: non-negative least squares, exact, by a batched Lawson-Hanson active-set
  method; problems that have not satisfied the KKT conditions after `max_iter` active-set
  steps (degenerate, near-singular systems) are finished by projected coordinate descent,
  the method of the reference code, run to convergence.
- `nnls_coordinate_descent`: that projected coordinate descent on its own.
- `lstsq`: the `(A, b) -> c` convenience form with optional `positive=True`.

All work is done in float64 whatever the input dtype (the systems are K x K: the cost is
nothing next to the pursuit's matmuls), and the result is returned in float64.
The torch code runs on any device, so there is no separate GPU form: each solver's table in
`FORMS` has the one "torch" form (picked and recorded by `choose_backend` all the same).
"""
from __future__ import annotations

import torch

from .dispatch import choose_backend, register, torch_form

__all__ = ["FORMS", "lstsq", "nnls_coordinate_descent", "nnls_gram", "solve_gram"]


def _check_gram(gram: torch.Tensor, h: torch.Tensor) -> tuple[int, int]:
    if not isinstance(gram, torch.Tensor) or not isinstance(h, torch.Tensor):
        raise TypeError("gram and h must be torch tensors")
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must have shape (B, K, K), got {tuple(gram.shape)}")
    if h.ndim != 2 or h.shape != gram.shape[:2]:
        raise ValueError(f"h must have shape (B, K) = {tuple(gram.shape[:2])}, got {tuple(h.shape)}")
    if gram.device != h.device:
        raise ValueError(f"gram is on {gram.device} but h is on {h.device}; put both on one device")
    if not (gram.is_floating_point() and h.is_floating_point()):
        raise TypeError("gram and h must be floating-point tensors")
    return gram.shape[0], gram.shape[1]


def _solve_masked(gram: torch.Tensor, h: torch.Tensor, passive: torch.Tensor) -> torch.Tensor:
    """Solve gram[P, P] z_P = h[P] for every problem, with z = 0 outside P.

    The variables outside P are decoupled by replacing their rows/columns with the
    identity (and their right-hand side with 0), so one batched solve does every problem.
    A system LU flags as singular (a duplicated atom, say) falls back to the
    minimum-norm least-squares solution of the same masked system.
    """
    k = gram.shape[-1]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    both = passive.unsqueeze(2) & passive.unsqueeze(1)
    system = torch.where(both, gram, eye)
    rhs = torch.where(passive, h, torch.zeros((), dtype=h.dtype, device=h.device))
    z, info = torch.linalg.solve_ex(system, rhs)
    bad = (info != 0) | ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        z = z.clone()
        z[bad] = (torch.linalg.pinv(system[bad], hermitian=True) @ rhs[bad].unsqueeze(-1)).squeeze(-1)
    return torch.where(passive, z, torch.zeros((), dtype=z.dtype, device=z.device))


def solve_gram(gram: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Unconstrained least squares from the normal equations.

    Args:
        gram: (B, K, K) symmetric positive (semi-)definite, A^T A per problem.
        h: (B, K), A^T b per problem.

    Returns:
        (B, K) float64: argmin_c ||A c - b||^2 (minimum-norm solution if singular).
    """
    return _SOLVE_FORMS[choose_backend("solve_gram", (gram, h))].fn(gram, h)


def _solve_gram_torch(gram, h):
    b, k = _check_gram(gram, h)
    gram = gram.to(torch.float64)
    h = h.to(torch.float64)
    if b == 0 or k == 0:
        return torch.zeros((b, k), dtype=torch.float64, device=h.device)
    full = torch.ones((b, k), dtype=torch.bool, device=h.device)
    return _solve_masked(gram, h, full)


def nnls_coordinate_descent(gram: torch.Tensor, h: torch.Tensor, x0: torch.Tensor | None = None, *,
                            max_sweeps: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Projected coordinate descent for NNLS, per problem (vectorised over B).

    One sweep updates x_j <- max(0, x_j - (gram_j . x - h_j) / gram_jj) for j = 0..K-1 in
    order; a problem stops once ||x - x_old|| < tol * ||x_old|| (per problem, unlike the
    reference, which tests the whole batch at once).

    Args:
        gram: (B, K, K); h: (B, K); x0: (B, K) start (default: zeros).

    Returns:
        (B, K) float64, x >= 0.
    """
    form = choose_backend("nnls_coordinate_descent", (gram, h))
    return _CD_FORMS[form].fn(gram, h, x0, max_sweeps, tol)


def _nnls_cd_torch(gram, h, x0, max_sweeps, tol):
    b, k = _check_gram(gram, h)
    gram = gram.to(torch.float64)
    h = h.to(torch.float64)
    x = torch.zeros_like(h) if x0 is None else x0.to(torch.float64).clamp_min(0).clone()
    if b == 0 or k == 0:
        return x
    diag = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(1e-300)
    running = torch.ones(b, dtype=torch.bool, device=h.device)
    for _ in range(max_sweeps):
        x_old = x.clone()
        for j in range(k):
            grad = (gram[:, j, :] * x).sum(dim=1) - h[:, j]
            x[:, j] = torch.where(running, (x[:, j] - grad / diag[:, j]).clamp_min(0), x[:, j])
        change = torch.linalg.vector_norm(x - x_old, dim=1)
        running &= ~(change <= tol * torch.linalg.vector_norm(x_old, dim=1).clamp_min(1e-300))
        if not bool(running.any()):
            break
    return x


def nnls_gram(gram: torch.Tensor, h: torch.Tensor, *, x0: torch.Tensor | None = None,
              passive0: torch.Tensor | None = None, max_iter: int | None = None,
              kkt_tol: float = 1e-10) -> torch.Tensor:
    """Exact non-negative least squares, batched Lawson-Hanson active set.

    Solves min_{c >= 0} ||A c - b||^2 given gram = A^T A and h = A^T b for every problem.
    At the optimum the KKT conditions hold: c >= 0, w = h - gram c <= 0 where c = 0,
    w = 0 where c > 0; this is the optimum the reference's coordinate descent converges to.

    Args:
        gram: (B, K, K) symmetric positive (semi-)definite.
        h: (B, K).
        x0, passive0: optional warm start, (B, K) float and (B, K) bool: a feasible point
            (x0 >= 0) and the variables to solve for first, e.g. the previous optimum's
            positive set plus a newly added variable (x0 = 0 there). Matching pursuits
            refit after each added atom; warm-started, a refit usually takes one solve.
        max_iter: active-set steps before the coordinate-descent fallback (default 3K + 10).
        kkt_tol: a variable outside the active set enters only if its gradient component
            exceeds kkt_tol * (1 + max|h|) (relative tolerance against round-off cycling).

    Returns:
        (B, K) float64, c >= 0.
    """
    form = choose_backend("nnls_gram", (gram, h))
    return _NNLS_FORMS[form].fn(gram, h, x0, passive0, max_iter, kkt_tol)


def _nnls_gram_torch(gram, h, x0, passive0, max_iter, kkt_tol):
    b, k = _check_gram(gram, h)
    gram = gram.to(torch.float64)
    h = h.to(torch.float64)
    dev = h.device
    x = torch.zeros((b, k), dtype=torch.float64, device=dev)
    if b == 0 or k == 0:
        return x
    if max_iter is None:
        max_iter = 3 * k + 10
    tol = kkt_tol * (1.0 + h.abs().amax(dim=1))  # (B,)
    passive = torch.zeros((b, k), dtype=torch.bool, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    need_add = torch.ones(b, dtype=torch.bool, device=dev)  # at a feasible point of the outer loop
    if (x0 is None) != (passive0 is None):
        raise ValueError("give both x0 and passive0 for a warm start, or neither")
    if x0 is not None:
        if x0.shape != (b, k) or passive0.shape != (b, k):
            raise ValueError(f"x0 and passive0 must have shape {(b, k)}")
        x = x0.to(device=dev, dtype=torch.float64).clamp_min(0)
        passive = passive0.to(device=dev, dtype=torch.bool).clone()
        x = torch.where(passive, x, torch.zeros_like(x))
        need_add = ~passive.any(dim=1)  # start with an inner solve where a passive set is given
    rows = torch.arange(b, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    for _ in range(max_iter):
        # outer step: at a feasible x, let the most violating variable enter (or finish).
        w = h - (gram @ x.unsqueeze(-1)).squeeze(-1)
        w_free = torch.where(passive, neg_inf, w)
        w_max, j = w_free.max(dim=1)
        adding = need_add & ~done
        done |= adding & ~(w_max > tol)
        adding &= w_max > tol
        passive[rows[adding], j[adding]] = True
        if bool(done.all()):
            break
        # inner step: solve on the passive set; step back to feasibility if needed.
        z = _solve_masked(gram, h, passive)
        bad = passive & (z <= 0)
        feasible = ~bad.any(dim=1)
        active = ~done
        take = active & feasible
        x = torch.where(take.unsqueeze(1), z, x)
        need_add = take | (need_add & done)
        back = active & ~feasible
        if bool(back.any()):
            ratio = torch.where(bad, x / (x - z).clamp_min(1e-300), torch.full_like(x, float("inf")))
            alpha = ratio.min(dim=1).values.clamp(0.0, 1.0)
            x_new = x + alpha.unsqueeze(1) * (z - x)
            # the variable(s) that hit zero leave the passive set
            leave = passive & ((x_new <= 0) | (bad & (ratio <= alpha.unsqueeze(1))))
            x_new = torch.where(leave, torch.zeros_like(x_new), x_new).clamp_min(0)
            x = torch.where(back.unsqueeze(1), x_new, x)
            passive = torch.where(back.unsqueeze(1), passive & ~leave, passive)
    if not bool(done.all()):
        # Rare (near-singular or round-off cycling): finish with coordinate descent from
        # the best point found, run to a tight tolerance.
        rest = ~done
        x[rest] = nnls_coordinate_descent(gram[rest], h[rest], x[rest], max_sweeps=10000, tol=1e-12)
    return x


FORMS = {
    "solve_gram": register("solve_gram", torch_form(_solve_gram_torch)),
    "nnls_gram": register("nnls_gram", torch_form(_nnls_gram_torch)),
    "nnls_coordinate_descent": register("nnls_coordinate_descent", torch_form(_nnls_cd_torch)),
}
_SOLVE_FORMS, _NNLS_FORMS, _CD_FORMS = FORMS["solve_gram"], FORMS["nnls_gram"], FORMS["nnls_coordinate_descent"]


def lstsq(A: torch.Tensor, b: torch.Tensor, *, positive: bool = False) -> torch.Tensor:
    """Batched min_c ||A c - b||^2 (optionally c >= 0), the `sith.linalg.lstsq` contract.

    Args:
        A: (B, D, K) or (D, K). b: (B, D) or (D,).
        positive: non-negative least squares (exact) when True.

    Returns:
        (B, K) or (K,) in A's dtype.
    """
    if not isinstance(A, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("A and b must be torch tensors")
    squeeze = A.ndim == 2
    if squeeze:
        A, b = A.unsqueeze(0), b.unsqueeze(0)
    if A.ndim != 3 or b.ndim != 2 or b.shape != A.shape[:2]:
        raise ValueError(f"A must be (B, D, K) and b (B, D); got {tuple(A.shape)} and {tuple(b.shape)}")
    a64 = A.to(torch.float64)
    gram = a64.transpose(1, 2) @ a64
    h = (a64.transpose(1, 2) @ b.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    c = nnls_gram(gram, h) if positive else solve_gram(gram, h)
    c = c.to(A.dtype)
    return c.squeeze(0) if squeeze else c
