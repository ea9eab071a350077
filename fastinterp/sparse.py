"""Sparse coding over concept dictionaries: a fast drop-in for SITH's `sith.sdl`.

Shapes: x (B, D) signals (or (D,): then the outputs lose the batch dimension);
dictionary G (M, D) with unit-norm rows (pass `normalize=True` to normalise them);
dense codes (B, M); sparse codes (scores (B, K), indices (B, K)).

Dense forms (same inputs and outputs as `sith.sdl`, SPEC.md 1.5):
    orthogonal_matching_pursuit, coherent_orthogonal_matching_pursuit, matching_pursuit,
    topk_nnls
Sparse forms (never a (B, M) matrix: any dictionary that fits in memory works):
    comp_topk, sparse_code (SITH method names "comp-0.3", "omp", "nnomp", "mp", "topk")
and `decode(scores, indices, dictionary)`, the reconstruction sum_k score_k G[idx_k].

OMP / COMP, exactly as the reference: S = {}, r = x; for k = 0..K-1: score =
(r + coh * mean_{i in S} G[i]) @ G^T (one fused, streamed matmul; coh = 0 is OMP);
selected atoms are excluded; j = argmax score (signed by default; `selection="abs"` ranks
by |score|, the textbook OMP rule of scikit-learn); S += {j}; the coefficients are refit
on the ORIGINAL x over all of S (exact NNLS when positive=True, least squares otherwise);
r = x - c @ G_S. Exactly K atoms, no early stop. Atoms whose NNLS coefficient is 0 stay
selected (and count in the coherence mean), as in the reference.

Ties in the selection go to the lowest atom index (like `torch.argmax`). The small solves
run in float64. The selection step runs as a Triton kernel on CUDA tensors and as blocked
torch matmuls on the CPU (`kernels/pursuit.py`); on CPUs with native bf16 (AVX512-BF16,
AMX) and M >= 2048 it first scores in bf16 and rescores the few atoms a rigorous error
bound cannot rule out, exactly (same selections; this is the selection's
"torch-bf16-screen" form, see `kernels/dispatch.py`; FASTINTERP_PURSUIT_SCREEN=0 turns it
off). The NNLS is `kernels/nnls.py`.
"""
from __future__ import annotations

import re
import weakref

import torch

from .kernels.nnls import nnls_gram, solve_gram
from .kernels.pursuit import select_atoms, topk_atoms

__all__ = [
    "METHODS",
    "coherent_orthogonal_matching_pursuit",
    "comp_topk",
    "decode",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
    "parse_method",
    "sparse_code",
    "topk_nnls",
]

METHODS = ("comp-<coh>", "omp", "nnomp", "mp", "topk")
"""Method names `sparse_code` accepts (SITH's `--method`, plus "nnomp")."""

_SELECTIONS = ("signed", "abs")
_UNIT_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
_validated: dict[tuple, tuple] = {}  # dictionaries already checked: (tag, id) -> (weakref, key)


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------
def _dictionary_key(g: torch.Tensor) -> tuple:
    return (g.data_ptr(), tuple(g.shape), tuple(g.stride()), g.dtype, str(g.device), g._version)


def _already_checked(tag: str, g: torch.Tensor) -> bool:
    """True if this very tensor object, unmodified since (same version counter, storage,
    shape), passed the checks before. A weak reference guards against a new tensor
    reusing a freed one's address."""
    entry = _validated.get((tag, id(g)))
    return entry is not None and entry[0]() is g and entry[1] == _dictionary_key(g)


def _mark_checked(tag: str, g: torch.Tensor) -> None:
    if len(_validated) > 64:
        _validated.clear()
    _validated[(tag, id(g))] = (weakref.ref(g), _dictionary_key(g))


def _row_norms(g: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """(M,) fp32/fp64 row norms, chunk by chunk (no full-size temporary)."""
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = torch.empty(g.shape[0], dtype=acc_dtype, device=g.device)
    for s in range(0, g.shape[0], chunk):
        out[s:s + chunk] = torch.linalg.vector_norm(g[s:s + chunk].to(acc_dtype), dim=1)
    return out


def _check_dictionary(dictionary: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not isinstance(dictionary, torch.Tensor):
        raise TypeError(f"dictionary must be a torch.Tensor (M, D), got {type(dictionary).__name__}")
    if dictionary.ndim != 2:
        raise ValueError(f"dictionary must be 2-D (M atoms, D dims), got shape {tuple(dictionary.shape)}")
    if dictionary.shape[0] == 0 or dictionary.shape[1] == 0:
        raise ValueError(f"dictionary is empty (shape {tuple(dictionary.shape)}); it needs at least one atom "
                         f"of positive dimension")
    if dictionary.dtype not in _UNIT_TOL:
        raise TypeError(f"dictionary must be float64/float32/float16/bfloat16, got {dictionary.dtype}")
    if not normalize and _already_checked("dict", dictionary):
        return dictionary
    norms = _row_norms(dictionary)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"dictionary has NaN or Inf entries (first in atom {i}); clean the dictionary")
    if normalize:
        if bool((norms == 0).any()):
            i = int((norms == 0).nonzero()[0])
            raise ValueError(f"dictionary atom {i} is all zeros and cannot be normalised; drop it")
        return (dictionary.to(norms.dtype) / norms.unsqueeze(1)).to(dictionary.dtype)
    err = (norms - 1).abs()
    tol = _UNIT_TOL[dictionary.dtype]
    if bool((err > tol).any()):
        i = int(err.argmax())
        raise ValueError(f"dictionary rows must have unit L2 norm (atom {i} has norm {float(norms[i]):.6g}); "
                         f"normalise them (F.normalize(dictionary, dim=-1)) or pass normalize=True")
    _mark_checked("dict", dictionary)
    return dictionary


def _check_inputs(x, dictionary, k, *, normalize, k_name="max_sparsity"):
    """Validate and canonicalise: returns (x2d, dictionary, squeeze)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (B, D) or (D,), got {type(x).__name__}")
    # the pursuit is not differentiable (greedy argmax, in-place solves): codes carry no gradient
    x = x.detach()
    if isinstance(dictionary, torch.Tensor) and dictionary.requires_grad:
        dictionary = dictionary.detach()
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be (B, D) or (D,), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}; cast it (x.float())")
    dictionary = _check_dictionary(dictionary, normalize)
    squeeze = x.ndim == 1
    if squeeze:
        x = x.unsqueeze(0)
    if x.shape[1] != dictionary.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but dictionary atoms have dimension "
                         f"{dictionary.shape[1]}; both must live in the same space")
    if x.device != dictionary.device:
        raise ValueError(f"x is on {x.device} but dictionary is on {dictionary.device}; move both to one device")
    if dictionary.dtype != x.dtype:
        half_storage = x.dtype == torch.float32 and dictionary.dtype in (torch.float16, torch.bfloat16)
        if not half_storage:
            raise TypeError(f"x is {x.dtype} but dictionary is {dictionary.dtype}; use one dtype (fp16/bf16 "
                            f"dictionaries are accepted with float32 x)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; clean the signals first")
    _check_magnitude(x, 0.0)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{k_name} must be an int, got {k!r}")
        if k < 1:
            raise ValueError(f"{k_name} must be >= 1, got {k}")
        if k > dictionary.shape[0]:
            raise ValueError(f"{k_name}={k} exceeds the number of dictionary atoms ({dictionary.shape[0]}); "
                             f"use a smaller sparsity or a larger dictionary")
    return x, dictionary, squeeze


def _check_selection(selection):
    if selection not in _SELECTIONS:
        raise ValueError(f"selection={selection!r}: choose 'signed' (SITH's rule) or 'abs' (textbook OMP)")


def _check_magnitude(x: torch.Tensor, coh: float) -> None:
    """The scores (r + coh * mean) @ G.T are bounded by (|x| + |coh|) * sqrt(D) for unit atoms:
    refuse inputs whose scores could overflow x's dtype (the dtype the selection runs in)."""
    if x.shape[0] == 0:
        return
    limit = torch.finfo(x.dtype).max
    if not abs(coh) < limit:
        raise ValueError(f"coh={coh!r} does not fit in {x.dtype} (max {limit:.3g}); use a smaller coh or "
                         f"float64 signals")
    bound = (float(torch.linalg.vector_norm(x.to(torch.float64), dim=1).max()) + abs(coh)) * x.shape[1] ** 0.5
    if not bound < limit:
        raise ValueError(f"the selection scores could overflow {x.dtype}: |x| + |coh| = {bound:.3g} x sqrt(D) "
                         f"exceeds its max {limit:.3g}; scale x and coh down (the atoms picked do not change "
                         f"when both are scaled) or use float64")


def _check_coh(coh, coh_dictionary, dictionary, x):
    if not isinstance(coh, (int, float)) or isinstance(coh, bool) or coh != coh or abs(coh) == float("inf"):
        raise ValueError(f"coh must be a finite number, got {coh!r}")
    _check_magnitude(x, float(coh))
    if isinstance(coh_dictionary, torch.Tensor) and coh_dictionary.requires_grad:
        coh_dictionary = coh_dictionary.detach()
    if coh_dictionary is None or coh_dictionary is dictionary:
        return None
    if not isinstance(coh_dictionary, torch.Tensor) or coh_dictionary.ndim != 2:
        raise ValueError("coh_dictionary must be a 2-D tensor (M, D_coh)")
    if coh_dictionary.shape[0] != dictionary.shape[0]:
        raise ValueError(f"coh_dictionary has {coh_dictionary.shape[0]} atoms but dictionary has "
                         f"{dictionary.shape[0]}; they must describe the same atoms")
    if coh_dictionary.shape[1] == 0:
        raise ValueError("coh_dictionary has zero-dimensional atoms")
    if coh_dictionary.device != x.device:
        raise ValueError(f"coh_dictionary is on {coh_dictionary.device} but x is on {x.device}")
    if not coh_dictionary.is_floating_point():
        raise TypeError(f"coh_dictionary must be floating point, got {coh_dictionary.dtype}")
    if not _already_checked("coh", coh_dictionary):
        if not bool(torch.isfinite(_row_norms(coh_dictionary)).all()):
            raise ValueError("coh_dictionary has NaN or Inf entries")
        _mark_checked("coh", coh_dictionary)
    return coh_dictionary


# --------------------------------------------------------------------------------------
# the pursuit core (sparse state: (B, K) ids + float64 coefficients)
# --------------------------------------------------------------------------------------
def _pursuit(x, dictionary, k, *, coh, coh_dictionary, positive, selection, chunk_size, backend):
    """(ids (B, K) in selection order, coefs (B, K) float64)."""
    B, D = x.shape
    dev = x.device
    ids = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    coefs = torch.zeros((B, k), dtype=torch.float64, device=dev)
    if B == 0:
        return ids, coefs
    x64 = x.to(torch.float64)
    atoms = torch.empty((B, k, D), dtype=torch.float64, device=dev)
    gram = torch.zeros((B, k, k), dtype=torch.float64, device=dev)
    h = torch.zeros((B, k), dtype=torch.float64, device=dev)
    use_coh = coh != 0
    separate = coh_dictionary is not None
    if use_coh:
        coh_src = coh_dictionary if separate else dictionary
        coh_sum = torch.zeros((B, coh_src.shape[1]), dtype=x.dtype, device=dev)
    screen_cache: dict = {}  # bf16 screening state shared by the steps (kernels/pursuit.py)
    r = x
    for step in range(k):
        q, q2, g2 = r, None, None
        if use_coh and step > 0:
            mean = coh_sum / step
            if separate:
                q2, g2 = coh * mean, coh_dictionary
            else:
                q = r + coh * mean
        j, _, _ = select_atoms(q, dictionary, ids[:, :step], q2=q2, dictionary2=g2,
                               use_abs=selection == "abs", chunk_size=chunk_size, backend=backend,
                               screen_cache=screen_cache)
        ids[:, step] = j
        a = dictionary[j].to(torch.float64)  # (B, D)
        atoms[:, step] = a
        col = torch.einsum("bsd,bd->bs", atoms[:, :step + 1], a)
        gram[:, step, :step + 1] = col
        gram[:, :step + 1, step] = col
        h[:, step] = (a * x64).sum(dim=1)
        n = step + 1
        if positive:  # warm start: the previous optimum's support plus the new atom
            passive0 = torch.cat([coefs[:, :step] > 0, torch.ones((B, 1), dtype=torch.bool, device=dev)], dim=1)
            c = nnls_gram(gram[:, :n, :n], h[:, :n], x0=coefs[:, :n], passive0=passive0)
        else:
            c = solve_gram(gram[:, :n, :n], h[:, :n])
        coefs[:, :n] = c
        r = (x64 - torch.einsum("bs,bsd->bd", c, atoms[:, :n])).to(x.dtype)
        if use_coh:
            coh_sum += coh_src[j].to(x.dtype)
    return ids, coefs


def _dense(ids, coefs, m, dtype):
    codes = torch.zeros((ids.shape[0], m), dtype=dtype, device=ids.device)
    valid = ids >= 0
    if bool(valid.all()):
        codes.scatter_(1, ids, coefs.to(dtype))
    else:
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        codes[rows[valid], ids[valid]] = coefs[valid].to(dtype)
    return codes


def _sort_by_coefficient(ids, coefs):
    order = torch.sort(coefs, dim=1, descending=True, stable=True).indices
    return coefs.gather(1, order), ids.gather(1, order)


# --------------------------------------------------------------------------------------
# dense forms: drop-in for sith.sdl
# --------------------------------------------------------------------------------------
def coherent_orthogonal_matching_pursuit(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int,
                                         coh: float = 0.1, coh_dictionary: torch.Tensor | None = None,
                                         positive: bool = True, selection: str = "signed",
                                         backend: str | None = None, chunk_size: int | None = None,
                                         normalize: bool = False) -> torch.Tensor:
    """Coherent OMP (SITH's COMP), dense codes.

    Args:
        x: (B, D) or (D,) float32/float64 signals.
        dictionary: (M, D) unit-norm atoms (fp16/bf16 storage accepted with fp32 x).
        max_sparsity: K, the exact number of atoms selected per signal (1 <= K <= M).
        coh: weight of the coherence term coh * mean_{i in S}(C[i]) @ C^T added to the
            scores from the second step on.
        coh_dictionary: (M, D_coh) C, the atoms' representation for the coherence term
            (default: the dictionary itself, then the score is one fused matmul).
        positive: non-negative coefficients (exact NNLS) when True.
        selection: "signed" (argmax of the score, SITH) or "abs" (argmax of |score|).
        backend: "torch" | "triton" | "torch-bf16-screen" | None (automatic) for the
            selection step (`fastinterp.kernels.dispatch`).
        chunk_size: atoms per streamed chunk on the torch path.
        normalize: L2-normalise the dictionary rows first instead of requiring unit rows.

    Returns:
        (B, M) codes (or (M,) for 1-D x), x's dtype, K selected entries per row (some may
        be 0 under NNLS).
    """
    x2, g, squeeze = _check_inputs(x, dictionary, max_sparsity, normalize=normalize)
    _check_selection(selection)
    cd = _check_coh(coh, coh_dictionary, dictionary, x2)
    ids, coefs = _pursuit(x2, g, max_sparsity, coh=float(coh), coh_dictionary=cd, positive=positive,
                          selection=selection, chunk_size=chunk_size, backend=backend)
    codes = _dense(ids, coefs, g.shape[0], x2.dtype)
    return codes.squeeze(0) if squeeze else codes


def orthogonal_matching_pursuit(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int,
                                positive: bool = False, selection: str = "signed",
                                backend: str | None = None, chunk_size: int | None = None,
                                normalize: bool = False) -> torch.Tensor:
    """OMP (NNOMP when positive=True), dense codes: COMP with coh = 0.

    Args and returns as `coherent_orthogonal_matching_pursuit`: x (B, D) or (D,),
    dictionary (M, D) unit rows -> codes (B, M). Note SITH's rule is the *signed* argmax;
    selection="abs" gives textbook OMP (scikit-learn's `orthogonal_mp`).
    """
    return coherent_orthogonal_matching_pursuit(x, dictionary, max_sparsity=max_sparsity, coh=0.0,
                                                positive=positive, selection=selection, backend=backend,
                                                chunk_size=chunk_size, normalize=normalize)


def _mp_sparse(x, g, max_sparsity, tol, positive, chunk_size, backend):
    """Classic MP with the reference's bookkeeping; (ids (B, T), coefs (B, T)), -1 pads."""
    B = x.shape[0]
    M = g.shape[0]
    steps = M if max_sparsity is None else max_sparsity
    cap = min(steps, M)
    dev = x.device
    ids = torch.full((B, cap), -1, dtype=torch.int64, device=dev)
    coefs = torch.zeros((B, cap), dtype=x.dtype, device=dev)
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    r = x.clone()
    if B == 0:
        return ids, coefs
    for _ in range(steps):
        # atoms with a nonzero code score 0 (the reference masks with 0, not -inf)
        masked = torch.where((coefs != 0) & (ids >= 0), ids, torch.full_like(ids, -1))
        j, _, raw = select_atoms(r, g, masked, mask_value=0.0, use_abs=not positive,
                                 chunk_size=chunk_size, backend=backend)
        value = raw.clamp_min(0) if positive else raw
        if tol is not None:
            value = value.masked_fill(stopped, 0.0)
        # the code of atom j is SET to value: overwrite its slot if it has one, else append
        present = ids == j.unsqueeze(1)
        has = present.any(dim=1)
        slot = torch.where(has, present.to(torch.int8).argmax(dim=1), count)
        write = has | (count < cap)
        ids[rows[write], slot[write]] = j[write]
        coefs[rows[write], slot[write]] = value[write]
        count = count + (~has & write).to(torch.int64)
        r = r - value.unsqueeze(1) * g[j].to(x.dtype)
        if tol is not None:
            stopped |= torch.linalg.vector_norm(r, dim=1) < tol
            if bool(stopped.all()):
                break
    return ids, coefs


def matching_pursuit(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int | None = None,
                     tol: float | None = 1e-6, positive: bool = False, backend: str | None = None,
                     chunk_size: int | None = None, normalize: bool = False) -> torch.Tensor:
    """Classic matching pursuit (SITH's `matching_pursuit`), dense codes.

    Each step ranks atoms by |r . G[m]| (by r . G[m], with the chosen value clamped at 0,
    when positive); atoms whose code is nonzero score 0; the chosen atom's code is set to
    its score and r -= score * G[j]. A signal stops changing once ||r|| < tol.

    Args:
        x: (B, D) or (D,); dictionary: (M, D) unit rows.
        max_sparsity: number of steps (None: up to M steps, then `tol` must be given).
        tol: residual-norm stopping threshold per signal (None: run all steps).

    Returns:
        (B, M) codes (or (M,)), x's dtype.
    """
    if max_sparsity is None and tol is None:
        raise ValueError("matching_pursuit needs max_sparsity or tol (both are None)")
    if tol is not None and (not isinstance(tol, (int, float)) or tol != tol or tol < 0):
        raise ValueError(f"tol must be a non-negative number or None, got {tol!r}")
    x2, g, squeeze = _check_inputs(x, dictionary, max_sparsity, normalize=normalize)
    ids, coefs = _mp_sparse(x2, g, max_sparsity, tol, positive, chunk_size, backend)
    codes = _dense(ids, coefs, g.shape[0], x2.dtype)
    return codes.squeeze(0) if squeeze else codes


def _topk_sparse(x, g, k, positive, chunk_size):
    """(ids (B, K) by similarity, descending; coefs (B, K) float64)."""
    _, ids = topk_atoms(x, g, k, chunk_size=chunk_size)
    a = g[ids].to(torch.float64)  # (B, K, D)
    gram = a @ a.transpose(1, 2)
    h = (a @ x.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    coefs = nnls_gram(gram, h) if positive else solve_gram(gram, h)
    return ids, coefs


def topk_nnls(x: torch.Tensor, dictionary: torch.Tensor, *, max_sparsity: int, positive: bool = True,
              chunk_size: int | None = None, normalize: bool = False) -> torch.Tensor:
    """The K atoms of highest x . G[m], then NNLS (LS if not positive) of x on them.

    Args:
        x: (B, D) or (D,); dictionary: (M, D) unit rows; max_sparsity: K <= M.

    Returns:
        (B, M) dense codes (or (M,)), x's dtype.
    """
    x2, g, squeeze = _check_inputs(x, dictionary, max_sparsity, normalize=normalize)
    ids, coefs = _topk_sparse(x2, g, max_sparsity, positive, chunk_size)
    codes = _dense(ids, coefs, g.shape[0], x2.dtype)
    return codes.squeeze(0) if squeeze else codes


# --------------------------------------------------------------------------------------
# sparse forms
# --------------------------------------------------------------------------------------
def comp_topk(x: torch.Tensor, dictionary: torch.Tensor, *, k: int, coh: float = 0.0, positive: bool = True,
              selection: str = "signed", coh_dictionary: torch.Tensor | None = None,
              chunk_size: int | None = None, backend: str | None = None,
              normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """COMP (coh > 0) / OMP (coh = 0) returning only the K selected atoms.

    Never materialises a (B, M) matrix: peak memory is the dictionary plus O(B * chunk)
    (chunk_size atoms scored at a time) plus O(B * K * D).

    Args:
        x: (B, D) or (D,) float32/float64 signals.
        dictionary: (M, D) unit-norm atoms (fp16/bf16 storage accepted with fp32 x).
        k: number of atoms per signal, exactly (1 <= k <= M).
        coh, coh_dictionary, positive, selection, backend, chunk_size, normalize: as in
            `coherent_orthogonal_matching_pursuit`.

    Returns:
        (scores (B, K) in x's dtype, indices (B, K) int64) (or (K,), (K,) for 1-D x): the
        selected atoms and their coefficients, sorted by coefficient, descending (stable:
        equal coefficients keep selection order). This equals `torch.topk(dense_codes, K)`
        of the dense form whenever all K coefficients are > 0. Where a coefficient is 0
        (NNLS), the score is 0 and the index is the selected atom's, whereas `topk` on the
        dense codes may return any zero entry's index there; with positive=False, negative
        coefficients are returned here (in last positions), whereas `topk` on dense codes
        would prefer unselected zero entries to them.
    """
    x2, g, squeeze = _check_inputs(x, dictionary, k, normalize=normalize, k_name="k")
    _check_selection(selection)
    cd = _check_coh(coh, coh_dictionary, dictionary, x2)
    ids, coefs = _pursuit(x2, g, k, coh=float(coh), coh_dictionary=cd, positive=positive,
                          selection=selection, chunk_size=chunk_size, backend=backend)
    scores, indices = _sort_by_coefficient(ids, coefs)
    scores = scores.to(x2.dtype)
    if squeeze:
        return scores.squeeze(0), indices.squeeze(0)
    return scores, indices


def parse_method(method: str) -> tuple[str, float]:
    """SITH method name -> (algorithm, coh): "comp-0.3" -> ("comp", 0.3); "omp"/"nnomp" ->
    ("omp", 0.0); "mp" -> ("mp", 0.0); "topk" -> ("topk", 0.0)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'comp-0.3', got {method!r}")
    name = method.strip().lower()
    m = re.fullmatch(r"comp-([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)", name)
    if m:
        return "comp", float(m.group(1))
    if name in ("omp", "nnomp"):
        return "omp", 0.0
    if name in ("mp", "topk"):
        return name, 0.0
    raise ValueError(f"unknown sparse-coding method {method!r}; choose one of {', '.join(METHODS)} "
                     f"(e.g. 'comp-0.3')")


def sparse_code(x: torch.Tensor, dictionary: torch.Tensor, *, method: str, sparsity: int,
                positive: bool | None = None, chunk_size: int | None = None, backend: str | None = None,
                normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SITH's `decompose_batch`: run a named method, return (scores, indices) (B, K).

    Methods (as SITH's scripts/decompose.py; all non-negative by default):
        "comp-<coh>": COMP with coh, positive=True   -> sorted as `comp_topk`
        "omp" (alias "nnomp"): OMP, positive=True    -> sorted as `comp_topk`
        "mp": matching pursuit, positive=True, tol 1e-6, K steps -> `torch.topk` of its
              dense codes (zero-score slots: whichever zero entries `topk` returns)
        "topk": K atoms of highest x . G[m] (by similarity, descending; scores aligned with
              them, NOT re-sorted, as SITH's script), then NNLS; any batch size.

    Args:
        x: (B, D) or (D,); dictionary: (M, D) unit rows; sparsity: K (<= M).
        positive: override the method's non-negativity (None: the method's default, True).

    Returns:
        (scores (B, K) x's dtype, indices (B, K) int64), or (K,), (K,) for 1-D x.
    """
    algo, coh = parse_method(method)
    pos = True if positive is None else bool(positive)
    if algo in ("comp", "omp"):
        return comp_topk(x, dictionary, k=sparsity, coh=coh, positive=pos, chunk_size=chunk_size,
                         backend=backend, normalize=normalize)
    x2, g, squeeze = _check_inputs(x, dictionary, sparsity, normalize=normalize, k_name="sparsity")
    if algo == "mp":
        ids, coefs = _mp_sparse(x2, g, sparsity, 1e-6, pos, chunk_size, backend)
        scores, indices = _dense(ids, coefs, g.shape[0], x2.dtype).topk(sparsity, dim=1)
    else:
        indices, coefs = _topk_sparse(x2, g, sparsity, pos, chunk_size)
        scores = coefs.to(x2.dtype)
    if squeeze:
        return scores.squeeze(0), indices.squeeze(0)
    return scores, indices


def decode(scores: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """Reconstruction from sparse codes: out[b] = sum_k scores[b, k] * dictionary[indices[b, k]].

    Args:
        scores: (B, K) or (K,) float; indices: same shape, integer atom ids in [0, M).
        dictionary: (M, D).

    Returns:
        (B, D) (or (D,)) in the promoted dtype of scores and dictionary (fp16/bf16
        dictionaries are read in fp32).
    """
    if not isinstance(scores, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("scores and indices must be torch tensors")
    if not isinstance(dictionary, torch.Tensor) or dictionary.ndim != 2:
        raise ValueError("dictionary must be a 2-D tensor (M, D)")
    if scores.shape != indices.shape or scores.ndim not in (1, 2):
        raise ValueError(f"scores and indices must both be (B, K) or (K,); got {tuple(scores.shape)} and "
                         f"{tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if not (scores.device == indices.device == dictionary.device):
        raise ValueError("scores, indices and dictionary must be on one device")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dictionary.shape[0]):
        raise ValueError(f"indices must lie in [0, {dictionary.shape[0]}), got range "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf")
    squeeze = scores.ndim == 1
    if squeeze:
        scores, indices = scores.unsqueeze(0), indices.unsqueeze(0)
    g = dictionary
    dtype = torch.promote_types(scores.dtype, torch.float32 if g.dtype in (torch.float16, torch.bfloat16)
                                else g.dtype)
    atoms = g[indices.long()].to(dtype)  # (B, K, D)
    out = torch.einsum("bk,bkd->bd", scores.to(dtype), atoms)
    return out.squeeze(0) if squeeze else out
