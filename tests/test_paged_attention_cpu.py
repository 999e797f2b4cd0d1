"""The CPU decode-attention path against the plain reference, on random scattered caches."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_decode_ref
from kernels.paged_attention_cpu import paged_attention_decode_cpu


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 80), (8, 1, 16)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_cpu_matches_reference(dtype, tol, heads, kv_heads, head_dim, window):
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 64
    seq_lens = torch.tensor([1, 5, 16, 17, 50, 100, 33])
    width = -(-int(seq_lens.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=g)[:len(seq_lens) * width].view(len(seq_lens), width)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g).to(dtype)
    ref = paged_attention_decode_ref(q, k, v, tables, seq_lens, head_dim ** -0.5, window)
    for _ in range(2):   # the second call reuses the scratch buffers
        out = paged_attention_decode_cpu(q, k, v, tables, seq_lens, head_dim ** -0.5, window)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # a smaller step after a bigger one must not read stale scratch contents
    small = paged_attention_decode_cpu(q[:2], k, v, tables[:2, :1], seq_lens[:2], head_dim ** -0.5, window)
    torch.testing.assert_close(small.float(), ref[:2].float(), atol=tol, rtol=tol)
