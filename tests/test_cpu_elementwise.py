"""The C++ CPU elementwise kernels (silu_and_mul, rms_norm with/without the residual add,
rotary) against their torch references, through the public dispatching functions."""

from __future__ import annotations

import shutil

import pytest
import torch

from kernels import (apply_rotary, build_cos_sin_cache, fused_add_rms_norm, rms_norm,
                     rope_inv_freq, silu_and_mul)
from kernels.activation import silu_and_mul_ref
from kernels.cpu_ext import cpu_ops, use_cpu_kernels
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.rotary import apply_rotary_ref

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: the engine falls back to the torch path")


def test_cpu_kernels_are_used():
    assert cpu_ops() is not None and use_cpu_kernels(torch.zeros(1))
    assert use_cpu_kernels(torch.zeros(1, dtype=torch.bfloat16))   # tests/test_cpu_half_compute.py
    assert not use_cpu_kernels(torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16))   # mixed
    assert not use_cpu_kernels(torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("rows", [1, 7, 100])
@pytest.mark.parametrize("inter", [13, 176, 1536])   # 13: a tail past the last full vector
def test_silu_and_mul(rows, inter):
    x = torch.randn(rows, 2 * inter) * 4
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-6, rtol=1e-5)
    wide = torch.randn(rows, 2 * inter + 10)[:, :2 * inter]   # strided rows
    torch.testing.assert_close(silu_and_mul(wide), silu_and_mul_ref(wide), atol=1e-6, rtol=1e-5)


def test_silu_and_mul_extremes():
    """The vectorized exp's clamped range: gates far past +-88, zeros, infinities and NaN."""
    gate = torch.tensor([-1e4, -200., -88.5, -87., -20., -1e-30, 0., 1e-30, 20., 87., 88.5, 200.,
                         1e4, float("inf"), float("-inf"), float("nan")] * 3)
    x = torch.cat([gate, torch.linspace(-3, 3, gate.numel())])[None].repeat(70, 1)
    x[1::2, :gate.numel()] = torch.randn(35, gate.numel()) * 30
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-6, rtol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("rows,hidden", [(1, 64), (33, 576), (100, 512)])
def test_rms_norm(rows, hidden):
    x, res, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    res_before = res.clone()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(res, res_before)   # the inputs are not modified


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (9, 3, 64), (4, 2, 80), (2, 1, 128)])
def test_rotary(heads, kv_heads, head_dim):
    cache = build_cos_sin_cache(rope_inv_freq(head_dim, 10000.0), 600)
    t = 37
    positions = torch.randint(0, 600, (t,))
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim)   # q, k as views of a fused qkv
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary(positions, q, k, cache)
    apply_rotary_ref(positions, q_ref, k_ref, cache)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops().rotary(q, k, torch.full((t,), 600), cache)
