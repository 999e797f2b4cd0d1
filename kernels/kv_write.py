"""KV-cache write: scatter this step's keys and values into their cache slots."""

from __future__ import annotations

import torch

from kernels._triton import (check, check_device, check_float, check_index, check_rows, pow2, tl,
                             triton, use_triton)
from kernels.cpu_ext import CPU_KERNEL_DTYPES, cpu_ops, use_cpu_kernels

_CPU_CACHE_DTYPES = CPU_KERNEL_DTYPES + (torch.float8_e4m3fn, torch.float8_e5m2)


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key/value rows at their slots.

    key, value: [T, num_kv_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: [T] int64, slot = block_id * block_size + offset in block
    """
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if k_cache.element_size() == 1:   # fp8: torch's index_copy_ has no fp8 kernel, bytes do
        flat_k.view(torch.uint8).index_copy_(0, slot_mapping, key.to(k_cache.dtype).view(torch.uint8))
        flat_v.view(torch.uint8).index_copy_(0, slot_mapping, value.to(v_cache.dtype).view(torch.uint8))
        return
    flat_k.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,          # [T, Hkv, D], row stride stride_key, inner dims contiguous
    value_ptr,        # [T, Hkv, D], row stride stride_value, inner dims contiguous
    k_cache_ptr,      # [num_blocks * block_size, Hkv, D] contiguous (a slot is one row)
    v_cache_ptr,      # [num_blocks * block_size, Hkv, D] contiguous
    slot_ptr,         # [T] int32/int64
    stride_key, stride_value, row_size,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # int64: slot * row_size passes 2**31 once the cache holds more than ~2**31 elements.
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing to store
        cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = cols < row_size
        k = tl.load(key_ptr + token * stride_key + cols, mask=mask)
        v = tl.load(value_ptr + token * stride_value + cols, mask=mask)
        tl.store(k_cache_ptr + slot * row_size + cols, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * row_size + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    op = "write_kv_cache"
    check(k_cache.dim() == 4, op, f"k_cache must be [num_blocks, block_size, Hkv, D], "
          f"got shape {tuple(k_cache.shape)}")
    _, _, num_kv_heads, head_dim = k_cache.shape
    check(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype, op,
          f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
          f"{tuple(k_cache.shape)} {k_cache.dtype}")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), op, "caches must be contiguous")
    check(key.dim() == 3, op, f"key must be [T, Hkv, D], got shape {tuple(key.shape)}")
    t = key.shape[0]
    check_rows(op, "key", key, (t, num_kv_heads, head_dim))
    check_rows(op, "value", value, (t, num_kv_heads, head_dim))
    for name, x in (("key", key), ("value", value), ("k_cache", k_cache)):
        check_float(op, name, x)
    check_index(op, "slot_mapping", slot_mapping, 1)
    check(slot_mapping.shape[0] == t, op, f"slot_mapping has {slot_mapping.shape[0]} slots "
          f"for {t} tokens")
    check_device(op, key, value, k_cache, v_cache, slot_mapping)
    if t == 0:
        return
    row_size = num_kv_heads * head_dim
    block_r = min(pow2(row_size), 4096)
    grid = (t, triton.cdiv(row_size, block_r))
    _write_kv_cache_kernel[grid](key, value, k_cache, v_cache, slot_mapping, key.stride(0),
                                 value.stride(0), row_size, BLOCK_R=block_r)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key/value rows [T, Hkv, D] at their slots in the [num_blocks, block_size, Hkv, D]
    caches; slot = block_id * block_size + offset in block."""
    if use_triton(k_cache):
        write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping)
    elif _cpu_kernel_applies(key, value, k_cache, v_cache, slot_mapping):
        # one pass, converting on the way (kernels/csrc/kv_write_cpu.cpp; the same bits)
        cpu_ops().write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping)


def _cpu_kernel_applies(key, value, k_cache, v_cache, slot_mapping) -> bool:
    return (use_cpu_kernels(key, value) and k_cache.device.type == "cpu"
            and k_cache.dtype in _CPU_CACHE_DTYPES and v_cache.dtype == k_cache.dtype
            and k_cache.dim() == 4 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and v_cache.shape == k_cache.shape and key.dim() == 3 and slot_mapping.dim() == 1
            and key.shape == value.shape == (slot_mapping.shape[0], *k_cache.shape[2:])
            and all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (key, value))
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and slot_mapping.device.type == "cpu")
