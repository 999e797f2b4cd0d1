"""Activations of the MLP blocks: SiLU-and-mul (Llama) and tanh-GELU (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import check, check_device, check_float, check_rows, tl, triton, use_triton
from kernels.cpu_ext import cpu_ops, use_cpu_kernels

BLOCK = 1024  # elements of one row handled by one program


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding gate then up projections -> silu(gate) * up, [T, I]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's `gelu_new`: the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,            # [T, 2*I], row stride stride_x
    out_ptr,          # [T, I] contiguous
    stride_x, inter,
    BLOCK_I: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_kernel(
    x_ptr,            # [N] contiguous
    out_ptr,          # [N] contiguous
    n,
    BLOCK_N: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)   # sqrt(2/pi) * (x + 0.044715 x^3)
    # tanh(u) = 1 - 2 / (exp(2u) + 1); |u| <= 10 already gives +-1.0 in float32, and the
    # clamp keeps exp finite.
    u = tl.minimum(tl.maximum(u, -10.0), 10.0)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    tl.store(out_ptr + offs, (0.5 * x * (1.0 + tanh)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    op = "silu_and_mul"
    check(x.dim() == 2 and x.shape[1] % 2 == 0, op,
          f"x must be [T, 2*I], got shape {tuple(x.shape)}")
    check_float(op, "x", x)
    check_rows(op, "x", x, tuple(x.shape))
    check_device(op, x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    if t and inter:
        grid = (t, triton.cdiv(inter, BLOCK))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), inter, BLOCK_I=BLOCK)
    return out


def gelu_tanh_triton(x: torch.Tensor) -> torch.Tensor:
    op = "gelu_tanh"
    check_float(op, "x", x)
    check(x.is_contiguous(), op, "x must be contiguous")
    check_device(op, x)
    out = torch.empty_like(x)
    if x.numel():
        _gelu_tanh_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK_N=BLOCK)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding gate then up projections -> silu(gate) * up, [T, I]."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    if x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0 and use_cpu_kernels(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
        cpu_ops().silu_and_mul(out, x)   # one pass (kernels/csrc/elementwise_cpu.cpp)
        return out
    return silu_and_mul_ref(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's `gelu_new`: the tanh approximation of GELU."""
    return gelu_tanh_triton(x) if use_triton(x) else gelu_tanh_ref(x)
