"""Row-wise L2 normalisation: out[i] = x[i] / max(||x[i]||, eps).

The smallest complete kernel pair, and the pattern for the others: a Triton kernel, a
torch reference beside it, their table `FORMS` (registered with `dispatch`), and one public
function that asks `choose_backend` which form runs.
"""
from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, choose_backend, register, torch_form, triton_form

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _l2_normalize_rows_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, eps,
                                  BLOCK: tl.constexpr):
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * stride_x
        out_row = out_ptr + row.to(tl.int64) * stride_out
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            acc += v * v
        scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            tl.store(out_row + cols, (v * scale).to(out_ptr.dtype.element_ty), mask=cols < n_cols)

    _NUM_WARPS = 4
    _NUM_STAGES = 3
    _MAX_BLOCK = 1024

    def _aot_specs() -> list[dict]:
        """The launches of `_l2_normalize_rows_triton`: each storage dtype, at the block sizes
        CLIP widths give (512: ViT-B joint space; 1024: widths 768 and 1024, the cap)."""
        specs = []
        for name, ptype in (("fp32", "*fp32"), ("fp16", "*fp16"), ("bf16", "*bf16")):
            for block in (512, _MAX_BLOCK):
                specs.append({
                    "name": f"l2_normalize_rows_{name}_block{block}", "fn": _l2_normalize_rows_kernel,
                    "signature": {"x_ptr": ptype, "out_ptr": ptype, "n_cols": "i32", "stride_x": "i32",
                                  "stride_out": "i32", "eps": "fp32", "BLOCK": "constexpr"},
                    "constexprs": {"BLOCK": block}, "num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES,
                })
        return specs

    AOT_SPECS = _aot_specs()
else:  # pragma: no cover - triton ships for Linux only
    AOT_SPECS = []


def _l2_normalize_rows_triton(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(x.shape[1], 16)))
    _l2_normalize_rows_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), out.stride(0), eps, BLOCK=block,
                                             num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    return out


def _l2_normalize_rows_torch(x: torch.Tensor, eps: float) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x.float(), dim=1, keepdim=True).clamp_min(eps)
    return (x.float() / norms).to(x.dtype)


FORMS = {"l2_normalize_rows": register("l2_normalize_rows", triton_form(_l2_normalize_rows_triton),
                                       torch_form(_l2_normalize_rows_torch))}
_L2_FORMS = FORMS["l2_normalize_rows"]


def l2_normalize_rows(x: torch.Tensor, *, eps: float = 1e-12, backend: str | None = None) -> torch.Tensor:
    """L2-normalise the rows of a (N, D) float tensor; same shape and dtype out.

    Accumulates in fp32 whatever the storage dtype.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"expected a 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return _L2_FORMS[choose_backend("l2_normalize_rows", (x,), backend=backend)].fn(x, eps)
