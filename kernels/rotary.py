"""Rotary position embedding (Llama's rotate-half layout), with linear and Llama-3 scaling."""

from __future__ import annotations

import math

import torch

from kernels._triton import (check, check_device, check_float, check_index, check_rows, pow2, tl,
                             triton, use_triton)
from kernels.cpu_ext import cpu_ops, use_cpu_kernels


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position_embeddings: int = 8192) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope type {rope_type!r}")
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # them interpolated smoothly.
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half of the last dim, sin in the second."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].clone(), x[..., half:].clone()
    x[..., :half] = x1 * cos - x2 * sin
    x[..., half:] = x2 * cos + x1 * sin


def apply_rotary_ref(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place by their positions [T].

    cos/sin are computed in float32 and cast to the activations' dtype before use, as
    transformers does.
    """
    half = query.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions).to(query.dtype)
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    _rotate(query, cos, sin)
    _rotate(key, cos, sin)


@triton.jit
def _rotate_heads(
    base_ptr,         # [H, D] contiguous: one token's heads
    num_heads, cos, sin,   # cos, sin: [1, BLOCK_HALF] float32
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    offs = h * (2 * HALF) + d                                         # [BLOCK_H, BLOCK_HALF]
    mask = (h < num_heads) & (d < HALF)
    x1 = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ty = base_ptr.dtype.element_ty
    tl.store(base_ptr + offs, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(base_ptr + offs + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,    # [T] int32/int64
    q_ptr,            # [T, Hq, D], row stride stride_q, inner dims contiguous; rotated in place
    k_ptr,            # [T, Hkv, D], row stride stride_k, inner dims contiguous; rotated in place
    cos_sin_ptr,      # [max_positions, D] float32 contiguous: cos | sin
    stride_q, stride_k, num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    # Like the reference, the float32 table is rounded to the activations' dtype first.
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + d, mask=d_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + d, mask=d_mask, other=0.0)
    cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_q, num_heads, cos, sin, HALF, BLOCK_HALF, BLOCK_H)
    _rotate_heads(k_ptr + token * stride_k, num_kv_heads, cos, sin, HALF, BLOCK_HALF, BLOCK_H)


def apply_rotary_triton(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                        cos_sin_cache: torch.Tensor) -> None:
    op = "apply_rotary"
    check(query.dim() == 3 and key.dim() == 3, op, f"query and key must be [T, H, D], got "
          f"{tuple(query.shape)} and {tuple(key.shape)}")
    t, num_heads, head_dim = query.shape
    check(head_dim % 2 == 0, op, f"head_dim must be even, got {head_dim}")
    check_rows(op, "query", query, (t, num_heads, head_dim))
    check_rows(op, "key", key, (t, key.shape[1], head_dim))
    check_float(op, "query", query)
    check(key.dtype == query.dtype, op, f"key dtype {key.dtype} != query dtype {query.dtype}")
    check(cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
          and cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim, op,
          f"cos_sin_cache must be contiguous float32 [max_positions, {head_dim}], got "
          f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    check_index(op, "positions", positions, 1)
    check(positions.shape[0] == t, op, f"positions has {positions.shape[0]} entries for {t} tokens")
    check_device(op, positions, query, key, cos_sin_cache)
    if t == 0:
        return
    _rotary_kernel[(t,)](positions, query, key, cos_sin_cache, query.stride(0), key.stride(0),
                         num_heads, key.shape[1], HALF=head_dim // 2,
                         BLOCK_HALF=pow2(head_dim // 2), BLOCK_H=pow2(max(num_heads, key.shape[1])))


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place by their positions [T], reading
    the float32 [max_positions, D] cos|sin table of `build_cos_sin_cache`."""
    if use_triton(query):
        apply_rotary_triton(positions, query, key, cos_sin_cache)
    elif (use_cpu_kernels(query, key) and cos_sin_cache.dtype == torch.float32
          and cos_sin_cache.device.type == "cpu" and positions.dtype == torch.int64
          and positions.device.type == "cpu"):
        cpu_ops().rotary(query, key, positions.contiguous(), cos_sin_cache)  # in place, one pass
    else:
        apply_rotary_ref(positions, query, key, cos_sin_cache)
