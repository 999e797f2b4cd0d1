"""RMSNorm and LayerNorm, optionally fused with the residual add that precedes them.

The reference follows Hugging Face's arithmetic exactly (statistics in float32, the residual
add in the model dtype) so that fp32 runs match transformers to the last bits we can hope for.
The kernels keep the same rounding points: the residual sum and the normalised value are
rounded to the model dtype before the next step, everything else is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import (check, check_device, check_float, check_rows, pow2, tl, triton,
                             use_triton)
from kernels.cpu_ext import cpu_ops, use_cpu_kernels

MAX_HIDDEN = 65536  # one program holds a whole row in registers


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] -> [T, H] in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual)."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def fused_add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return layer_norm_ref(residual, weight, bias, eps), residual


@triton.jit
def _norm_kernel(
    x_ptr,            # [T, H], row stride stride_x
    res_ptr,          # [T, H], row stride stride_res (read only if HAS_RESIDUAL)
    weight_ptr,       # [H]
    bias_ptr,         # [H] (LayerNorm only)
    out_ptr,          # [T, H] contiguous
    res_out_ptr,      # [T, H] contiguous, x + residual (written only if HAS_RESIDUAL)
    stride_x, stride_res, hidden, eps,
    BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)   # the model dtype's rounding, as HF
        tl.store(res_out_ptr + row * hidden + cols, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        y = normed * w
    else:
        mean = tl.sum(x, axis=0) / hidden
        diff = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / hidden + eps)
        y = diff * rstd * w + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_triton(op: str, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    check(x.dim() >= 1, op, "x must have a hidden dim")
    hidden = x.shape[-1]
    lead = x.shape[:-1]
    check(hidden <= MAX_HIDDEN, op, f"hidden size {hidden} above {MAX_HIDDEN}")
    named = [("x", x), ("weight", weight)] + ([("residual", residual)] if residual is not None
                                              else []) + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        check_float(op, name, t)
    check(residual is None or (residual.shape == x.shape and residual.dtype == x.dtype), op,
          f"residual must match x {tuple(x.shape)} {x.dtype}")
    check(weight.shape == (hidden,) and weight.is_contiguous(), op,
          f"weight must be contiguous [{hidden}], got {tuple(weight.shape)}")
    check(bias is None or (bias.shape == (hidden,) and bias.is_contiguous()), op,
          f"bias must be contiguous [{hidden}]")
    # Rows may be strided (a view of a wider tensor); more than two dims are flattened.
    x2 = x if x.dim() == 2 else x.reshape(-1, hidden)
    check_rows(op, "x", x2, tuple(x2.shape))
    res2 = None
    if residual is not None:
        res2 = residual if residual.dim() == 2 else residual.reshape(-1, hidden)
        check_rows(op, "residual", res2, tuple(res2.shape))
    check_device(op, *(t for _, t in named))
    # The reference multiplies by the weight after casting, so the output takes torch's
    # promotion of (weight, x); for LayerNorm F.layer_norm keeps x's dtype.
    out_dtype = torch.promote_types(weight.dtype, x.dtype) if bias is None else x.dtype
    rows = x2.shape[0]
    out = torch.empty(rows, hidden, dtype=out_dtype, device=x.device)
    res_out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device) if res2 is not None else None
    if rows:
        _norm_kernel[(rows,)](
            x2, res2 if res2 is not None else x2, weight, bias if bias is not None else weight,
            out, res_out if res_out is not None else out, x2.stride(0),
            res2.stride(0) if res2 is not None else 0, hidden, float(eps),
            BLOCK_H=pow2(hidden), HAS_RESIDUAL=res2 is not None, IS_RMS=bias is None,
            num_warps=4 if hidden <= 4096 else 8)
    return out.view(*lead, hidden), res_out.view(*lead, hidden) if res_out is not None else None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_triton("rms_norm", x, None, weight, None, eps)[0]


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_triton("fused_add_rms_norm", x, residual, weight, None, eps)  # type: ignore


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> torch.Tensor:
    return _norm_triton("layer_norm", x, None, weight, bias, eps)[0]


def fused_add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_triton("fused_add_layer_norm", x, residual, weight, bias, eps)  # type: ignore


def _cpu_rows(*tensors: torch.Tensor) -> bool:
    """2-D CPU tensors with dense rows: the C++ kernel's layout."""
    return all(t.dim() == 2 and t.stride(-1) == 1 for t in tensors) and use_cpu_kernels(*tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] -> [T, H] in x's dtype."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    if _cpu_rows(x) and use_cpu_kernels(x, weight):
        out = torch.empty(x.shape, dtype=x.dtype)
        cpu_ops().rms_norm(out, out, x, None, weight.contiguous(), eps)
        return out
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual). Inputs are not modified."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    if _cpu_rows(x, residual) and use_cpu_kernels(x, weight) and x.shape == residual.shape:
        out, res_out = (torch.empty(x.shape, dtype=x.dtype) for _ in range(2))
        cpu_ops().rms_norm(out, res_out, x, residual, weight.contiguous(), eps)
        return out, res_out
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    if use_triton(x):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (layer_norm(residual), residual)."""
    if use_triton(x):
        return fused_add_layer_norm_triton(x, residual, weight, bias, eps)
    return fused_add_layer_norm_ref(x, residual, weight, bias, eps)
