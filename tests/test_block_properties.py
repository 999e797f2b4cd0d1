"""Hypothesis: random interleavings of admit / compute / append / free / reset never leak
a block, never double-free one, and never let a prefix hit return a block with other content.

A ground-truth model records what each block holds (cache salt + the token prefix up to the end
of the block) when its tokens are computed; every prefix hit is checked against it. The second
machine uses a 2-bit hash so that collisions are everywhere.
"""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import scheduler.kv_cache_manager as kvm
from scheduler.kv_cache_manager import KVCacheManager

BS = 2
NUM_BLOCKS = 12
# A two-letter alphabet and short prompts make shared prefixes (hits) common.
tokens = st.lists(st.integers(0, 1), min_size=1, max_size=10)
salts = st.sampled_from([None, "t1"])


class _Seq:
    def __init__(self, token_ids: list[int], salt: str | None) -> None:
        self.token_ids = token_ids
        self.salt = salt
        self.computed = 0


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BS, hash_seed=7)
        self.live: dict[str, _Seq] = {}
        self.content: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.next_id = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def _snapshot(self) -> tuple[object, ...]:
        pool = self.kv.pool
        tables = {rid: self.kv.get_block_ids(rid) for rid in self.live}
        return (pool.free_queue_order(), [pool.ref_count(b) for b in range(NUM_BLOCKS)], tables)

    def _record_content(self, rid: str) -> None:
        """Blocks whose tokens are all computed now hold that prefix's KV."""
        seq = self.live[rid]
        for i, block in enumerate(self.kv.get_block_ids(rid)[: seq.computed // BS]):
            self.content[block] = (seq.salt, tuple(seq.token_ids[: (i + 1) * BS]))

    @rule(prompt=tokens, salt=salts, chunk=st.integers(1, 10))
    def admit(self, prompt: list[int], salt: str | None, chunk: int) -> None:
        rid = self._new_id()
        hits, num_cached = self.kv.get_computed_blocks(rid, prompt, salt)
        assert num_cached == len(hits) * BS < len(prompt)
        event(f"prefix hit of {len(hits)} blocks" if hits else "prefix miss")
        for i, block in enumerate(hits):
            assert self.content.get(block) == (salt, tuple(prompt[: (i + 1) * BS])), "wrong prefix hit"
        before = self._snapshot()
        num_new = min(chunk, len(prompt) - num_cached)
        new = self.kv.allocate_slots(rid, num_new, num_cached, hits)
        if new is None:
            event("admission refused")
            assert self._snapshot() == before, "a failed allocation changed state"
            self.kv.free(rid)  # stays waiting, then is aborted: drops its hash state
            return
        assert new[: len(hits)] == hits
        for block in new[len(hits):]:
            self.content.pop(block, None)  # a fresh block's old KV is about to be overwritten
        seq = self.live[rid] = _Seq(list(prompt), salt)
        seq.computed = num_cached + num_new
        self._record_content(rid)
        self.kv.cache_blocks(rid, seq.token_ids, seq.computed)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 5), generated=st.lists(st.integers(0, 1), max_size=2))
    def compute(self, data: st.DataObject, n: int, generated: list[int]) -> None:
        """A step: a prefill chunk or a decode, then the sampled tokens join the sequence."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        seq = self.live[rid]
        n = min(n, len(seq.token_ids) - seq.computed)
        before = self._snapshot()
        new = self.kv.allocate_slots(rid, n, seq.computed)
        if new is None:
            assert self._snapshot() == before, "a failed allocation changed state"
            return
        for block in new:
            self.content.pop(block, None)
        assert len(self.kv.get_block_ids(rid)) * BS >= seq.computed + n
        seq.computed += n
        self._record_content(rid)
        self.kv.cache_blocks(rid, seq.token_ids, seq.computed)
        if seq.computed == len(seq.token_ids):
            seq.token_ids.extend(generated)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        """Finish, abort mid-prefill or preempt: all the same to the block manager."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[rid]
        self.kv.free(rid)

    @rule()
    def reset(self) -> None:
        in_use = self.kv.num_blocks_in_use > 0
        assert self.kv.reset_prefix_cache() is not in_use
        if not in_use:
            assert not any(self.kv.pool.is_cached(b) for b in range(NUM_BLOCKS))

    @invariant()
    def no_leak_no_double_free(self) -> None:
        pool = self.kv.pool
        refs = [pool.ref_count(b) for b in range(NUM_BLOCKS)]
        tables = [self.kv.get_block_ids(rid) for rid in self.live]
        assert sum(refs) == sum(len(t) for t in tables)
        for b in range(NUM_BLOCKS):
            assert refs[b] == sum(t.count(b) for t in tables)
        queue = pool.free_queue_order()
        assert len(queue) == len(set(queue))
        assert sorted(queue) == [b for b in range(NUM_BLOCKS) if refs[b] == 0]
        assert self.kv.num_free_blocks + self.kv.num_blocks_in_use == NUM_BLOCKS
        for t in tables:
            assert len(t) == len(set(t)), "a block twice in one table"

    def teardown(self) -> None:
        for rid in list(self.live):
            self.kv.free(rid)
        assert self.kv.num_free_blocks == NUM_BLOCKS
        assert all(self.kv.pool.ref_count(b) == 0 for b in range(NUM_BLOCKS))
        assert self.kv.reset_prefix_cache()


class CollidingHashMachine(BlockManagerMachine):
    """The same stories with a hash that has 4 values: collisions must only cost hits."""

    @initialize()
    def weaken_hash(self) -> None:
        self._saved = kvm.hash_block_tokens  # restored in teardown
        kvm.hash_block_tokens = lambda seed, parent, toks, extra: hash((parent, toks, extra)) & 3

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            kvm.hash_block_tokens = getattr(self, "_saved", kvm.hash_block_tokens)


_settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = _settings
TestCollidingHash = CollidingHashMachine.TestCase
TestCollidingHash.settings = _settings
