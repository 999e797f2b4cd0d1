"""Triton paged attention for decode: one query token per sequence (reference and dispatch in
kernels/paged_attention.py).

One program per (sequence, KV head) serves all of that KV head's query heads (the GQA group,
padded to a tile of at least 16 rows so that tl.dot applies), so each key and value is read
from memory once. Keys are walked in tiles of BLOCK_N tokens; each token finds its cache block
through the block table, so any cache block size works and a tile may span several blocks.
Softmax is the streaming (online) one, in float32 and base 2.

Split-KV: few sequences leave most of a GPU idle (one program per (sequence, KV head)), so the
launcher may cut each sequence's keys into `num_splits` ranges of whole tiles, one program
each (grid (S, Hkv, splits)); each writes its unnormalised partial output with its running max
and sum, and a second kernel merges them. The split count depends only on shapes known on the
host (batch, heads, block-table width), never on seq_lens' values: no sync, graph-capturable.

Operands: on a GPU the dots take q, K, V (and the probabilities) in the model's dtype with
float32 accumulation: bf16/fp16 tensor cores run twice the tf32 rate, in half the registers.
Triton's interpreter (the CPU tests) computes half-precision dots with numpy, which has no
bf16, so there (`UPCAST`) every operand is converted to float32 first; float32 models take the
same path either way.
"""

from __future__ import annotations

import functools

import torch

from kernels._triton import INTERPRET, check, check_device, check_float, check_index, pow2, tl, triton

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256   # a block-table row must hold this many tokens per split
MAX_SPLITS = 32


@triton.jit
def _attend_tile(
    q,                # [rows, BLOCK_D] in the cache's dtype (float32 if UPCAST)
    k_cache_ptr,      # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,      # [num_blocks, block_size, Hkv, D]
    table_ptr,        # [max_blocks] this sequence's block-table row
    kv_head, start, lo, hi, q_pos,   # keys in [lo, hi) visible; q_pos: [BLOCK_G] positions
    window, m_i, l_i, acc, scale_log2,
    stride_kb, stride_kt, stride_kh, block_size, head_dim,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One step of the online softmax over keys start .. start + BLOCK_N - 1; also used by
    the prefill kernel, where q holds BLOCK_M query tokens of one head. Scores are scaled
    by scale * log2(e) after the dot, in float32."""
    pos = start + tl.arange(0, BLOCK_N)
    in_range = (pos >= lo) & (pos < hi)
    # int64: block_id * stride_kb passes 2**31 on large caches.
    block = tl.load(table_ptr + pos // block_size, mask=in_range, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    offs = (block * stride_kb + (pos % block_size) * stride_kt + kv_head * stride_kh)[:, None] \
        + d[None, :]
    kv_mask = in_range[:, None] & (d[None, :] < head_dim)
    k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)                    # [BLOCK_N, BLOCK_D]
    v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2      # [rows, BLOCK_N]
    visible = in_range[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (pos[None, :] > q_pos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 so that exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,            # [S, Hq, D], strides stride_qs, stride_qh, 1
    k_cache_ptr,      # [num_blocks, block_size, Hkv, D], strides stride_kb, stride_kt, stride_kh, 1
    v_cache_ptr,      # [num_blocks, block_size, Hkv, D], same strides as k_cache
    tables_ptr,       # [S, max_blocks] int32/int64, row stride stride_bt
    seq_lens_ptr,     # [S] int32/int64
    out_ptr,          # [S, Hq, D] contiguous, row stride stride_os
    part_acc_ptr,     # SPLIT: [S, Hkv, splits, BLOCK_G, BLOCK_D] float32 partial outputs
    part_ml_ptr,      # SPLIT: [S, Hkv, splits, 2, BLOCK_G] float32 running max, sum
    scale_log2, window, group, head_dim, block_size, num_splits,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_os,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    q_mask = (g[:, None] < group) & (d[None, :] < head_dim)
    q_offs = seq * stride_qs + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    hi = seq_len
    if SPLIT:   # this program's share: whole tiles of this sequence's own visible keys
        split = tl.program_id(2)
        chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
        first = lo + split * chunk
        lo = tl.minimum(first, seq_len)
        hi = tl.minimum(first + chunk, seq_len)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_bt, kv_head, start, lo,
            hi, q_pos, window, m_i, l_i, acc, scale_log2, stride_kb, stride_kt, stride_kh,
            block_size, head_dim, BLOCK_N, BLOCK_D, HAS_WINDOW, False, DOT_PRECISION, UPCAST)
    if SPLIT:   # every tile written, empty ranges too (m = -inf, l = 0): the merge reads all
        part = (seq * tl.num_programs(1) + kv_head) * num_splits + tl.program_id(2)
        tl.store(part_ml_ptr + part * 2 * BLOCK_G + g, m_i)
        tl.store(part_ml_ptr + part * 2 * BLOCK_G + BLOCK_G + g, l_i)
        tl.store(part_acc_ptr + part * BLOCK_G * BLOCK_D + g[:, None] * BLOCK_D + d[None, :], acc)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]   # an empty sequence gives zeros
        out_offs = seq * stride_os + heads[:, None] * head_dim + d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _paged_decode_merge_kernel(
    part_acc_ptr, part_ml_ptr,   # the split kernel's partials (see above)
    out_ptr,                     # [S, Hq, D] contiguous, row stride stride_os
    group, head_dim, num_splits, stride_os,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of one (sequence, KV head): the online-softmax rescaling, per split."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    first = (seq * tl.num_programs(1) + kv_head) * num_splits
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s in range(num_splits):
        part = first + s
        m_s = tl.load(part_ml_ptr + part * 2 * BLOCK_G + g)
        l_s = tl.load(part_ml_ptr + part * 2 * BLOCK_G + BLOCK_G + g)
        a_s = tl.load(part_acc_ptr + part * BLOCK_G * BLOCK_D + g[:, None] * BLOCK_D + d[None, :])
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # both empty: weights 0, no NaN
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l = l * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    heads = kv_head * group + g
    mask = (g[:, None] < group) & (d[None, :] < head_dim)
    tl.store(out_ptr + seq * stride_os + heads[:, None] * head_dim + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(num_seqs: int, num_kv_heads: int, capacity: int, device: torch.device) -> int:
    """Key ranges per (sequence, KV head): enough programs for two per SM, where a block-table
    row (`capacity` tokens) is long enough to share. 1 on the interpreter."""
    if device.type != "cuda" or INTERPRET:
        return 1
    want = -(-2 * _sm_count(device) // max(1, num_seqs * num_kv_heads))
    return max(1, min(want, capacity // MIN_SPLIT_TOKENS, MAX_SPLITS))


def decode_meta(head_dim: int, group: int, dtype: torch.dtype) -> dict[str, object]:
    """The decode kernel's compile-time parameters for a shape (the Hopper compile test
    compiles the same ones)."""
    return dict(BLOCK_G=max(16, pow2(group)), BLOCK_N=32 if head_dim <= 128 else 16,
                BLOCK_D=max(16, pow2(head_dim)), DOT_PRECISION=dot_precision(dtype),
                UPCAST=upcast(dtype), num_warps=4)


def upcast(dtype: torch.dtype) -> bool:
    """Whether the attention dots take float32 operands (module doc)."""
    return INTERPRET or dtype == torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    # float32 models compare exactly against the reference; half-precision operands have no
    # use for the setting (it picks tf32 or not for float32 operands only).
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_inputs(op: str, query: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Shared by the decode and prefill launchers."""
    check(query.dim() == 3, op, f"query must be [T, Hq, D], got shape {tuple(query.shape)}")
    check(k_cache.dim() == 4, op, f"k_cache must be [num_blocks, block_size, Hkv, D], got "
          f"shape {tuple(k_cache.shape)}")
    _, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    check(k_cache.shape[3] == head_dim, op, f"head_dim of query ({head_dim}) and cache "
          f"({k_cache.shape[3]}) differ")
    check(num_heads % num_kv_heads == 0, op, f"{num_heads} query heads are not a multiple of "
          f"{num_kv_heads} KV heads")
    check(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), op,
          "v_cache must have k_cache's shape and strides")
    check(query.stride(2) == 1 and k_cache.stride(3) == 1, op,
          "query and caches must be contiguous in head_dim")
    check_float(op, "query", query)
    check(k_cache.dtype == query.dtype and v_cache.dtype == query.dtype, op,
          f"cache dtype {k_cache.dtype}/{v_cache.dtype} != query dtype {query.dtype}")
    check_index(op, "block_tables", block_tables, 2)
    check(head_dim <= 256, op, f"head_dim {head_dim} above 256")


def paged_attention_decode_triton(query: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None,
                                  num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence. query: [S, Hq, D] -> [S, Hq, D] (see the reference).
    num_splits: key ranges per sequence (module doc); None: decode_splits decides."""
    op = "paged_attention_decode"
    check_paged_inputs(op, query, k_cache, v_cache, block_tables)
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    check_index(op, "seq_lens", seq_lens, 1)
    check(seq_lens.shape[0] == num_seqs and block_tables.shape[0] == num_seqs, op,
          f"{num_seqs} queries, {seq_lens.shape[0]} seq_lens, {block_tables.shape[0]} "
          f"block-table rows")
    check(sliding_window is None or sliding_window > 0, op, "sliding_window must be positive")
    check(num_splits is None or num_splits >= 1, op, f"num_splits must be >= 1, got {num_splits}")
    check_device(op, query, k_cache, v_cache, block_tables, seq_lens)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    meta = decode_meta(head_dim, group, query.dtype)
    splits = num_splits or decode_splits(num_seqs, num_kv_heads,
                                         block_tables.shape[1] * k_cache.shape[1], query.device)
    part_acc = part_ml = out   # unused without splits
    if splits > 1:
        rows = num_seqs * num_kv_heads * splits * meta["BLOCK_G"]
        part_acc = torch.empty(rows * meta["BLOCK_D"], dtype=torch.float32, device=query.device)
        part_ml = torch.empty(rows * 2, dtype=torch.float32, device=query.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads, splits)](
        query, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml, scale * LOG2E,
        sliding_window or 0, group, head_dim, k_cache.shape[1], splits,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), out.stride(0),
        HAS_WINDOW=sliding_window is not None, SPLIT=splits > 1, **meta)
    if splits > 1:
        _paged_decode_merge_kernel[(num_seqs, num_kv_heads)](
            part_acc, part_ml, out, group, head_dim, splits, out.stride(0),
            BLOCK_G=meta["BLOCK_G"], BLOCK_D=meta["BLOCK_D"], num_warps=4)
    return out
