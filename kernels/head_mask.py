"""Head-masked output projection: per configuration c, mix each head's output with a
replacement and project through the attention output matrix, in one pass.

    out[c, r, :] = sum_h (a[c, h] * X[c, r, h, :] + b[c, h] * Y[r mod T, h, :]) @ W[:, h]^T  (+ bias)

X: (C or 1, R, H, hd) head outputs (rows r are flattened (image, token) pairs; a leading
size-1 axis is broadcast over the C configurations without being copied), Y: (T, H, hd)
per-token replacement values (e.g. dataset means of the head outputs; row r uses
Y[r mod T]), W: (D_out, H * hd) the output projection (nn.Linear layout), bias: (D_out,).
With a = mask, b = 1 - mask this is zero-ablation (Y absent) or mean-ablation of a head
output before out_proj, soft masks included. With a = mask - 1 and no bias it gives the
change a mask makes to a layer's attention output, which is what lets a single-head
ablation reuse the unmasked layer.

Heads whose (a, b) are zero for a configuration are skipped: the Triton form branches on
them per program, the torch form drops heads no configuration uses. The Triton kernel
accumulates in fp32 with IEEE fp32 dot products for fp32 inputs (no TF32), so it agrees
with the torch form to rounding.
"""
from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, choose_backend, register, torch_form, triton_form, triton_interpreting

__all__ = ["AOT_SPECS", "FORMS", "masked_head_projection"]


# --------------------------------------------------------------------------------------
# Triton form
# --------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_proj_kernel(x_ptr, y_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr,
                            R, T, D_OUT, H, HD,
                            stride_xc, stride_xr, stride_yt, stride_w, stride_oc, stride_or,
                            HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        c = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < R
        col_ok = cols < D_OUT
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        x_base = x_ptr + c.to(tl.int64) * stride_xc + rows64[:, None] * stride_xr
        tok64 = (rows % T).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h in range(0, H):
            a = tl.load(a_ptr + c * H + h)
            b = 0.0
            if HAS_Y:
                b = tl.load(b_ptr + c * H + h)
            if (a != 0.0) | (b != 0.0):
                for k0 in range(0, HD, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = kk < HD
                    kcol = h * HD + kk
                    xt = tl.load(x_base + kcol[None, :], mask=row_ok[:, None] & k_ok[None, :],
                                 other=0.0).to(tl.float32) * a
                    if HAS_Y:
                        yt = tl.load(y_ptr + tok64[:, None] * stride_yt + kcol[None, :],
                                     mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                        xt += yt * b
                    wt = tl.load(w_ptr + cols64[None, :] * stride_w + kcol[:, None],
                                 mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(xt.to(wt.dtype), wt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + c.to(tl.int64) * stride_oc + rows64[:, None] * stride_or + cols64[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # fp32 uses IEEE FMA dot products (register-heavy): smaller tiles keep it spill-free
    _GPU_BLOCKS = {"fp32": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16},
                   "fp16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16},
                   "bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}}
    _INTERP_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    _NUM_WARPS = 4
    _NUM_STAGES = 2

    def _aot_specs() -> list[dict]:
        specs = []
        for name, ptype in (("fp32", "*fp32"), ("fp16", "*fp16"), ("bf16", "*bf16")):
            for has_y in (False, True):
                for has_bias in (False, True):
                    signature = {
                        "x_ptr": ptype, "y_ptr": ptype, "w_ptr": ptype, "bias_ptr": ptype,
                        "a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": ptype,
                        "R": "i32", "T": "i32", "D_OUT": "i32", "H": "i32", "HD": "i32",
                        "stride_xc": "i64", "stride_xr": "i64", "stride_yt": "i64", "stride_w": "i64",
                        "stride_oc": "i64", "stride_or": "i64",
                        "HAS_Y": "constexpr", "HAS_BIAS": "constexpr", "PRECISION": "constexpr",
                        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                    }
                    constexprs = {"HAS_Y": has_y, "HAS_BIAS": has_bias,
                                  "PRECISION": "ieee" if name == "fp32" else "tf32", **_GPU_BLOCKS[name]}
                    specs.append({
                        "name": f"head_mask_proj_{name}{'_mean' if has_y else ''}{'_bias' if has_bias else ''}",
                        "fn": _masked_proj_kernel, "signature": signature, "constexprs": constexprs,
                        "num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES,
                    })
        return specs

    AOT_SPECS = _aot_specs()
else:  # pragma: no cover - triton ships for Linux only
    AOT_SPECS = []


def _masked_proj_triton(x, a, y, b, w, bias):
    C = a.shape[0]
    _, R, H, hd = x.shape
    D_out = w.shape[0]
    dtype = w.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton head-mask kernel takes fp32/fp16/bf16 weights, got {dtype}; use backend='torch'")
    x = x.to(dtype).reshape(x.shape[0], R, H * hd)
    if x.stride(2) != 1 or x.stride(1) != H * hd:
        x = x.contiguous()
    w = w.contiguous()
    a32 = a.to(torch.float32).contiguous()
    b32 = b.to(torch.float32).contiguous() if b is not None else a32
    yv = y.to(dtype).reshape(y.shape[0], H * hd).contiguous() if y is not None else x
    biasv = bias.to(dtype).contiguous() if bias is not None else w
    out = torch.empty((C, R, D_out), device=x.device, dtype=dtype)
    if C == 0 or R == 0:
        return out
    dname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    blocks = _INTERP_BLOCKS if (triton_interpreting() and not x.is_cuda) else _GPU_BLOCKS[dname]
    grid = (triton.cdiv(R, blocks["BLOCK_M"]), triton.cdiv(D_out, blocks["BLOCK_N"]), C)
    _masked_proj_kernel[grid](
        x, yv, w, biasv, a32, b32, out,
        R, y.shape[0] if y is not None else 1, D_out, H, hd,
        x.stride(0) if x.shape[0] > 1 else 0, x.stride(1), yv.stride(0), w.stride(0),
        out.stride(0), out.stride(1),
        HAS_Y=y is not None, HAS_BIAS=bias is not None,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, **blocks,
    )
    return out


# --------------------------------------------------------------------------------------
# torch form
# --------------------------------------------------------------------------------------
def _masked_proj_torch(x, a, y, b, w, bias):
    C = a.shape[0]
    Cx, R, H, hd = x.shape
    D_out = w.shape[0]
    used = (a != 0).any(0)
    if b is not None:
        used |= (b != 0).any(0)
    heads = used.nonzero().flatten()
    dtype = w.dtype
    if heads.numel() == 0:
        out = torch.zeros((C, R, D_out), device=w.device, dtype=dtype)
    else:
        nh = heads.numel()
        w_used = w.reshape(D_out, H, hd)[:, heads].reshape(D_out, nh * hd)
        a_used = a[:, heads].to(dtype)
        x_used = x[:, :, heads].to(dtype)  # (Cx, R, nh, hd)
        if Cx == 1 and C > 1:
            # Shared head outputs: project each used head once, then mix per configuration.
            per_head = torch.einsum("rhk,ohk->hro", x_used[0], w_used.reshape(D_out, nh, hd))
            out = torch.einsum("ch,hro->cro", a_used, per_head)
        else:
            mixed = x_used * a_used[:, None, :, None]
            out = (mixed.reshape(C, R, nh * hd) @ w_used.T)
        if y is not None:
            T = y.shape[0]
            # per-token replacement projected once per head: (nh, T, D_out)
            y_proj = torch.einsum("thk,ohk->hto", y[:, heads].to(dtype), w_used.reshape(D_out, nh, hd))
            y_mix = torch.einsum("ch,hto->cto", b[:, heads].to(dtype), y_proj)  # (C, T, D_out)
            out = out + y_mix.repeat(1, R // T, 1)
    if bias is not None:
        out = out + bias.to(dtype)
    return out


FORMS = {"masked_head_projection": register("masked_head_projection", triton_form(_masked_proj_triton),
                                            torch_form(_masked_proj_torch))}
_PROJ_FORMS = FORMS["masked_head_projection"]


def masked_head_projection(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None, *, y: torch.Tensor | None = None,
                           b: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Masked multi-head output projection for C configurations at once.

    Args:
        x: (C, R, H, hd) or (1, R, H, hd) head outputs (a leading 1 is shared by all C).
        a: (C, H) multiplier of each head's output per configuration.
        weight: (D_out, H * hd) output projection (nn.Linear layout).
        bias: (D_out,) or None.
        y: (T, H, hd) replacement values, row r of x uses y[r mod T]; R must be a multiple of T.
        b: (C, H) multiplier of the replacement (required with y).
        backend: "torch" or "triton" (default: by device, see fastinterp.kernels.dispatch).

    Returns:
        (C, R, D_out) in weight's dtype:
        `sum_h (a[c,h] x[c,r,h] + b[c,h] y[r mod T,h]) @ weight[:, h]^T + bias`.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a 4-D tensor (C, R, H, hd), got {getattr(x, 'shape', type(x))}")
    Cx, R, H, hd = x.shape
    if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[1] != H:
        raise ValueError(f"a must be (C, H={H}), got {getattr(a, 'shape', type(a))}")
    C = a.shape[0]
    if Cx not in (1, C):
        raise ValueError(f"x has {Cx} configurations but a has {C}; give x with C or 1 leading entries")
    if weight.ndim != 2 or weight.shape[1] != H * hd:
        raise ValueError(f"weight must be (D_out, H*hd={H * hd}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if (y is None) != (b is None):
        raise ValueError("give y (replacement values) and b (their multipliers) together, or neither")
    if y is not None:
        if y.ndim != 3 or y.shape[1:] != (H, hd):
            raise ValueError(f"y must be (T, H={H}, hd={hd}), got {tuple(y.shape)}")
        if R % y.shape[0] != 0:
            raise ValueError(f"x has {R} rows, not a multiple of y's {y.shape[0]} tokens")
        if tuple(b.shape) != (C, H):
            raise ValueError(f"b must be (C={C}, H={H}), got {tuple(b.shape)}")
    form = choose_backend("masked_head_projection", (x, weight), backend=backend)
    return _PROJ_FORMS[form].fn(x, a, y, b, weight, bias)
