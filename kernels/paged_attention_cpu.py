"""The CPU path of paged decode attention: the reference's math, arranged for memory traffic.

On a CPU, decode attention is bound by reading the paged K/V (CPU_PERF_NOTES.md). The
reference gathers K/V into fresh tensors and then permutes them for one big matmul, which
touches every byte three or four times and pays page faults on each fresh allocation. Here:
- the gather goes into scratch buffers reused from step to step (`index_select(out=)`);
- no permute copies: for each KV head, the gathered [S, L, D] slice is a strided matrix BLAS
  reads directly (row stride Hkv * D), so one batched matmul per head computes its scores;
- the length / window mask is one additive bias per step, shared by all heads.
It is checked against `paged_attention_decode_ref` in tests/test_paged_attention_cpu.py.

`paged_attention_cpu` is the faster path when the C++ extension builds (kernels/csrc/,
kernels/cpu_ext.py): decodes and prompt chunks in one call, K/V read in place block by block,
no gather at all. The functions above stay as its fallback.
"""

from __future__ import annotations

import math

import torch

from kernels.cpu_ext import cpu_ops, use_cpu_kernels

_scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable scratch tensor of `shape`: grows to the largest step seen, never shrinks."""
    numel = math.prod(shape)
    buf = _scratch.get((name, dtype))
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first needed under inference_mode: an inference tensor
        # could not be written later by a caller outside it.
        with torch.inference_mode(False):
            buf = _scratch[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def paged_attention_decode_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence. query: [S, Hq, D] -> [S, Hq, D] (same contract as the ref)."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    dtype = query.dtype
    num_blocks = -(-int(seq_lens.max()) // block_size)
    length = num_blocks * block_size
    index = block_tables[:, :num_blocks].reshape(-1)
    shape = (num_seqs * num_blocks, block_size, num_kv_heads, head_dim)
    keys = torch.index_select(k_cache, 0, index, out=_buffer("k", shape, k_cache.dtype))
    values = torch.index_select(v_cache, 0, index, out=_buffer("v", shape, v_cache.dtype))
    keys = keys.view(num_seqs, length, num_kv_heads, head_dim).to(dtype)
    values = values.view(num_seqs, length, num_kv_heads, head_dim).to(dtype)

    key_pos = torch.arange(length)
    hidden = key_pos[None, :] >= seq_lens[:, None]
    if sliding_window is not None:
        hidden |= key_pos[None, :] < (seq_lens[:, None] - sliding_window)
    bias = torch.zeros(num_seqs, 1, length, dtype=dtype).masked_fill_(hidden[:, None], float("-inf"))

    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    out = torch.empty(num_kv_heads, num_seqs, group, head_dim, dtype=dtype)
    for h in range(num_kv_heads):   # a loop over heads (8 or so), never over tokens
        scores = torch.baddbmm(bias, q[:, h], keys[:, :, h].transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        torch.bmm(probs, values[:, :, h], out=out[h])
    return out.permute(1, 0, 2, 3).contiguous().view(num_seqs, num_heads, head_dim)


def scratch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-process scratch tensor reused across calls (see `_buffer`): for callers that
    consume the result before the next call with the same name, e.g. one layer's attention
    output, read by its o_proj before the next layer runs."""
    return _buffer(name, shape, dtype)


def cpu_attention_available() -> bool:
    """Whether `paged_attention_cpu` can run (the C++ extension built and loaded)."""
    return cpu_ops() is not None


def use_cpu_attention(query: torch.Tensor) -> bool:
    """Whether attention on `query` runs the C++ kernel: a CPU query in float32 (or bfloat16 /
    float16, which the attention layer converts to float32 and back around the kernel), the
    `auto` kernel backend (`torch` keeps the references) and an extension that built."""
    return use_cpu_kernels(query)


def paged_attention_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float,
                        sliding_window: int | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Decodes and prompt chunks of any lengths in one call (C++ kernel, fp32 compute).

    query: [T, Hq, D] float32, the sequences' tokens laid end to end; query_start_loc: [S + 1]
    int64 offsets into T; seq_lens: [S] tokens of each sequence in the cache after this step
    (its queries are the last q_len positions). The cache may be float32, float16 or bfloat16.
    Returns [T, Hq, D] float32 (into `out` when given, contiguous of that shape).
    """
    ops = cpu_ops()
    if ops is None:
        raise RuntimeError("the C++ CPU attention kernel is not available (see kernels/cpu_ext.py)")
    if out is None:
        out = torch.empty(query.shape, dtype=torch.float32)
    window = int(sliding_window) if sliding_window else 0
    ops.paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                        float(scale), window)
    return out
