"""Atom selection for (coherent) matching pursuits, streamed over the dictionary.

One step of OMP / COMP / MP picks, for every signal b, the atom

    j_b = argmax_m  f( q[b] . G[m]  (+ q2[b] . G2[m]) )   over atoms m not masked for b

where q = r + coh * mean(selected atoms) (the fused COMP score: one matmul, not two), f is
the identity (signed rule) or |.| (abs rule), and masked atoms score `mask_value` (-inf for
OMP/COMP; 0 for classic MP, as in the reference). The optional second pair (q2, G2) carries
a coherence term computed in a separate coherence dictionary.

The (B, M) score matrix is never materialised: the dictionary is streamed in chunks (CPU:
blocked BLAS matmuls into one reused (B, chunk) buffer; GPU: a Triton kernel that keeps
the running max per signal in registers), so a 1,000,000-atom dictionary costs only its
own storage. Ties go to the lowest atom index (like `torch.argmax`).

Forms (the table `FORMS["pursuit_select"]`, picked by `choose_backend`): "triton"
(`_select_triton`: CUDA, or the interpreter), "torch" (`_select_torch`: any device) and, on
CPUs with native bf16 dot products, the variant "torch-bf16-screen"
(`_select_torch_screened`, exact result, about 2-3x less time; the automatic CPU pick for
fp32 signals, no q2, mask -inf and M >= SCREEN_MIN_ATOMS; FASTINTERP_PURSUIT_SCREEN=0|1 or
`screen=` override): a bf16 matmul scores every atom, a rigorous per-signal error bound
keeps the few atoms that could still win, and those are rescored exactly. The dictionary may be stored in fp16/bf16 with fp32 accumulation:
the Triton kernel then rounds q to the storage dtype for tensor-core dots; the CPU path
upcasts each chunk to fp32 and keeps q in fp32.
"""
from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, Form, choose_backend, register, torch_form, triton_form, triton_interpreting

__all__ = ["AOT_SPECS", "DEFAULT_CHUNK_ELEMENTS", "FORMS", "SCREEN_FORM", "select_atoms", "selection_flops",
           "topk_atoms"]

DEFAULT_CHUNK_ELEMENTS = 1 << 23
"""CPU path: the reused score buffer holds about this many elements (B x chunk; 32 MiB fp32)."""


# --------------------------------------------------------------------------------------
# Triton form
# --------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _select_kernel(q_ptr, g_ptr, q2_ptr, g2_ptr, masked_ptr,
                       out_val_ptr, out_idx_ptr, out_raw_ptr,
                       B, M, D, D2, S, atoms_per_split,
                       stride_q, stride_g, stride_q2, stride_g2, stride_masked,
                       mask_value,
                       HAS_Q2: tl.constexpr, USE_ABS: tl.constexpr, HALF_DOT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        m_begin = pid_s * atoms_per_split
        m_end = tl.minimum(m_begin + atoms_per_split, M)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        best_val = tl.full([BLOCK_B], float("-inf"), tl.float32)
        best_raw = tl.zeros([BLOCK_B], dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_B], dtype=tl.int32)
        for m0 in range(m_begin, m_end, BLOCK_M):
            cols = m0 + offs_m
            col_ok = cols < m_end
            cols64 = cols.to(tl.int64)
            acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + offs_d
                d_ok = ds < D
                qt = tl.load(q_ptr + rows64[:, None] * stride_q + ds[None, :],
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                gt = tl.load(g_ptr + cols64[None, :] * stride_g + ds[:, None],
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                if HALF_DOT:
                    acc += tl.dot(qt.to(gt.dtype), gt, out_dtype=tl.float32)
                else:
                    acc += tl.dot(qt, gt.to(tl.float32), input_precision="ieee")
            if HAS_Q2:
                for d0 in range(0, D2, BLOCK_D):
                    ds = d0 + offs_d
                    d_ok = ds < D2
                    qt = tl.load(q2_ptr + rows64[:, None] * stride_q2 + ds[None, :],
                                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    gt = tl.load(g2_ptr + cols64[None, :] * stride_g2 + ds[:, None],
                                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                    if HALF_DOT:
                        acc += tl.dot(qt.to(gt.dtype), gt, out_dtype=tl.float32)
                    else:
                        acc += tl.dot(qt, gt.to(tl.float32), input_precision="ieee")
            if USE_ABS:
                val = tl.abs(acc)
            else:
                val = acc
            for s in range(0, S):
                sel = tl.load(masked_ptr + rows64 * stride_masked + s, mask=row_ok, other=-1)
                val = tl.where(cols[None, :] == sel[:, None], mask_value, val)
            val = tl.where(col_ok[None, :], val, float("-inf"))
            tile_max = tl.max(val, axis=1)
            tile_arg = tl.argmax(val, axis=1)
            # the winner's signed score: from acc, unless the winner is a masked atom
            tile_raw = tl.sum(tl.where(offs_m[None, :] == tile_arg[:, None], acc, 0.0), axis=1)
            win = m0 + tile_arg
            win_masked = tl.zeros([BLOCK_B], dtype=tl.int1)
            for s in range(0, S):
                sel = tl.load(masked_ptr + rows64 * stride_masked + s, mask=row_ok, other=-1)
                win_masked = win_masked | (win == sel)
            tile_raw = tl.where(win_masked, mask_value, tile_raw)
            better = tile_max > best_val
            best_val = tl.where(better, tile_max, best_val)
            best_idx = tl.where(better, win, best_idx)
            best_raw = tl.where(better, tile_raw, best_raw)
        out = rows64 * n_splits + pid_s
        tl.store(out_val_ptr + out, best_val, mask=row_ok)
        tl.store(out_idx_ptr + out, best_idx, mask=row_ok)
        tl.store(out_raw_ptr + out, best_raw, mask=row_ok)

    _GPU_BLOCKS = {"BLOCK_B": 32, "BLOCK_M": 64, "BLOCK_D": 32}
    _INTERP_BLOCKS = {"BLOCK_B": 16, "BLOCK_M": 32, "BLOCK_D": 16}
    _NUM_WARPS = 4
    _NUM_STAGES = 1

    def _aot_specs() -> list[dict]:
        specs = []
        for gname, gtype in (("fp32", "*fp32"), ("fp16", "*fp16"), ("bf16", "*bf16")):
            for use_abs in (False, True):
                for has_q2 in (False, True):
                    signature = {
                        "q_ptr": "*fp32", "g_ptr": gtype, "q2_ptr": "*fp32", "g2_ptr": gtype,
                        "masked_ptr": "*i64", "out_val_ptr": "*fp32", "out_idx_ptr": "*i32",
                        "out_raw_ptr": "*fp32", "B": "i32", "M": "i32", "D": "i32", "D2": "i32",
                        "S": "i32", "atoms_per_split": "i32", "stride_q": "i64", "stride_g": "i64",
                        "stride_q2": "i64", "stride_g2": "i64", "stride_masked": "i64",
                        "mask_value": "fp32", "HAS_Q2": "constexpr", "USE_ABS": "constexpr",
                        "HALF_DOT": "constexpr", "BLOCK_B": "constexpr", "BLOCK_M": "constexpr",
                        "BLOCK_D": "constexpr",
                    }
                    constexprs = {"HAS_Q2": has_q2, "USE_ABS": use_abs, "HALF_DOT": gname != "fp32",
                                  **_GPU_BLOCKS}
                    specs.append({
                        "name": f"pursuit_select_{gname}{'_abs' if use_abs else ''}{'_coh2' if has_q2 else ''}",
                        "fn": _select_kernel, "signature": signature, "constexprs": constexprs,
                        "num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES,
                    })
        return specs

    AOT_SPECS = _aot_specs()
else:  # pragma: no cover - triton ships for Linux only
    AOT_SPECS = []


def _select_triton(q, dictionary, masked, q2, dictionary2, mask_value, use_abs, chunk_size=None, cache=None):
    B, D = q.shape
    M = dictionary.shape[0]
    if q.dtype != torch.float32:
        raise TypeError(f"the Triton selection kernel takes fp32 signals, got {q.dtype}; use backend='torch'")
    if dictionary.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton selection kernel takes fp32/fp16/bf16 dictionaries, got {dictionary.dtype}")
    q = q.contiguous()
    dictionary = dictionary.contiguous()
    masked = masked.contiguous()
    has_q2 = q2 is not None
    if has_q2:
        q2 = q2.to(torch.float32).contiguous()
        dictionary2 = dictionary2.to(dictionary.dtype).contiguous()
    else:
        q2, dictionary2 = q, dictionary  # unused placeholders
    blocks = _INTERP_BLOCKS if (triton_interpreting() and not q.is_cuda) else _GPU_BLOCKS
    n_row_blocks = triton.cdiv(B, blocks["BLOCK_B"])
    if q.is_cuda:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        want = max(1, (4 * sms) // n_row_blocks)
    else:
        want = 2
    n_tiles = triton.cdiv(M, blocks["BLOCK_M"])
    n_splits = max(1, min(want, n_tiles))
    atoms_per_split = triton.cdiv(n_tiles, n_splits) * blocks["BLOCK_M"]
    n_splits = triton.cdiv(M, atoms_per_split)
    out_val = torch.empty((B, n_splits), dtype=torch.float32, device=q.device)
    out_raw = torch.empty((B, n_splits), dtype=torch.float32, device=q.device)
    out_idx = torch.empty((B, n_splits), dtype=torch.int32, device=q.device)
    _select_kernel[(n_row_blocks, n_splits)](
        q, dictionary, q2, dictionary2, masked, out_val, out_idx, out_raw,
        B, M, D, q2.shape[1], masked.shape[1], atoms_per_split,
        q.stride(0), dictionary.stride(0), q2.stride(0), dictionary2.stride(0), max(masked.stride(0), 1),
        float(mask_value),
        HAS_Q2=has_q2, USE_ABS=use_abs, HALF_DOT=dictionary.dtype != torch.float32,
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, **blocks,
    )
    # splits are in atom order, so the first maximal split holds the lowest tied index
    split = out_val.argmax(dim=1, keepdim=True)
    return (out_idx.gather(1, split).squeeze(1).long(), out_val.gather(1, split).squeeze(1).to(q.dtype),
            out_raw.gather(1, split).squeeze(1).to(q.dtype))


# --------------------------------------------------------------------------------------
# torch form
# --------------------------------------------------------------------------------------
def _select_torch(q, dictionary, masked, q2, dictionary2, mask_value, use_abs, chunk_size, cache=None):
    B = q.shape[0]
    M = dictionary.shape[0]
    dev = q.device
    if chunk_size is None:
        chunk_size = max(256, DEFAULT_CHUNK_ELEMENTS // max(B, 1))
    chunk_size = int(min(chunk_size, M))
    rows = torch.arange(B, device=dev)
    best_val = torch.full((B,), float("-inf"), dtype=q.dtype, device=dev)
    best_raw = torch.zeros((B,), dtype=q.dtype, device=dev)
    best_idx = torch.zeros((B,), dtype=torch.int64, device=dev)
    buf = torch.empty((B, chunk_size), dtype=q.dtype, device=dev)
    abs_buf = torch.empty((B, chunk_size), dtype=q.dtype, device=dev) if use_abs else None
    has_mask = masked.shape[1] > 0
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        n = stop - start
        g = dictionary[start:stop]
        if g.dtype != q.dtype:
            g = g.to(q.dtype)
        raw = buf if n == chunk_size else torch.empty((B, n), dtype=q.dtype, device=dev)
        torch.matmul(q, g.T, out=raw)
        if q2 is not None:
            g2 = dictionary2[start:stop]
            if g2.dtype != q2.dtype:
                g2 = g2.to(q2.dtype)
            raw.addmm_(q2, g2.T)
        if use_abs:
            val = abs_buf if n == chunk_size else torch.empty_like(raw)
            torch.abs(raw, out=val)
        else:
            val = raw
        if has_mask:
            local = masked - start
            inside = (local >= 0) & (local < n)
            if bool(inside.any()):
                r_ids = rows.unsqueeze(1).expand_as(local)[inside]
                c_ids = local[inside]
                val[r_ids, c_ids] = mask_value
                if use_abs:
                    raw[r_ids, c_ids] = mask_value
        # amax is a vectorised pass; the (slower) argmax runs only on rows this chunk
        # improves, which after the first chunks is a shrinking minority
        chunk_val = val.amax(dim=1)
        better = chunk_val > best_val
        if bool(better.any()):
            upd = better.nonzero().squeeze(1)
            arg = val.argmax(dim=1) if upd.numel() == B else val[upd].argmax(dim=1)
            best_val[upd] = chunk_val[upd]
            best_idx[upd] = arg + start
            best_raw[upd] = raw[upd, arg]
    return best_idx, best_val, best_raw


# --------------------------------------------------------------------------------------
# torch form with bf16 screening (CPU): exact result, most of the matmul in bf16
# --------------------------------------------------------------------------------------
_BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand)
SCREEN_ENV = "FASTINTERP_PURSUIT_SCREEN"
"""0 | 1: the screened form off / on where a call allows it (read by `dispatch.env_value`)."""
SCREEN_FORM = "torch-bf16-screen"
SCREEN_MIN_ATOMS = 2048
SCREEN_MAX_CANDIDATES = 64
SCREEN_CACHE_BYTES = 512 << 20
"""A bf16 copy of the dictionary is kept for the pursuit's steps when it is this small."""
_screen_ok: dict[str, bool] = {}


def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _screen_bounds(q, q_b, d, atom_err, atom_norm_b):
    """Per-signal constant A and relative factor w of the error bound
    |bf16 score - exact score| <= A + w |bf16 score|:

        q~.g~ - q.g = e_q.g~ + q.e_g     ->  ||e_q|| max||g~|| + ||q|| max||e_g||
        fp32 sum of D exact products     ->  gamma_D ||q~|| max||g~||   (gamma_D = D 2^-24 / (1 - D 2^-24))
        bf16 rounding of the result      ->  2u / (1 - 2u) |result|      (2u: covers truncation too)

    with e_q = q~ - q and e_g = g~ - g measured exactly; a 1.05 factor on top."""
    q64 = q.to(torch.float64)
    qb64 = q_b.to(torch.float64)
    e_q = torch.linalg.vector_norm(qb64 - q64, dim=1)
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    a = e_q * atom_norm_b + torch.linalg.vector_norm(q64, dim=1) * atom_err \
        + gamma * torch.linalg.vector_norm(qb64, dim=1) * atom_norm_b
    w = 2 * _BF16_U / (1 - 2 * _BF16_U)
    return (a * 1.05 + 1e-30).to(torch.float32), w * 1.05


def _bf16_screen_available(device: torch.device) -> bool:
    """Screening is used on CPUs with native bf16 dot products (AVX512-BF16 / AMX), after a
    one-time probe confirms this torch build's bf16 matmul obeys the error bound of
    `_screen_bounds` (fp32 accumulation); adversarial rows (all-positive, sums near the
    norm) included."""
    key = device.type
    if key not in _screen_ok:
        ok = device.type == "cpu" and _cpu_has_fast_bf16()
        if ok:
            g = torch.Generator().manual_seed(0)
            d = 768
            q = torch.randn(48, d, generator=g)
            q[:16] = q[:16].abs() + 1.0  # long same-sign sums expose low-precision accumulation
            a = torch.nn.functional.normalize(torch.randn(512, d, generator=g), dim=1)
            a[:128] = torch.nn.functional.normalize(a[:128].abs() + 1.0, dim=1)
            q_b, a_b = q.to(torch.bfloat16), a.to(torch.bfloat16)
            exact = q.double() @ a.double().T
            approx = (q_b @ a_b.T).double()
            a_err = float(torch.linalg.vector_norm(a_b.double() - a.double(), dim=1).max())
            a_nb = float(torch.linalg.vector_norm(a_b.double(), dim=1).max())
            const, w = _screen_bounds(q, q_b, d, a_err, a_nb)
            bound = const.double().unsqueeze(1) + w * approx.abs()
            ok = bool(((approx - exact).abs() <= bound).all())
        _screen_ok[key] = ok
    return _screen_ok[key]


def _prepare_screen(dictionary, chunk, cache):
    """Fill `cache` with the dictionary's bf16 rounding error max||g~ - g||, max||g~|| and,
    if small enough, the bf16 copy itself (one pass over the dictionary)."""
    if "err" in cache:
        return cache
    m, d = dictionary.shape
    keep = m * d * 2 <= SCREEN_CACHE_BYTES
    copy = torch.empty((m, d), dtype=torch.bfloat16, device=dictionary.device) if keep else None
    err = 0.0
    norm_b = 0.0
    for s in range(0, m, chunk):
        g = dictionary[s:s + chunk].float()
        g_b = g.to(torch.bfloat16)
        g_bf = g_b.float()
        # g~ - g is exact in fp32 (the dropped low significand bits); the fp32 norms get a
        # 1e-5 relative allowance for their own rounding
        err = max(err, float(torch.linalg.vector_norm(g_bf - g, dim=1).max()) * (1 + 1e-5))
        norm_b = max(norm_b, float(torch.linalg.vector_norm(g_bf, dim=1).max()) * (1 + 1e-5))
        if keep:
            copy[s:s + chunk] = g_b
    cache.update({"err": err, "norm_b": norm_b, "bf16": copy})
    return cache


def _select_torch_screened(q, dictionary, masked, q2, dictionary2, mask_value, use_abs, chunk_size, cache):
    """Exact argmax (fp32 q, no q2, mask -inf), screened in bf16.

    Pass 1 scores every atom with a bf16 matmul (fp32 accumulation) and keeps, per signal,
    the atoms whose score could still be the best under the rigorous error bound of
    `_screen_bounds` (the true best atom and all atoms tied with it always are). Pass 2
    rescores those candidates exactly (float64 dot products) and takes the best, ties to
    the lowest index. Signals with more than SCREEN_MAX_CANDIDATES candidates (near-zero
    or degenerate queries) are redone on the exact fp32 path.
    """
    B, D = q.shape
    M = dictionary.shape[0]
    dev = q.device
    if chunk_size is None:
        chunk_size = max(256, DEFAULT_CHUNK_ELEMENTS // max(B, 1))
    chunk_size = int(min(chunk_size, M))
    cache = _prepare_screen(dictionary, chunk_size, {} if cache is None else cache)
    q_b = q.to(torch.bfloat16)
    const, w = _screen_bounds(q, q_b, D, cache["err"], cache["norm_b"])
    rows = torch.arange(B, device=dev)
    lower = torch.full((B,), float("-inf"), dtype=torch.float32, device=dev)  # <= best exact score
    cand_r, cand_c, cand_v = [], [], []
    has_mask = masked.shape[1] > 0
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        n = stop - start
        g_b = cache["bf16"][start:stop] if cache["bf16"] is not None else dictionary[start:stop].to(torch.bfloat16)
        sc = q_b @ g_b.T  # bf16 (B, n); all comparisons below stay in bf16
        if use_abs:
            sc.abs_()
        if has_mask:
            local = masked - start
            inside = (local >= 0) & (local < n)
            if bool(inside.any()):
                sc[rows.unsqueeze(1).expand_as(local)[inside], local[inside]] = float("-inf")
        top = sc.amax(dim=1).float()
        lower = torch.maximum(lower, top - w * top.abs() - const)  # value - bound is monotone
        # keep v if v + w|v| + const >= lower, i.e. v >= (lower - const) / (1 +- w)
        t = lower - const
        thr = torch.where(t >= 0, t / (1 + w), t / (1 - w))
        # a bf16 threshold <= thr (pushed down by 2^-8 relative before rounding), so no
        # candidate is lost; the exact fp32 test is applied after the loop
        thr_b = (thr - thr.abs() * _BF16_U - 1e-30).to(torch.bfloat16)
        r, c = (sc >= thr_b.unsqueeze(1)).nonzero(as_tuple=True)
        cand_r.append(r)
        cand_c.append(c + start)
        cand_v.append(sc[r, c].float())
    r, c, v = torch.cat(cand_r), torch.cat(cand_c), torch.cat(cand_v)
    t = lower - const
    thr = torch.where(t >= 0, t / (1 + w), t / (1 - w))
    keep = v >= thr[r]
    r, c = r[keep], c[keep]
    fallback = torch.bincount(r, minlength=B) > SCREEN_MAX_CANDIDATES
    any_fallback = bool(fallback.any())
    if any_fallback:
        ok_pair = ~fallback[r]
        r, c = r[ok_pair], c[ok_pair]
    raw = (q[r].to(torch.float64) * dictionary[c].to(torch.float64)).sum(dim=1)
    val = raw.abs() if use_abs else raw
    best = torch.full((B,), float("-inf"), dtype=torch.float64, device=dev).scatter_reduce(0, r, val, reduce="amax")
    is_top = val == best[r]
    best_idx = torch.full((B,), M, dtype=torch.int64, device=dev).scatter_reduce(
        0, r[is_top], c[is_top], reduce="amin")
    win = is_top & (c == best_idx[r])
    best_raw = torch.zeros((B,), dtype=torch.float64, device=dev)
    best_raw[r[win]] = raw[win]
    best, best_raw = best.to(q.dtype), best_raw.to(q.dtype)
    if any_fallback:
        fb = fallback.nonzero().squeeze(1)
        i2, v2, w2 = _select_torch(q[fb], dictionary, masked[fb], None, None, float("-inf"), use_abs, chunk_size)
        best_idx[fb], best[fb], best_raw[fb] = i2, v2, w2
    return best_idx, best, best_raw


FORMS = {"pursuit_select": register(
    "pursuit_select",
    triton_form(_select_triton),
    torch_form(_select_torch),
    Form(SCREEN_FORM, _select_torch_screened, device="cpu", variant=True, switch_env=SCREEN_ENV,
         needs="native bf16 dot products (AVX512-BF16 / AMX) that pass the error-bound probe",
         check=lambda: _screen_ok.get("cpu") if "cpu" in _screen_ok else _bf16_screen_available(torch.device("cpu"))),
)}
_SELECT_FORMS = FORMS["pursuit_select"]


def select_atoms(q: torch.Tensor, dictionary: torch.Tensor, masked: torch.Tensor | None = None, *,
                 q2: torch.Tensor | None = None, dictionary2: torch.Tensor | None = None,
                 mask_value: float = float("-inf"), use_abs: bool = False,
                 chunk_size: int | None = None, backend: str | None = None,
                 screen: bool | None = None, screen_cache: dict | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best atom per signal, streaming the dictionary (never a (B, M) matrix).

    Args:
        q: (B, D) float32/float64 query per signal (for COMP: r + coh * mean of selected atoms).
        dictionary: (M, D) atoms, same dtype as q, or fp16/bf16 storage with fp32 q.
        masked: (B, S) int64 atom ids that may not be chosen (score := mask_value); -1 pads.
        q2, dictionary2: optional (B, D2) and (M, D2): a second term q2 . G2[m] added to
            every score (coherence measured in a separate dictionary).
        mask_value: score given to masked atoms (-inf: never chosen; 0.0: MP's rule).
        use_abs: rank atoms by |score| instead of score.
        chunk_size: atoms per streamed chunk on the torch path (default: ~8M scores).
        backend: "torch" | "triton" | "torch-bf16-screen" | None (automatic, see
            `fastinterp.kernels.dispatch`); `last_backend["pursuit_select"]` names the form
            that ran.
        screen: torch backend only, the switch of the "torch-bf16-screen" form: score in
            bf16 first, then rescore the few candidates exactly (same result as the fp32
            path up to fp32 rounding of near-ties; about 4x less matmul time on CPUs with
            AVX512-BF16/AMX). None: automatic (CPU with native bf16, fp32 q, no q2,
            mask_value -inf, M >= SCREEN_MIN_ATOMS; the environment variable
            FASTINTERP_PURSUIT_SCREEN=0/1 overrides); True: screen whenever those
            conditions allow; False: never.
        screen_cache: a dict reused across the steps of one pursuit (same dictionary):
            holds the dictionary's bf16 rounding errors and, when small, its bf16 copy.
            None: recomputed each call (one extra pass over the dictionary).

    Returns:
        (index (B,) int64, value (B,) the winning ranking value, raw (B,) the winning
        signed score, i.e. before |.|; masked winners report mask_value).
    """
    if q.ndim != 2 or dictionary.ndim != 2 or q.shape[1] != dictionary.shape[1]:
        raise ValueError(f"q must be (B, D) and dictionary (M, D); got {tuple(q.shape)} and {tuple(dictionary.shape)}")
    B = q.shape[0]
    if masked is None:
        masked = torch.empty((B, 0), dtype=torch.int64, device=q.device)
    if masked.ndim != 2 or masked.shape[0] != B:
        raise ValueError(f"masked must be (B, S) with B = {B}, got {tuple(masked.shape)}")
    masked = masked.to(torch.int64)
    if (q2 is None) != (dictionary2 is None):
        raise ValueError("give both q2 and dictionary2, or neither")
    if q2 is not None and (q2.shape[0] != B or dictionary2.shape[0] != dictionary.shape[0]
                           or q2.shape[1] != dictionary2.shape[1]):
        raise ValueError(f"q2 must be (B, D2) and dictionary2 (M, D2); got {tuple(q2.shape)} and "
                         f"{tuple(dictionary2.shape)}")
    if dictionary.shape[0] == 0:
        raise ValueError("the dictionary has no atoms")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tensors = [q, dictionary] + ([q2, dictionary2] if q2 is not None else [])
    if backend is None and q.dtype == torch.float64:
        backend = "torch"  # the Triton kernel accumulates in fp32; float64 stays on torch
    screenable = q2 is None and mask_value == float("-inf") and q.dtype == torch.float32
    variants = {SCREEN_FORM: (screen, dictionary.shape[0] >= SCREEN_MIN_ATOMS)} if screenable else None
    form = choose_backend("pursuit_select", tensors, backend=backend, variants=variants)
    if B == 0:
        empty = torch.empty((0,), dtype=q.dtype, device=q.device)
        return torch.empty((0,), dtype=torch.int64, device=q.device), empty, empty.clone()
    return _SELECT_FORMS[form].fn(q, dictionary, masked, q2, dictionary2, mask_value, use_abs, chunk_size,
                                  screen_cache)


def selection_flops(batch: int, atoms: int, dim: int) -> float:
    """Floating-point operations of one selection step (the fused matmul): 2 B M D."""
    return 2.0 * batch * atoms * dim


def topk_atoms(q: torch.Tensor, dictionary: torch.Tensor, k: int, *, chunk_size: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k atoms of highest q . G[m] per signal, streamed (never a (B, M) matrix).

    Args:
        q: (B, D); dictionary: (M, D) (fp16/bf16 storage is upcast chunk by chunk); k <= M.

    Returns:
        (values (B, k), indices (B, k) int64), values descending, like `torch.topk`.
        Runs as torch ops on q's device (no Triton form: the cost is the matmul).
    """
    return _TOPK_FORMS[choose_backend("pursuit_topk", (q, dictionary))].fn(q, dictionary, k, chunk_size)


def _topk_torch(q, dictionary, k, chunk_size):
    B = q.shape[0]
    M = dictionary.shape[0]
    if chunk_size is None:
        chunk_size = max(256, DEFAULT_CHUNK_ELEMENTS // max(B, 1))
    chunk_size = int(max(min(chunk_size, M), k))
    best_val = torch.empty((B, 0), dtype=q.dtype, device=q.device)
    best_idx = torch.empty((B, 0), dtype=torch.int64, device=q.device)
    for start in range(0, M, chunk_size):
        g = dictionary[start:start + chunk_size]
        if g.dtype != q.dtype:
            g = g.to(q.dtype)
        scores = q @ g.T
        val, idx = scores.topk(min(k, scores.shape[1]), dim=1)
        val = torch.cat([best_val, val], dim=1)
        idx = torch.cat([best_idx, idx + start], dim=1)
        keep = val.topk(min(k, val.shape[1]), dim=1).indices
        best_val, best_idx = val.gather(1, keep), idx.gather(1, keep)
    return best_val, best_idx


FORMS["pursuit_topk"] = register("pursuit_topk", torch_form(_topk_torch))
_TOPK_FORMS = FORMS["pursuit_topk"]
