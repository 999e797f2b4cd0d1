"""KVCacheManager stories: block size 4, exact block ids and counters after every step."""

from __future__ import annotations

import pytest

import scheduler.kv_cache_manager as kvm
from scheduler.kv_cache_manager import KVCacheManager

BS = 4
PROMPT_A = list(range(100, 110))  # 2.5 blocks: [100..103] [104..107] [108 109]


def _manager(num_blocks: int = 10, **kw: object) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, hash_seed=1234, **kw)  # type: ignore[arg-type]


def _admit(kv: KVCacheManager, rid: str, prompt: list[int], salt: str | None = None) -> list[int] | None:
    """Prefill a whole prompt in one step, the way the scheduler does, and cache its blocks."""
    hits, num_cached = kv.get_computed_blocks(rid, prompt, salt)
    new = kv.allocate_slots(rid, len(prompt) - num_cached, num_cached, hits)
    if new is not None:
        kv.cache_blocks(rid, prompt, len(prompt))
    return new


def test_prefix_is_shared_between_requests_and_counted() -> None:
    kv = _manager()
    assert kv.get_computed_blocks("A", PROMPT_A) == ([], 0)
    assert (kv.prefix_queries, kv.prefix_hits) == (10, 0)
    assert kv.allocate_slots("A", 10, 0) == [0, 1, 2]
    kv.cache_blocks("A", PROMPT_A, 10)  # blocks 0 and 1 are full; 2 holds two tokens

    prompt_b = PROMPT_A[:8] + [7, 7, 7]
    hits, num_cached = kv.get_computed_blocks("B", prompt_b)
    assert (hits, num_cached) == ([0, 1], 8)
    assert (kv.prefix_queries, kv.prefix_hits) == (21, 8)
    # The lookup takes no reference; allocation does.
    assert [kv.pool.ref_count(b) for b in (0, 1)] == [1, 1]
    assert kv.allocate_slots("B", 3, 8, hits) == [0, 1, 3]
    assert kv.get_block_ids("B") == [0, 1, 3]
    assert [kv.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.num_blocks_in_use == 4 and kv.num_free_blocks == 6


def test_the_whole_prompt_is_never_a_hit() -> None:
    kv = _manager()
    _admit(kv, "A", PROMPT_A)
    # Exactly two blocks, both cached: the last block is recomputed so the model has a position
    # to produce logits from.
    assert kv.get_computed_blocks("C", PROMPT_A[:8]) == ([0], 4)
    assert kv.get_computed_blocks("D", PROMPT_A[:9]) == ([0, 1], 8)
    assert kv.get_computed_blocks("E", PROMPT_A[:3]) == ([], 0)
    assert kv.get_computed_blocks("F", []) == ([], 0)


def test_cache_salt_and_parent_block_are_part_of_a_blocks_identity() -> None:
    kv = _manager()
    _admit(kv, "A", PROMPT_A, salt="tenant-1")
    assert kv.get_computed_blocks("same-tenant", PROMPT_A, "tenant-1") == ([0, 1], 8)
    assert kv.get_computed_blocks("other-tenant", PROMPT_A, "tenant-2") == ([], 0)
    assert kv.get_computed_blocks("no-tenant", PROMPT_A) == ([], 0)

    # Y's first block is X's (cached) and its second block has the tokens of A's cached block 1:
    # the lookup must stop after X's block, since A's block 1 follows a different parent.
    assert _admit(kv, "X", [5, 5, 5, 5, 0], salt="tenant-1") == [3, 4]
    assert kv.get_computed_blocks("Y", [5, 5, 5, 5] + PROMPT_A[4:10], "tenant-1") == ([3], 4)


def test_a_request_that_skipped_the_lookup_gives_its_salt_to_cache_blocks() -> None:
    kv = _manager()
    assert kv.allocate_slots("A", 10, 0) == [0, 1, 2]
    kv.cache_blocks("A", PROMPT_A, 10, cache_salt="tenant-1")
    assert kv.get_computed_blocks("B", PROMPT_A, "tenant-1") == ([0, 1], 8)
    assert kv.get_computed_blocks("C", PROMPT_A) == ([], 0)


def test_decode_fast_path_new_blocks_and_caching_of_generated_tokens() -> None:
    kv = _manager()
    assert _admit(kv, "A", PROMPT_A) == [0, 1, 2]
    seq = list(PROMPT_A)
    # Decode steps: each computes the token sampled last step. Block 2 fills at 12 tokens.
    for computed, token in [(10, 50), (11, 51)]:
        seq.append(token)
        assert kv.allocate_slots("A", 1, computed) == []
        kv.cache_blocks("A", seq, computed + 1)
    seq.append(52)
    assert kv.allocate_slots("A", 1, 12) == [3]
    kv.cache_blocks("A", seq, 13)
    assert kv.get_block_ids("A") == [0, 1, 2, 3]
    # Generated tokens are cached like prompt tokens (a multi-turn follow-up hits them).
    assert kv.get_computed_blocks("B", seq[:12] + [9]) == ([0, 1, 2], 12)


def test_free_releases_the_tail_first_so_shared_prefixes_are_evicted_last() -> None:
    kv = _manager(num_blocks=8)
    _admit(kv, "A", PROMPT_A)  # [0, 1, 2]
    assert _admit(kv, "B", PROMPT_A[:8] + [7, 7, 7]) == [0, 1, 3]
    kv.free("A")  # 0 and 1 still held by B: only A's tail goes
    assert kv.pool.free_queue_order() == [4, 5, 6, 7, 2]
    kv.free("B")
    assert kv.pool.free_queue_order() == [4, 5, 6, 7, 2, 3, 1, 0]
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    assert kv.get_block_ids("B") == []
    kv.free("never-admitted")  # an abort before admission is a no-op

    # Still cached while free; a hit revives them without any fresh allocation beyond the tail.
    assert kv.get_computed_blocks("C", PROMPT_A) == ([0, 1], 8)
    # Reusing blocks evicts them in LRU order: never-used ones, then A's tail, then B's tail,
    # then the prefix. Taking 6 blocks evicts block 1, so the chain now stops at block 0.
    assert kv.allocate_slots("D", 24, 0) == [4, 5, 6, 7, 2, 3]
    assert kv.allocate_slots("D", 1, 24) == [1]
    assert kv.get_computed_blocks("C", PROMPT_A) == ([0], 4)


def test_allocation_is_all_or_nothing_when_blocks_run_short() -> None:
    kv = _manager(num_blocks=4)
    _admit(kv, "A", PROMPT_A)  # [0, 1, 2], blocks 0 and 1 cached
    kv.free("A")
    assert kv.pool.free_queue_order() == [3, 2, 1, 0]
    prompt_b = PROMPT_A[:8] + list(range(12))  # 5 blocks: 2 hits + 3 fresh
    hits, num_cached = kv.get_computed_blocks("B", prompt_b)
    assert (hits, num_cached) == ([0, 1], 8)
    # 4 blocks are free, but the two hits are among them: 3 fresh ones do not fit.
    assert kv.allocate_slots("B", 12, 8, hits) is None
    assert kv.pool.free_queue_order() == [3, 2, 1, 0]
    assert [kv.pool.ref_count(b) for b in range(4)] == [0, 0, 0, 0]
    assert kv.get_block_ids("B") == []
    # A smaller first chunk (chunked prefill) fits: 2 hits + 2 fresh is the whole pool.
    assert kv.allocate_slots("B", 8, 8, hits) == [0, 1, 3, 2]
    assert kv.num_free_blocks == 0
    assert kv.allocate_slots("B", 1, 16) is None
    assert kv.get_block_ids("B") == [0, 1, 3, 2]
    assert kv.allocate_slots("B", 0, 16) == []


def test_forced_hash_collision_misses_instead_of_returning_the_wrong_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "hash_block_tokens", lambda seed, parent, tokens, extra: 42)
    kv = _manager()
    assert _admit(kv, "A", PROMPT_A) == [0, 1, 2]
    # Every block hashes to 42: block 0 was cached, block 1 collided with it and was not.
    assert kv.pool.is_cached(0) and not kv.pool.is_cached(1)
    assert kv.get_computed_blocks("other-first-block", [1, 2, 3, 4] + PROMPT_A[4:]) == ([], 0)
    assert kv.get_computed_blocks("same-first-block", PROMPT_A[:4] + [1, 2, 3, 4, 5]) == ([0], 4)
    assert kv.get_computed_blocks("same-prompt", PROMPT_A) == ([0], 4)


def test_disabled_caching_never_hits_or_counts() -> None:
    kv = _manager(enable_caching=False)
    _admit(kv, "A", PROMPT_A)
    assert kv.get_computed_blocks("B", PROMPT_A) == ([], 0)
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)
    assert not kv.pool.is_cached(0)


def test_reset_prefix_cache() -> None:
    kv = _manager()
    _admit(kv, "A", PROMPT_A)
    assert not kv.reset_prefix_cache()
    kv.free("A")
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks("B", PROMPT_A) == ([], 0)
