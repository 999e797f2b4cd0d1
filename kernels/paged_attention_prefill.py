"""Triton paged attention for prompt chunks of any lengths in one launch (reference and
dispatch in kernels/paged_attention.py).

The grid is (query tile, query head): every chunk is cut into tiles of PREFILL_BLOCK_M query
tokens, and one small int32 tensor (`prefill_tile_metadata`) holds each tile's sequence and
first query plus each sequence's query offsets and length. The model runner builds it once per
step with the attention metadata (every layer shares it: one host-to-device copy per step, not
one per layer); the launcher builds it itself when called without it. A tile attends to the cached prefix in full and to
its own chunk causally, reading keys through the block table like the decode kernel (whose
online-softmax step `_attend_tile` it shares).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels._triton import INTERPRET, check, check_device, pow2, tl, triton
from kernels.paged_attention_decode import (LOG2E, _attend_tile, check_paged_inputs,
                                            dot_precision, upcast)


@triton.jit
def _paged_prefill_kernel(
    q_ptr,            # [T, Hq, D], strides stride_qt, stride_qh, 1
    k_cache_ptr,      # [num_blocks, block_size, Hkv, D], strides stride_kb, stride_kt, stride_kh, 1
    v_cache_ptr,      # [num_blocks, block_size, Hkv, D], same strides as k_cache
    tables_ptr,       # [S, max_blocks] int32/int64, row stride stride_bt
    query_start_ptr,  # [S + 1] int32, chunk offsets into T
    seq_lens_ptr,     # [S] int32, tokens in cache after this step
    tile_seq_ptr,     # [num_tiles] int32, the sequence of each query tile
    tile_start_ptr,   # [num_tiles] int32, the tile's first query within its chunk
    out_ptr,          # [T, Hq, D] contiguous, row stride stride_ot
    scale_log2, window, group, head_dim, block_size,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
    m_start = tl.load(tile_start_ptr + tile)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len                      # cached tokens before this chunk

    m = m_start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rows = (q_begin + m).to(tl.int64)
    q_mask = (m[:, None] < q_len) & (d[None, :] < head_dim)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=q_mask,
                other=0.0)
    if UPCAST:   # see kernels/paged_attention_decode.py
        q = q.to(tl.float32)
    q_pos = context + m

    # Keys past the tile's last query are masked for every row: stop there.
    hi = tl.minimum(seq_len, context + m_start + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(context + m_start - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_bt, kv_head, start, lo, hi,
            q_pos, window, m_i, l_i, acc, scale_log2, stride_kb, stride_kt, stride_kh,
            block_size, head_dim, BLOCK_N, BLOCK_D, HAS_WINDOW, True, DOT_PRECISION, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * head_dim + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


# Small tiles under the interpreter keep the CPU tests fast; 64 feeds the tensor cores.
PREFILL_BLOCK_M = 16 if INTERPRET else 64


def prefill_tile_metadata(query_start_loc: Sequence[int], seq_lens: Sequence[int],
                          device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(query_start_loc, seq_lens, tile_seq, tile_start) as int32 views of one device tensor,
    copied from pinned memory without waiting on CUDA (one copy per step)."""
    tile_seq: list[int] = []
    tile_start: list[int] = []
    for i in range(len(seq_lens)):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        starts = range(0, q_len, PREFILL_BLOCK_M)
        tile_seq.extend([i] * len(starts))
        tile_start.extend(starts)
    packed = torch.tensor([*query_start_loc, *seq_lens, *tile_seq, *tile_start],
                          dtype=torch.int32)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    s, n = len(seq_lens), len(tile_seq)
    return (packed[:s + 1], packed[s + 1:2 * s + 1], packed[2 * s + 1:2 * s + 1 + n],
            packed[2 * s + 1 + n:])


def prefill_meta(head_dim: int, dtype: torch.dtype) -> dict[str, object]:
    """The prefill kernel's compile-time parameters (also compiled by the Hopper test)."""
    return dict(BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=32, BLOCK_D=max(16, pow2(head_dim)),
                DOT_PRECISION=dot_precision(dtype), UPCAST=upcast(dtype),
                num_warps=8 if head_dim > 64 else 4)


def paged_attention_prefill_triton(query: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, block_tables: torch.Tensor,
                                   query_start_loc: Sequence[int], seq_lens: Sequence[int],
                                   scale: float, sliding_window: int | None = None,
                                   tiles: tuple[torch.Tensor, ...] | None = None
                                   ) -> torch.Tensor:
    """Prompt chunks laid end to end in query [T, Hq, D] -> [T, Hq, D] (see the reference).
    tiles: prefill_tile_metadata(query_start_loc, seq_lens) when the caller has it."""
    op = "paged_attention_prefill"
    check_paged_inputs(op, query, k_cache, v_cache, block_tables)
    total, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    query_start_loc, seq_lens = [int(x) for x in query_start_loc], [int(x) for x in seq_lens]
    num_seqs = len(seq_lens)
    check(len(query_start_loc) == num_seqs + 1 and query_start_loc[0] == 0
          and query_start_loc[-1] == total, op,
          f"query_start_loc must be {num_seqs + 1} offsets from 0 to {total}, "
          f"got {query_start_loc}")
    q_lens = [b - a for a, b in zip(query_start_loc, query_start_loc[1:])]
    check(all(0 <= q <= n for q, n in zip(q_lens, seq_lens)), op,
          f"each chunk must fit its sequence: chunk lengths {q_lens}, seq_lens {seq_lens}")
    check(block_tables.shape[0] >= num_seqs, op,
          f"{block_tables.shape[0]} block-table rows for {num_seqs} sequences")
    check(max(seq_lens, default=0) <= block_tables.shape[1] * block_size, op,
          f"block tables of {block_tables.shape[1]} blocks cannot hold {max(seq_lens)} tokens")
    check(sliding_window is None or sliding_window > 0, op, "sliding_window must be positive")
    check_device(op, query, k_cache, v_cache, block_tables)
    out = torch.empty(total, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if total == 0:
        return out
    if tiles is None:
        tiles = prefill_tile_metadata(query_start_loc, seq_lens, query.device)
    qsl, lens, tile_seq, tile_start = tiles
    check(qsl.shape[0] == num_seqs + 1 and lens.shape[0] == num_seqs, op,
          f"tile metadata for {qsl.shape[0] - 1} sequences, not {num_seqs}")
    check_device(op, query, qsl)
    _paged_prefill_kernel[(tile_seq.shape[0], num_heads)](
        query, k_cache, v_cache, block_tables, qsl, lens, tile_seq, tile_start, out,
        scale * LOG2E, sliding_window or 0, num_heads // num_kv_heads, head_dim, block_size,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), out.stride(0),
        HAS_WINDOW=sliding_window is not None, **prefill_meta(head_dim, query.dtype))
    return out
