"""Per-request KV block tables on top of the BlockPool: prefix lookup, allocation, caching, free.

The scheduler drives it with vLLM v1's accounting (``num_computed_tokens`` /
``num_new_tokens``); each call returns block-id deltas that go straight into the step's diff
for the workers. The usual life of a request:

    hits, n_cached = kv.get_computed_blocks(rid, prompt, cache_salt)     # no references taken
    new = kv.allocate_slots(rid, n_new, n_cached, hits)                  # None: no room, retry later
    ... step runs ...
    kv.cache_blocks(rid, all_token_ids, num_computed_tokens)             # make full blocks shareable
    ... every later step: allocate_slots(rid, n_new, num_computed_tokens) -> [] or [fresh block]
    kv.free(rid)                                                         # finished, aborted or preempted
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.block_pool import BlockHash, BlockKey, BlockPool, hash_block_tokens


class _RequestHashes:
    """One request's hash chain, extended lazily and computed once per block."""

    __slots__ = ("cache_salt", "hashes", "keys", "num_cached")

    def __init__(self, cache_salt: str | None) -> None:
        self.cache_salt = cache_salt
        self.hashes: list[BlockHash] = []
        self.keys: list[BlockKey] = []
        # Blocks of the table already offered to the pool's hash map (-> cache_blocks is O(1)
        # on steps that fill no block). _CHAIN_BROKEN after a hash collision.
        self.num_cached = 0


_CHAIN_BROKEN = 1 << 62


class KVCacheManager:
    """Block tables for every request the scheduler holds, with automatic prefix caching.

    Prefix hits share blocks (ref counts), never copy them. Blocks are released tail first, so
    the shared prefix of a sequence is the last of its blocks to be evicted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, hash_seed: int | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_caching, hash_seed=hash_seed)
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, _RequestHashes] = {}
        self._prefix_queries = 0
        self._prefix_hits = 0

    # ---- read-only state ------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of KV blocks in use (the ``kv_cache_usage`` gauge)."""
        return self.pool.usage

    @property
    def prefix_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache so far (a monotonically rising counter)."""
        return self._prefix_queries

    @property
    def prefix_hits(self) -> int:
        """Of those, tokens found cached."""
        return self._prefix_hits

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy; [] for an unknown request)."""
        return list(self._tables.get(request_id, ()))

    # ---- hashing --------------------------------------------------------------------------

    def _extend_hashes(self, state: _RequestHashes, token_ids: Sequence[int], num_blocks: int) -> None:
        """Make sure ``state`` holds the hashes of the first ``num_blocks`` full blocks."""
        hashes, keys = state.hashes, state.keys
        bs = self.block_size
        seed = self.pool.hash_seed
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            # The salt goes into the first block only: every later hash inherits it via parent.
            extra = state.cache_salt if i == 0 else None
            keys.append((parent, tokens, extra))
            hashes.append(hash_block_tokens(seed, parent, tokens, extra))

    def _state(self, request_id: str, cache_salt: str | None) -> _RequestHashes:
        state = self._hashes.get(request_id)
        if state is None:
            state = self._hashes[request_id] = _RequestHashes(cache_salt)
        return state

    # ---- the scheduler's calls ------------------------------------------------------------

    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks: ``(block_ids, num_cached_tokens)``.

        Never the whole sequence: at least one token is left to compute (the model must produce
        logits for the last position), so at most ``(len(token_ids) - 1) // block_size`` blocks.
        Takes no references: pass the blocks to `allocate_slots`, which does. Each call adds to
        `prefix_queries` / `prefix_hits`. The salt is remembered for the request's later
        `cache_blocks` calls; it must not change while the request holds its hash state.
        """
        if not self.enable_caching:
            return [], 0
        state = self._state(request_id, cache_salt)
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        pool = self.pool
        hits: list[int] = []
        for i in range(max(max_blocks, 0)):
            # Hash lazily: a miss on block i means no later block can hit (the chain breaks).
            if i == len(state.hashes):
                self._extend_hashes(state, token_ids, i + 1)
            block_id = pool.get_cached_block(state.hashes[i], state.keys[i])
            if block_id is None:
                break
            hits.append(block_id)
        self._prefix_queries += len(token_ids)
        self._prefix_hits += len(hits) * bs
        return hits, len(hits) * bs

    def allocate_slots(
        self,
        request_id: str,
        num_new_tokens: int,
        num_computed_tokens: int,
        new_computed_blocks: Sequence[int] = (),
    ) -> list[int] | None:
        """Grow the request's table to cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``num_computed_tokens`` counts the prefix-hit tokens too. ``new_computed_blocks`` (the
        hits from `get_computed_blocks`, only before the request's first allocation) are
        shared: one more reference each, appended to the table before any fresh block.
        Returns the NEWLY ADDED block ids (hits, then fresh blocks; [] when the table already
        covers the tokens), or None when the free blocks do not suffice; then nothing changed.
        """
        table = self._tables.get(request_id)
        num_blocks = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        # Fast path, taken by every decoding request on 15 of 16 steps: no block to add.
        if table is not None and not new_computed_blocks and num_blocks <= len(table):
            return []
        num_have = len(new_computed_blocks) + (len(table) if table is not None else 0)
        num_fresh = max(num_blocks - num_have, 0)
        pool = self.pool
        # A hit on a free (cached, unreferenced) block takes it off the free queue: it is no
        # longer available for the fresh blocks, so count it against the budget up front.
        ref_count = pool.ref_count
        num_free_hits = sum(1 for b in new_computed_blocks if ref_count(b) == 0)
        if num_fresh > pool.num_free_blocks - num_free_hits:
            return None
        if table is None:
            table = self._tables[request_id] = []
        pool.touch(new_computed_blocks)
        new = list(new_computed_blocks)
        if num_fresh:
            new += pool.get_new_blocks(num_fresh)
        table.extend(new)
        return new

    def cache_blocks(
        self, request_id: str, token_ids: Sequence[int], num_tokens: int, cache_salt: str | None = None
    ) -> None:
        """Register the request's blocks made full by its first ``num_tokens`` computed tokens
        (prompt and generated alike) so later requests can hit them.

        ``cache_salt`` is used only if `get_computed_blocks` never ran for this request.
        """
        if not self.enable_caching:
            return
        table = self._tables.get(request_id)
        if table is None:
            return
        num_full = min(num_tokens // self.block_size, len(table))
        state = self._hashes.get(request_id)
        if state is None:
            state = self._state(request_id, cache_salt)
        if num_full <= state.num_cached:
            return
        self._extend_hashes(state, token_ids, num_full)
        ok = self.pool.cache_full_blocks(table, state.hashes, state.keys, state.num_cached, num_full)
        state.num_cached = num_full if ok else _CHAIN_BROKEN

    def free(self, request_id: str) -> None:
        """Release all the request's blocks and forget it (finished, aborted or preempted).

        Blocks go to the free queue tail first, prefix last, so a shared prefix outlives the
        tails that hang off it. Unknown ids are ignored (a request aborted before admission).
        """
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def fork(self, parent_id: str, child_id: str, num_computed_tokens: int) -> list[int]:
        """Share the parent's FULL computed blocks with a new child (n > 1): returns the child's
        table. The first ``num_computed_tokens // block_size`` blocks are shared (ref count +1
        each); a partially filled tail block is NOT shared (no copy-on-write): the child gets
        its own through `allocate_slots` and recomputes those few tokens, e.g.
        ``allocate_slots(child, n_tail_tokens, len(table) * block_size)``.
        """
        if child_id in self._tables:
            raise ValueError(f"request {child_id!r} already has blocks")
        parent_table = self._tables.get(parent_id, [])
        shared = parent_table[: num_computed_tokens // self.block_size]
        self.pool.touch(shared)
        self._tables[child_id] = list(shared)
        parent_state = self._hashes.get(parent_id)
        if parent_state is not None:
            child_state = self._hashes[child_id] = _RequestHashes(parent_state.cache_salt)
            n = min(len(shared), len(parent_state.hashes))
            child_state.hashes = parent_state.hashes[:n]
            child_state.keys = parent_state.keys[:n]
        return list(shared)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (e.g. after a weight reload). False while blocks are in use."""
        return self.pool.reset_prefix_cache()
