"""Attention over the paged KV cache for a batch that mixes decodes and prompt chunks."""

from __future__ import annotations

import torch
import torch.nn as nn

from kernels import paged_attention_decode, paged_attention_prefill, write_kv_cache
from kernels.paged_attention_cpu import paged_attention_cpu, scratch_buffer, use_cpu_attention
from worker.attn_metadata import AttentionMetadata


class Attention(nn.Module):
    """Writes this step's K/V into the cache, then attends from it.

    The runner orders a batch decodes first, so decode tokens are the first
    `meta.num_decode_tokens` rows and prompt-chunk tokens the rest.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        """q: [T, Hq*D], k, v: [T, Hkv*D] -> [T, Hq*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if use_cpu_attention(q):
            # one C++ call for decodes and prompt chunks alike, in float32 (a half-precision
            # model's queries and outputs are converted around it: T x Hq x D elements, next
            # to the cache it reads); the buffers are shared by the layers (each o_proj reads
            # its input before the next layer writes it)
            out = scratch_buffer("attention_out", tuple(q.shape), torch.float32)
            q32 = q if q.dtype == torch.float32 else \
                scratch_buffer("attention_q", tuple(q.shape), torch.float32).copy_(q)
            paged_attention_cpu(q32, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                meta.query_start_loc_tensor, self.scale, self.sliding_window,
                                out=out)
            if q.dtype != torch.float32:
                out = scratch_buffer("attention_out_half", tuple(q.shape), q.dtype).copy_(out)
            return out.view(t, -1)
        nd = meta.num_decode_tokens
        if nd == t:
            out = paged_attention_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                         self.scale, self.sliding_window)
            return out.view(t, -1)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_attention_decode(
                q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                self.scale, self.sliding_window)
        out[nd:] = paged_attention_prefill(
            q[nd:], k_cache, v_cache, meta.block_tables[nd:], meta.prefill_query_start_loc,
            meta.prefill_seq_lens, self.scale, self.sliding_window, meta.prefill_tiles)
        return out.view(t, -1)
