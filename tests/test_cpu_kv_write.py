"""The C++ CPU KV-cache write (kernels/csrc/kv_write_cpu.cpp) against the torch reference:
every activation dtype into every cache dtype, bit for bit (NaN only as NaN: torch's own
float32 -> bfloat16 NaN bits differ between its scalar and vector code), over strided rows
(key and value as views of one fused projection), scattered slots, padding slots, values
spanning subnormals to overflow; and the checks that keep a bad call from writing anywhere."""

from __future__ import annotations

import shutil

import pytest
import torch

from kernels import write_kv_cache
from kernels.cpu_ext import cpu_ops
from kernels.kv_write import _cpu_kernel_applies, write_kv_cache_ref

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: the engine falls back to the torch path")

ACT = (torch.float32, torch.bfloat16, torch.float16)
CACHE = ACT + (torch.float8_e4m3fn, torch.float8_e5m2)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    fa, fb = a.float(), b.float()
    nan = fa.isnan()
    return torch.equal(nan, fb.isnan()) and torch.equal(
        a.view(torch.uint8).view(*a.shape, -1)[~nan], b.view(torch.uint8).view(*b.shape, -1)[~nan])


def _case(act, t, hkv, d, gen):
    """key and value as strided views of one [T, (2 Hkv + 1) D] projection, as the model has."""
    scales = torch.logspace(-42, 6, t, dtype=torch.float64).float().view(t, 1)
    fused = torch.randn(t, (2 * hkv + 1) * d, generator=gen) * scales
    fused[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45])
    fused = fused.to(act)
    key = fused[:, d:(hkv + 1) * d].view(t, hkv, d)
    value = fused[:, (hkv + 1) * d:].view(t, hkv, d)
    return key, value


@pytest.mark.parametrize("cache_dtype", CACHE)
@pytest.mark.parametrize("act", ACT)
@pytest.mark.parametrize("hkv,d,block", [(2, 64, 16), (1, 80, 32), (3, 13, 4)])
def test_cpu_kv_write_matches_torch(act, cache_dtype, hkv, d, block):
    gen = torch.Generator().manual_seed(hkv * 100 + d)
    t, num_blocks = 150, 40
    key, value = _case(act, t, hkv, d, gen)
    slots = torch.randperm(num_blocks * block, generator=gen)[:t]
    k_cache = torch.randn(num_blocks, block, hkv, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block, hkv, d, generator=gen).to(cache_dtype)
    assert _cpu_kernel_applies(key, value, k_cache, v_cache, slots)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)   # the C++ kernel
    assert _same(k_cache, k_ref) and _same(v_cache, v_ref)


def test_cpu_kv_write_skips_padding_slots():
    gen = torch.Generator().manual_seed(3)
    key, value = _case(torch.float32, 20, 2, 64, gen)
    k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    slots = torch.arange(20)
    slots[5:9] = -1
    write_kv_cache(key, value, k_cache, v_cache, slots)
    flat = k_cache.view(-1, 2, 64)
    keep = slots >= 0
    assert torch.equal(flat[slots[keep]], key[keep])
    assert torch.equal(v_cache.view(-1, 2, 64)[slots[keep]], value[keep])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert not flat[untouched].any()


def test_cpu_kv_write_rejects_bad_calls_before_writing():
    key = torch.randn(3, 2, 64)
    k_cache, v_cache = torch.zeros(2, 4, 2, 64), torch.zeros(2, 4, 2, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops().write_kv_cache(key, key, k_cache, v_cache, torch.tensor([0, 1, 8]))
    assert not k_cache.any() and not v_cache.any()
    with pytest.raises(RuntimeError, match="dense heads"):
        cpu_ops().write_kv_cache(key[:, :1], key[:, :1], k_cache, v_cache, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        cpu_ops().write_kv_cache(key, key, k_cache, v_cache.half(), torch.tensor([0, 1, 2]))
    # shapes the kernel does not take go to the torch reference instead
    assert not _cpu_kernel_applies(key.transpose(1, 2), key.transpose(1, 2), k_cache, v_cache,
                                   torch.tensor([0, 1, 2]))
    assert not _cpu_kernel_applies(key, key, k_cache, v_cache, torch.tensor([0, 1, 2],
                                                                            dtype=torch.int32))


def _rounding_cases() -> torch.Tensor:
    """float32 bit patterns: random ones, and every pattern in windows around the halfway
    points of the narrow formats (ties to even), their subnormal and overflow thresholds."""
    gen = torch.Generator().manual_seed(7)
    bits = [torch.randint(-2 ** 31, 2 ** 31, (1 << 18,), generator=gen, dtype=torch.int64)]
    for f in (2.0 ** -14, 2.0 ** -16, 2.0 ** -17, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 2.0 ** -24,
              2.0 ** -25, 1.0 + 2 ** -3, 1.0 + 2 ** -4, 1.0 + 3 * 2 ** -4, 1.0 + 2 ** -11,
              448.0, 464.0, 480.0, 57344.0, 61440.0, 65504.0, 65520.0):
        center = torch.tensor([f], dtype=torch.float32).view(torch.int32).long()
        bits.append(center + torch.arange(-300, 300))
    b = torch.cat(bits)
    b = torch.cat([b, b | (1 << 31)]) & 0xFFFFFFFF
    b = torch.where(b >= 2 ** 31, b - 2 ** 32, b).to(torch.int32)
    n = b.numel() // 64 * 64
    return b[:n].view(torch.float32).view(-1, 1, 64)


@pytest.mark.parametrize("cache_dtype", CACHE[1:])
def test_cpu_kv_write_rounds_every_boundary_like_torch(cache_dtype):
    key = _rounding_cases()
    t = key.shape[0]
    slots = torch.randperm(t, generator=torch.Generator().manual_seed(1))
    k_ref = torch.zeros(t, 1, 1, 64, dtype=cache_dtype)
    v_ref = torch.zeros_like(k_ref)
    k_cache, v_cache = k_ref.clone(), v_ref.clone()
    write_kv_cache_ref(key, key, k_ref, v_ref, slots)
    write_kv_cache(key, key, k_cache, v_cache, slots)
    assert _same(k_cache, k_ref) and _same(v_cache, v_ref)
