"""BlockPool stories: exact block ids, LRU eviction order, hash-map eviction and collisions."""

from __future__ import annotations

import pytest

from scheduler.block_pool import BlockKey, BlockPool


def _key(parent: int | None, *tokens: int) -> BlockKey:
    return (parent, tuple(tokens), None)


def test_fresh_pool_hands_out_blocks_in_order() -> None:
    pool = BlockPool(8, hash_seed=0)
    assert pool.get_new_blocks(3) == [0, 1, 2]
    assert pool.get_new_blocks(1) == [3]
    assert pool.num_free_blocks == 4
    assert pool.usage == 0.5
    assert [pool.ref_count(b) for b in range(5)] == [1, 1, 1, 1, 0]


def test_freed_blocks_join_the_tail_in_the_order_given_and_are_reused_lru_first() -> None:
    pool = BlockPool(8, hash_seed=0)
    a = pool.get_new_blocks(3)  # [0, 1, 2]
    b = pool.get_new_blocks(2)  # [3, 4]
    # A request releases its tail first, so its prefix block 0 is the last of its blocks evicted.
    pool.free_blocks(reversed(a))
    assert pool.free_queue_order() == [5, 6, 7, 2, 1, 0]
    pool.free_blocks(reversed(b))
    assert pool.free_queue_order() == [5, 6, 7, 2, 1, 0, 4, 3]
    # Never-used blocks first, then the least recently freed.
    assert pool.get_new_blocks(5) == [5, 6, 7, 2, 1]
    assert pool.free_queue_order() == [0, 4, 3]


def test_shared_block_is_freed_only_when_its_last_reference_goes() -> None:
    pool = BlockPool(4, hash_seed=0)
    [blk] = pool.get_new_blocks(1)
    pool.touch([blk])  # a second request shares it
    assert pool.ref_count(blk) == 2
    pool.free_blocks([blk])
    assert pool.ref_count(blk) == 1
    assert blk not in pool.free_queue_order()
    pool.free_blocks([blk])
    assert pool.free_queue_order() == [1, 2, 3, 0]
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([blk])


def test_touching_a_free_block_pulls_it_out_of_the_middle_of_the_queue() -> None:
    pool = BlockPool(4, hash_seed=0)
    pool.touch([2])
    assert pool.free_queue_order() == [0, 1, 3]
    assert pool.num_free_blocks == 3
    assert pool.get_new_blocks(3) == [0, 1, 3]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_a_freed_cached_block_stays_findable_until_it_is_reused() -> None:
    pool = BlockPool(2, hash_seed=0)
    blocks = pool.get_new_blocks(2)
    keys = [_key(None, 1, 2), _key(100, 3, 4)]
    assert pool.cache_full_blocks(blocks, [100, 200], keys, 0, 2)
    pool.free_blocks(reversed(blocks))
    assert pool.free_queue_order() == [1, 0]
    assert pool.get_cached_block(100, keys[0]) == 0
    assert pool.get_cached_block(200, keys[1]) == 1
    # Reuse evicts the LRU block (1, the tail of the sequence) and forgets its content.
    assert pool.get_new_blocks(1) == [1]
    assert not pool.is_cached(1)
    assert pool.get_cached_block(200, keys[1]) is None
    assert pool.get_cached_block(100, keys[0]) == 0


def test_hash_collision_is_a_miss_not_a_wrong_hit() -> None:
    pool = BlockPool(4, hash_seed=0)
    blocks = pool.get_new_blocks(2)
    # Two sequences whose first blocks differ but hash alike (77).
    assert pool.cache_full_blocks(blocks[:1], [77], [_key(None, 1, 2)], 0, 1)
    assert not pool.cache_full_blocks(blocks[1:], [77], [_key(None, 5, 6)], 0, 1)
    assert not pool.is_cached(blocks[1])
    assert pool.get_cached_block(77, _key(None, 5, 6)) is None
    assert pool.get_cached_block(77, _key(None, 1, 2)) == blocks[0]


def test_a_cached_child_pins_its_parents_meaning_after_the_parent_is_evicted() -> None:
    """Keys name the parent by hash only. Were a parent's hash free to take a new meaning once
    the parent block is evicted, a different prefix with a colliding hash would lead a lookup
    straight to the old child: a wrong hit. The pool refuses that reuse."""
    pool = BlockPool(3, hash_seed=0)
    blocks = pool.get_new_blocks(2)
    old_parent, child = _key(None, 1, 1), _key(10, 9, 9)
    assert pool.cache_full_blocks(blocks, [10, 20], [old_parent, child], 0, 2)
    # Free the parent before the child (a wrong order on purpose) and evict it.
    pool.free_blocks(blocks)
    assert pool.get_new_blocks(2) == [2, 0]
    assert pool.get_cached_block(10, old_parent) is None
    assert pool.get_cached_block(20, child) == 1
    # A different first block colliding on hash 10 cannot be cached ...
    new_parent = _key(None, 2, 2)
    assert not pool.cache_full_blocks([2], [10], [new_parent], 0, 1)
    # ... so a lookup of (new parent, same tokens as the child) stops at its first block.
    assert pool.get_cached_block(10, new_parent) is None
    # Once the child is evicted too, hash 10 is free for new content.
    assert pool.get_new_blocks(1) == [1]
    assert pool.cache_full_blocks([2], [10], [new_parent], 0, 1)
    assert pool.get_cached_block(10, new_parent) == 2


def test_two_copies_of_the_same_content_keep_one_findable() -> None:
    pool = BlockPool(4, hash_seed=0)
    a, b = pool.get_new_blocks(2)
    key = _key(None, 4, 4)
    assert pool.cache_full_blocks([a], [5], [key], 0, 1)
    assert pool.cache_full_blocks([b], [5], [key], 0, 1)  # same content computed twice
    assert pool.is_cached(a) and not pool.is_cached(b)
    assert pool.get_cached_block(5, key) == a


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use() -> None:
    pool = BlockPool(2, hash_seed=0)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks, [1], [_key(None, 3)], 0, 1)
    assert not pool.reset_prefix_cache()
    assert pool.get_cached_block(1, _key(None, 3)) == 0
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(1, _key(None, 3)) is None
    assert not pool.is_cached(0)


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(2, enable_caching=False, hash_seed=0)
    blocks = pool.get_new_blocks(1)
    assert pool.cache_full_blocks(blocks, [1], [_key(None, 3)], 0, 1)
    assert pool.get_cached_block(1, _key(None, 3)) is None


def test_a_child_is_not_cached_under_a_parent_hash_that_now_means_other_content() -> None:
    """Request R's first block x duplicated block a (so only a was cached). Once a is evicted,
    hash 10 may be taken by other content; R's later child block must then stay uncached, or
    a lookup through the new owner of hash 10 would reach R's child: a wrong hit."""
    pool = BlockPool(4, hash_seed=0)
    a, x, y = pool.get_new_blocks(3)
    p, q, c = _key(None, 1, 1), _key(None, 2, 2), _key(10, 3, 3)
    assert pool.cache_full_blocks([a], [10], [p], 0, 1)
    assert pool.cache_full_blocks([x], [10], [p], 0, 1)  # duplicate: x stays uncached
    pool.free_blocks([a])
    assert pool.get_new_blocks(2) == [3, a]  # a's content is evicted; hash 10 is unowned
    assert pool.cache_full_blocks([y], [10], [q], 0, 1)  # a colliding prefix takes hash 10
    # R's second block (parent hash 10, parent content p) is refused.
    assert not pool.cache_full_blocks([x, 3], [10, 20], [p, c], 1, 2)
    assert not pool.is_cached(3)
    assert pool.get_cached_block(20, c) is None


def test_a_block_colliding_with_its_own_parent_is_not_cached() -> None:
    pool = BlockPool(3, hash_seed=0)
    x, y = pool.get_new_blocks(2)
    parent, child = _key(None, 1, 1), _key(10, 2, 2)
    # x holds the parent content but is not cached; its child hashes to the parent's hash.
    assert not pool.cache_full_blocks([x, y], [10, 10], [parent, child], 1, 2)
    assert not pool.is_cached(y)
    pool.free_blocks([y, x])
    assert pool.get_new_blocks(3) == [2, 1, 0]  # evicting cleanly: no stale entry to trip on
