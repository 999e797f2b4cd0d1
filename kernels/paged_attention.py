"""Attention over a paged KV cache: one-token decodes and multi-token prompt chunks.

The caller writes this step's keys and values into the cache first (kernels.write_kv_cache);
attention then reads every key, old and new, through the block tables. That is what lets a
prompt chunk attend to its earlier chunks and to prefix-cached blocks without special cases.

Shapes: the cache is [num_blocks, block_size, num_kv_heads, head_dim]; block_tables is
[num_seqs, max_blocks] (rows padded with any valid block id); seq_lens[i] is the number of
tokens of sequence i in the cache after this step's write, so the last query of sequence i
sits at position seq_lens[i] - 1. A sliding window w lets a query at position p see keys
p - w + 1 .. p (transformers' convention).

The Triton kernels live in kernels/paged_attention_decode.py and paged_attention_prefill.py;
this module holds the torch references and the dispatching functions the model calls.
"""

from __future__ import annotations

import torch

from kernels._triton import use_triton
from kernels.paged_attention_cpu import (paged_attention_cpu, paged_attention_decode_cpu,
                                         use_cpu_attention)
from kernels.paged_attention_decode import paged_attention_decode_triton
from kernels.paged_attention_prefill import paged_attention_prefill_triton


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[S, num_blocks * block_size, num_kv_heads, head_dim] for the first num_blocks of each row."""
    s = block_tables.shape[0]
    blocks = cache.index_select(0, block_tables[:, :num_blocks].reshape(-1))
    return blocks.view(s, num_blocks * cache.shape[1], *cache.shape[2:])


def paged_attention_decode_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence. query: [S, Hq, D] -> [S, Hq, D]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // k_cache.shape[1])
    # a half-precision cache under a float32 query: computed in the query's dtype
    keys = _gather_kv(k_cache, block_tables, num_blocks)[:, :max_len].to(query.dtype)
    values = _gather_kv(v_cache, block_tables, num_blocks)[:, :max_len].to(query.dtype)
    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * scale               # [S, Hkv, G, L]
    key_pos = torch.arange(max_len, device=query.device)
    visible = key_pos[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        visible &= key_pos[None, :] >= (seq_lens[:, None] - sliding_window)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))                    # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


def paged_attention_prefill_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: list[int],
                            seq_lens: list[int], scale: float,
                            sliding_window: int | None = None) -> torch.Tensor:
    """Prompt chunks of any lengths in one call; causal within a chunk, full over its prefix.

    query: [T, Hq, D], the chunks laid end to end; query_start_loc: S + 1 offsets into T.
    Returns [T, Hq, D].
    """
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        num_blocks = -(-seq_len // block_size)
        row = block_tables[i:i + 1]
        keys = _gather_kv(k_cache, row, num_blocks)[0, :seq_len].to(query.dtype)   # [L, Hkv, D]
        values = _gather_kv(v_cache, row, num_blocks)[0, :seq_len].to(query.dtype)
        q = query[start:end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(q, keys.permute(1, 2, 0)[:, None]) * scale    # [Hkv, G, Q, L]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        o = torch.matmul(probs, values.permute(1, 0, 2)[:, None])           # [Hkv, G, Q, D]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
    return out


def paged_attention_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence. query: [S, Hq, D] -> [S, Hq, D]."""
    if use_triton(query):
        fn = paged_attention_decode_triton
    elif use_cpu_attention(query):   # the C++ kernel: K/V read in place
        starts = torch.arange(query.shape[0] + 1, dtype=torch.int64)
        return paged_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, starts,
                                   scale, sliding_window)
    elif query.device.type == "cpu":
        fn = paged_attention_decode_cpu   # the reference's math, arranged for memory traffic
    else:
        fn = paged_attention_decode_ref
    return fn(query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)


def paged_attention_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: list[int],
                            seq_lens: list[int], scale: float,
                            sliding_window: int | None = None,
                            tiles: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Prompt chunks of any lengths in one call; causal within a chunk, full over its prefix.

    query: [T, Hq, D], the chunks laid end to end; query_start_loc: S + 1 offsets into T.
    Returns [T, Hq, D]. tiles: the Triton kernel's per-step metadata
    (kernels.paged_attention_prefill.prefill_tile_metadata), built once for all layers.
    """
    if use_cpu_attention(query) and not use_triton(query):
        return paged_attention_cpu(query, k_cache, v_cache, block_tables,
                                   torch.tensor(seq_lens, dtype=torch.int64),
                                   torch.tensor(query_start_loc, dtype=torch.int64), scale,
                                   sliding_window)
    if use_triton(query):
        return paged_attention_prefill_triton(query, k_cache, v_cache, block_tables,
                                              query_start_loc, seq_lens, scale,
                                              sliding_window, tiles)
    return paged_attention_prefill_ref(query, k_cache, v_cache, block_tables, query_start_loc,
                                       seq_lens, scale, sliding_window)
