"""Per-step Python cost of the KV block manager for a full decode batch (a micro-check, not a test).

Each step, every one of 256 running requests calls `allocate_slots` (a new block on one step in
16) and `cache_blocks` (registers a block when one fills), as the scheduler does. The baseline in
the same run is the bare loop with one no-op method call per request, so the ratio survives a
noisy machine. Also times prefix lookup of a long prompt (hashing dominates).

    .venv/bin/python benchmarks/block_manager_overhead.py
"""

from __future__ import annotations

import random
import time

from scheduler.kv_cache_manager import KVCacheManager

NUM_REQS = 256
BLOCK_SIZE = 16
PROMPT_LEN = 500
STEPS = 256


class _Noop:
    def call(self, request_id: str, a: int, b: int) -> None:
        return None


def decode_steps() -> tuple[float, float]:
    rng = random.Random(0)
    max_len = PROMPT_LEN + STEPS + 1
    kv = KVCacheManager(NUM_REQS * (-(-max_len // BLOCK_SIZE)) + 8, BLOCK_SIZE, hash_seed=0)
    seqs = {f"req-{i}": [rng.randrange(32000) for _ in range(PROMPT_LEN)] for i in range(NUM_REQS)}
    for rid, toks in seqs.items():
        hits, n_cached = kv.get_computed_blocks(rid, toks)
        assert kv.allocate_slots(rid, len(toks) - n_cached, n_cached, hits) is not None
        kv.cache_blocks(rid, toks, len(toks))
        toks.append(rng.randrange(32000))
    items = list(seqs.items())
    noop = _Noop()

    t_mgr = t_base = 0.0
    for step in range(STEPS):
        computed = PROMPT_LEN + step
        t0 = time.perf_counter()
        for rid, toks in items:
            new = kv.allocate_slots(rid, 1, computed)
            assert new is not None
            kv.cache_blocks(rid, toks, computed + 1)
        t1 = time.perf_counter()
        for rid, toks in items:
            noop.call(rid, 1, computed)
        t2 = time.perf_counter()
        t_mgr += t1 - t0
        t_base += t2 - t1
        for _, toks in items:
            toks.append(step)  # the "sampled" token
    n = STEPS * NUM_REQS
    return t_mgr / n * 1e6, t_base / n * 1e6


def long_prompt_lookup(num_tokens: int = 32768) -> tuple[float, float]:
    kv = KVCacheManager(num_tokens // BLOCK_SIZE + 8, BLOCK_SIZE, hash_seed=0)
    prompt = list(range(num_tokens))
    t0 = time.perf_counter()
    kv.cache_blocks("a", prompt, 0)  # no table: no-op
    kv.allocate_slots("a", num_tokens, 0)
    kv.cache_blocks("a", prompt, num_tokens)  # hashes and registers every block
    t1 = time.perf_counter()
    hits, _ = kv.get_computed_blocks("b", prompt + [1])  # hashes again (new request) + full hit
    t2 = time.perf_counter()
    assert len(hits) == num_tokens // BLOCK_SIZE
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


if __name__ == "__main__":
    mgr_us, base_us = decode_steps()
    print(f"decode step, {NUM_REQS} requests, block size {BLOCK_SIZE}:")
    print(f"  allocate_slots + cache_blocks: {mgr_us:.3f} us/request ({mgr_us * NUM_REQS:.0f} us/step)")
    print(f"  baseline (one no-op call):     {base_us:.3f} us/request  -> ratio {mgr_us / base_us:.1f}x")
    cache_ms, lookup_ms = long_prompt_lookup()
    print("32k-token prompt: cache_blocks (hash + register) "
          f"{cache_ms:.1f} ms, get_computed_blocks full hit {lookup_ms:.1f} ms")
