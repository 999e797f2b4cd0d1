"""The C++ CPU paged-attention kernel against the torch references, every element.

Grid: fp32/fp16/bf16/fp8 (e4m3fn, e5m2) caches, GQA 1/2/3/4, head sizes 64/80/128, block sizes 16/32, with and
without a sliding window, scattered blocks, a batch mixing decodes with prompt chunks of
several lengths (some with a cached prefix), and an output poisoned with NaN first so an
element the kernel forgets to write fails.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from kernels.paged_attention import paged_attention_decode_ref, paged_attention_prefill_ref
from kernels.paged_attention_cpu import cpu_attention_available, paged_attention_cpu

# Without a compiler the engine runs the torch path (and says so); with one, the build must work.
pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: the engine falls back to the torch path")


CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def test_cpu_kernel_builds():
    assert cpu_attention_available()

# (query tokens this step, tokens in the cache after it): 3 decodes, then prompt chunks
# (a whole prompt, chunks after a cached prefix, a one-token chunk after the decodes)
BATCH = [(1, 1), (1, 37), (1, 70), (5, 5), (17, 60), (1, 9), (40, 100)]
# Long prompt chunks: several query tiles (64 rows) and key spans (64 keys) per item, chunks
# after a prefix that does not end on a span, a chunk of exactly one tile, and short chunks
# either side of the vector width (the kernel's switch between its two paths).
LONG = [(1, 200), (1, 333), (150, 240), (64, 64), (8, 8), (3, 300), (97, 130), (16, 40)]


def _case(dtype, heads, kv_heads, head_dim, block_size, seed=0, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(batch)
    width = max(-(-n // block_size) for _, n in batch)
    num_blocks = num_seqs * width + 5
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:num_seqs * width].view(num_seqs, width)
    q = torch.randn(sum(t for t, _ in batch), heads, head_dim, generator=g)
    starts = [0]
    for t, _ in batch:
        starts.append(starts[-1] + t)
    return q, k, v, tables, starts


def _reference(q, k, v, tables, starts, scale, window, batch=BATCH):
    """The leading decodes through the decode reference, the rest through the prefill one."""
    kf, vf = k.float(), v.float()
    seq_lens = [n for _, n in batch]
    nd = next(i for i, (t, _) in enumerate(batch) if t > 1)
    dec = paged_attention_decode_ref(q[:nd], kf, vf, tables[:nd], torch.tensor(seq_lens[:nd]),
                                     scale, window)
    pre = paged_attention_prefill_ref(q[nd:], kf, vf, tables[nd:],
                                      [s - starts[nd] for s in starts[nd:]], seq_lens[nd:],
                                      scale, window)
    return torch.cat([dec, pre])


def _grid(windows: list[int | None]):
    """The issue's grid: cache dtype x GQA group x head size x block size x window."""
    marks = [pytest.mark.parametrize("dtype", CACHE_DTYPES),
             pytest.mark.parametrize("group", [1, 2, 3, 4]),   # 3: SmolLM2
             pytest.mark.parametrize("head_dim", [64, 80, 128]),
             pytest.mark.parametrize("block_size", [16, 32]),
             pytest.mark.parametrize("window", windows)]

    def apply(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn
    return apply


@_grid(windows=[None, 7, 33])
def test_cpu_kernel_matches_reference(dtype, group, head_dim, block_size, window):
    _check_against_reference(dtype, group, 2, head_dim, block_size, window, seed=0, batch=BATCH)


@_grid(windows=[None, 33, 100])
def test_cpu_kernel_long_chunks(dtype, group, head_dim, block_size, window):
    _check_against_reference(dtype, group, 2, head_dim, block_size, window, seed=4, batch=LONG)


def _check_against_reference(dtype, group, kv_heads, head_dim, block_size, window, seed, batch):
    """The kernel's output, poisoned with NaN first, against the references, every element."""
    q, k, v, tables, starts = _case(dtype, kv_heads * group, kv_heads, head_dim, block_size,
                                    seed=seed, batch=batch)
    scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"))
    paged_attention_cpu(q, k, v, tables, torch.tensor([n for _, n in batch]),
                        torch.tensor(starts), scale, window, out=out)
    ref = _reference(q, k, v, tables, starts, scale, window, batch=batch)
    # the cache values are the same numbers in both (the ref upcasts them): fp32 tolerance
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# Enough decodes that every item keeps all its KV heads (the decode path then takes four
# heads' dot products at a time when a KV head has one query row), six KV heads (four at a
# time, then two), contexts either side of the 64-key span; a prompt chunk closes the batch.
MANY = [(1, n) for n in (1, 3, 16, 17, 31, 64, 65, 90, 128, 129, 150, 200)] + [(20, 70)]


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("window", [None, 33])
def test_cpu_kernel_decodes_with_many_kv_heads(dtype, group, head_dim, window):
    _check_against_reference(dtype, group, 6, head_dim, 16, window, seed=6, batch=MANY)


def test_cpu_kernel_long_chunks_ignore_unused_slots():
    """NaN in every slot no sequence uses, with long chunks (the prompt path reads fp32 rows
    in place and pads spans with zero keys): nothing of them may leak."""
    q, k, v, tables, starts = _case(torch.float32, 4, 2, 64, 16, seed=5, batch=LONG)
    used = torch.zeros(k.shape[0] * 16, dtype=torch.bool)
    for i, (_, n) in enumerate(LONG):
        for pos in range(n):
            used[int(tables[i, pos // 16]) * 16 + pos % 16] = True
    ref = _reference(q, k, v, tables, starts, 0.125, None, batch=LONG)
    for cache in (k, v):
        cache.view(-1, 2, 64)[~used] = float("nan")
    out = paged_attention_cpu(q, k, v, tables, torch.tensor([n for _, n in LONG]),
                              torch.tensor(starts), 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_cpu_kernel_strided_query_and_table_rows():
    """A query that is a column slice of a fused qkv output, block-table rows of a wider table."""
    q, k, v, tables, starts = _case(torch.float32, 4, 2, 64, 16, seed=1)
    qkv = torch.randn(q.shape[0], 3, 4, 64)
    qkv[:, 0] = q
    wide = torch.cat([tables, torch.zeros(tables.shape[0], 3, dtype=torch.int64)], 1)
    out = paged_attention_cpu(qkv[:, 0], k, v, wide[:, :tables.shape[1]],
                              torch.tensor([n for _, n in BATCH]), torch.tensor(starts), 0.125)
    torch.testing.assert_close(out, _reference(q, k, v, tables, starts, 0.125, None),
                               atol=2e-5, rtol=2e-5)


def test_cpu_kernel_ignores_unused_cache_slots():
    """Slots past seq_len and blocks no table points at hold NaN: nothing of them may leak."""
    q, k, v, tables, starts = _case(torch.float32, 4, 2, 64, 16, seed=2)
    used = torch.zeros(k.shape[0] * 16, dtype=torch.bool)
    for i, (_, n) in enumerate(BATCH):
        for pos in range(n):
            used[int(tables[i, pos // 16]) * 16 + pos % 16] = True
    ref = _reference(q, k, v, tables, starts, 0.125, None)
    for cache in (k, v):
        cache.view(-1, 2, 64)[~used] = float("nan")
    out = paged_attention_cpu(q, k, v, tables, torch.tensor([n for _, n in BATCH]),
                              torch.tensor(starts), 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_cpu_kernel_rejects_bad_shapes():
    q, k, v, tables, starts = _case(torch.float32, 4, 2, 64, 16)
    lens = torch.tensor([n for _, n in BATCH])
    with pytest.raises(RuntimeError, match="block table too short"):
        paged_attention_cpu(q, k, v, tables[:, :1], lens, torch.tensor(starts), 0.125)
    with pytest.raises(RuntimeError, match="query_start_loc"):
        paged_attention_cpu(q, k, v, tables, lens, torch.tensor(starts[:-1] + [starts[-1] - 1]),
                            0.125)
    with pytest.raises(RuntimeError, match="head"):
        paged_attention_cpu(q[:, :3], k, v, tables, lens, torch.tensor(starts), 0.125)


def test_cpu_kernel_fp16_cache_extremes():
    """fp16 caches converted exactly at the edges: subnormal values and values near 65504."""
    q, k, v, tables, starts = _case(torch.float16, 4, 2, 64, 16, seed=3)
    k = (k.float() * 1e-6).half()          # mostly fp16 subnormals (below 6.1e-5)
    v = (v.float().clamp(-1, 1) * 65000).half()
    assert (k.float().abs() < 6.1e-5).float().mean() > 0.9
    q = q * 1e5
    out = paged_attention_cpu(q, k, v, tables, torch.tensor([n for _, n in BATCH]),
                              torch.tensor(starts), 0.125)
    ref = _reference(q, k, v, tables, starts, 0.125, None)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("head_dim", [64, 68])   # 68: a scalar tail after the vectors
def test_cpu_kernel_reads_every_fp8_value(dtype, head_dim):
    """One key per sequence: the output is its V row, so every one of the 256 fp8 bit
    patterns (NaNs, infinities, subnormals, both zeros) must come out as torch converts it."""
    heads = 256 // head_dim + 1
    v = torch.zeros(1, 16, heads, head_dim, dtype=torch.uint8)
    v.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    v = v.view(dtype)
    k = torch.zeros_like(v)
    q = torch.randn(1, heads, head_dim)
    out = paged_attention_cpu(q, k, v, torch.zeros(1, 1, dtype=torch.int64), torch.tensor([1]),
                              torch.tensor([0, 1]), 0.125)
    expect = v[0, 0].float()
    assert torch.equal(out[0].isnan(), expect.isnan())
    assert torch.equal(out[0].nan_to_num(), expect.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_cpu_kernel_peaked_softmax(dtype):
    """Scores spread ~80 wide: probabilities down to ~1e-38, whose products with V the kernel
    flushes to zero (MXCSR.FTZ, for speed): the output still matches the references."""
    q, k, v, tables, starts = _case(dtype, 4, 2, 64, 16, seed=7, batch=LONG)
    k = (k.float() * 10).to(dtype)
    out = paged_attention_cpu(q, k, v, tables, torch.tensor([n for _, n in LONG]),
                              torch.tensor(starts), 0.125)
    ref = _reference(q, k, v, tables, starts, 0.125, None, batch=LONG)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
