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


class _RequestBlocks:
    """One request's block table and hash chain (each block hashed once per request).

    One record per request, so the per-step fast paths cost a single dict lookup.
    """

    __slots__ = ("table", "cache_salt", "hashes", "keys", "num_cached", "next_cache_tokens")

    def __init__(self, cache_salt: object, block_size: int, enable_caching: bool) -> None:
        self.table: list[int] = []
        # str | None once known; _UNSET until get_computed_blocks or cache_blocks says.
        self.cache_salt = cache_salt
        self.hashes: list[BlockHash] = []
        self.keys: list[BlockKey] = []
        # Blocks of the table already offered to the pool's hash map, and the computed-token
        # count at which the next block fills: cache_blocks does nothing below it.
        self.num_cached = 0
        self.next_cache_tokens = block_size if enable_caching else _NEVER


_NEVER = 1 << 62
_UNSET = object()


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
        self._reqs: dict[str, _RequestBlocks] = {}
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
        req = self._reqs.get(request_id)
        return list(req.table) if req is not None else []

    # ---- hashing --------------------------------------------------------------------------

    def _extend_hashes(self, req: _RequestBlocks, token_ids: Sequence[int], num_blocks: int) -> None:
        """Make sure ``req`` holds the hashes of its first ``num_blocks`` full blocks."""
        hashes, keys = req.hashes, req.keys
        bs = self.block_size
        seed = self.pool.hash_seed
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            # The salt goes into the first block only: every later hash inherits it via parent.
            extra = req.cache_salt if i == 0 else None
            keys.append((parent, tokens, extra))
            hashes.append(hash_block_tokens(seed, parent, tokens, extra))

    def _get_or_add(self, request_id: str, cache_salt: object) -> _RequestBlocks:
        req = self._reqs.get(request_id)
        if req is None:
            req = self._reqs[request_id] = _RequestBlocks(cache_salt, self.block_size, self.enable_caching)
        return req

    # ---- the scheduler's calls ------------------------------------------------------------

    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks: ``(block_ids, num_cached_tokens)``.

        Never the whole sequence: at least one token is left to compute (the model must produce
        logits for the last position), so at most ``(len(token_ids) - 1) // block_size`` blocks.
        Takes no references: pass the blocks to `allocate_slots`, which does. Each call adds to
        `prefix_queries` / `prefix_hits`. The salt is remembered for the request's later
        `cache_blocks` calls, until `free`.
        """
        if not self.enable_caching:
            return [], 0
        req = self._get_or_add(request_id, cache_salt)
        if req.cache_salt is _UNSET:
            req.cache_salt = cache_salt
        bs = self.block_size
        max_blocks = max((len(token_ids) - 1) // bs, 0)
        # Hash every block that could hit, even past a first miss: the hashes stay with the
        # request and `cache_blocks` needs them anyway once those blocks are computed.
        self._extend_hashes(req, token_ids, max_blocks)
        get_cached_block = self.pool.get_cached_block
        hits: list[int] = []
        for block_hash, key in zip(req.hashes[:max_blocks], req.keys):
            block_id = get_cached_block(block_hash, key)
            if block_id is None:
                break  # the chain is broken: no later block can match
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
        req = self._reqs.get(request_id)
        num_tokens = num_computed_tokens + num_new_tokens
        # Fast path, taken by every decoding request on 15 of 16 steps: no block to add.
        if req is not None and not new_computed_blocks and len(req.table) * self.block_size >= num_tokens:
            return []
        bs = self.block_size
        num_fresh = (num_tokens + bs - 1) // bs - len(new_computed_blocks)
        if req is not None:
            num_fresh -= len(req.table)
        pool = self.pool
        if new_computed_blocks:
            # A hit on a free (cached, unreferenced) block takes it off the free queue: it is
            # no longer available for fresh blocks, so count it against the budget up front.
            num_free = pool.num_free_blocks
            for block_id in new_computed_blocks:
                if pool.ref_count(block_id) == 0:
                    num_free -= 1
            if num_fresh > num_free:
                return None
            pool.touch(new_computed_blocks)
            new = list(new_computed_blocks)
            if num_fresh > 0:
                new += pool.get_new_blocks(num_fresh)
        elif num_fresh > pool.num_free_blocks:
            return None
        else:
            new = pool.get_new_blocks(num_fresh) if num_fresh > 0 else []
        if req is None:
            req = self._get_or_add(request_id, _UNSET)
        req.table += new
        return new

    def cache_blocks(
        self, request_id: str, token_ids: Sequence[int], num_tokens: int, cache_salt: str | None = None
    ) -> None:
        """Register the request's blocks made full by its first ``num_tokens`` computed tokens
        (prompt and generated alike) so later requests can hit them.

        The salt is the one given to `get_computed_blocks`; ``cache_salt`` here serves a
        request that never went through it (the first of the two calls fixes the salt).
        """
        req = self._reqs.get(request_id)
        # Fast path: no block filled since the last call (also: caching off, unknown request).
        if req is None or num_tokens < req.next_cache_tokens:
            return
        num_full = min(num_tokens // self.block_size, len(req.table))
        if num_full <= req.num_cached:
            return
        if req.cache_salt is _UNSET:
            req.cache_salt = cache_salt
        self._extend_hashes(req, token_ids, num_full)
        ok = self.pool.cache_full_blocks(req.table, req.hashes, req.keys, req.num_cached, num_full)
        # After a hash collision the rest of the chain cannot be cached: stop trying.
        req.num_cached = num_full
        req.next_cache_tokens = (num_full + 1) * self.block_size if ok else _NEVER

    def free(self, request_id: str) -> None:
        """Release all the request's blocks and forget it (finished, aborted or preempted).

        Blocks go to the free queue tail first, prefix last, so a shared prefix outlives the
        tails that hang off it. Unknown ids are ignored (a request aborted before admission).
        """
        req = self._reqs.pop(request_id, None)
        if req is not None and req.table:
            self.pool.free_blocks(reversed(req.table))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (e.g. after a weight reload). False while blocks are in use."""
        return self.pool.reset_prefix_cache()
