"""n-gram speculative decoding, the scheduler's half: proposals and their statistics.

Prompt lookup (vLLM's "ngram" method): a sequence's next tokens are guessed by finding its
last n tokens earlier in its own prompt + output (n from prompt_lookup_max down to
prompt_lookup_min, the most recent occurrence) and proposing the up to K tokens that followed
there. No model runs here; the workers verify the drafts in the step's forward pass
(worker/worker.py) and the engine core applies what they accepted.

Cheap by construction: each sequence keeps an index {n-gram: latest end} that grows by the
tokens appended since its last proposal (O(new tokens x n-gram sizes)), so a proposal never
rescans the sequence. The index is derived from the tokens only, so it survives preemption
and is rebuilt from scratch by any scheduler that takes a request over (DESIGN.md §4).

How many of the K drafts a sequence gets each step is scheduler.spec_policy's call: only those
whose expected gain (from the sequence's acceptance so far) beats the row they cost (from the
measured step cost), so speculation steps aside where it would slow the batch down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import SpeculativeConfig
from scheduler.spec_policy import Acceptance, StepCost


class NgramIndex:
    """Where each n-gram (n in [lo, hi]) of a token list last ended with a token after it.

    ``ends[ngram] = e`` means tokens[e - n:e] == ngram and tokens[e] exists: the proposal for
    a suffix equal to ngram is tokens[e:e + K]. Only ends up to len - 1 are indexed, so the
    current suffix never matches itself.
    """

    __slots__ = ("lo", "hi", "ends", "indexed")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0    # ends e < indexed are in the map

    def update(self, tokens: list[int]) -> None:
        """Index the ends the tokens appended since the last call made possible."""
        ends, lo, hi = self.ends, self.lo, self.hi
        limit = len(tokens)   # ends e <= limit - 1 have a continuation
        for e in range(max(self.indexed, lo), limit):
            for n in range(lo, min(hi, e) + 1):
                ends[tuple(tokens[e - n:e])] = e
        self.indexed = max(self.indexed, limit)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest recent match of the sequence's suffix."""
        self.update(tokens)
        ends, size = self.ends, len(tokens)
        for n in range(min(self.hi, size - 1), self.lo - 1, -1):
            e = ends.get(tuple(tokens[size - n:]))
            if e is not None:
                return tokens[e:e + k]
        return []


@dataclass
class SpecDecodeStats:
    """Counters the metrics read at scrape time (scheduler/metrics.py), vLLM's meanings:
    drafts = sequence-steps with at least one draft token, and per draft its acceptance
    length (1 + accepted drafts: the tokens the step emitted)."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)   # [length] -> count

    def observe(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        counts = self.acceptance_lengths
        while len(counts) <= num_accepted + 1:
            counts.append(0)
        counts[num_accepted + 1] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class NgramProposer:
    """Drafts for a decoding sequence, at most `budget` tokens (the scheduler's room), as many
    as pay for themselves (scheduler.spec_policy: the sequence's acceptance against the
    step's cost)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.stats = SpecDecodeStats()
        self.cost = StepCost()

    def row_cost(self, tokens: int, emitting: int) -> float:
        """The step's price of one draft row, in output tokens (spec_policy.StepCost)."""
        return self.cost.row_cost(tokens, emitting)

    def propose(self, req, budget: int, max_model_len: int, cost: float = 0.0) -> list[int]:
        """Draft tokens for `req` (a scheduler Request whose last token is not yet computed);
        `cost` is row_cost's for this step."""
        params = req.params
        # Never draft past what the request may still emit: max_tokens and the context, less
        # the token the step samples anyway.
        room = min(self.k, budget, params.max_tokens - len(req.output_token_ids) - 1,
                   max_model_len - req.num_tokens - 1)
        if room <= 0:
            return []
        acceptance = req.spec_acceptance
        if acceptance is None:
            acceptance = req.spec_acceptance = Acceptance(self.k)
        tokens = req.all_token_ids
        acceptance.check_shadow(tokens)
        index = req.ngram_index
        if index is None:
            index = req.ngram_index = NgramIndex(self.config.prompt_lookup_min,
                                                 self.config.prompt_lookup_max)
        planned = acceptance.plan(room, cost)
        if planned <= 0:
            # Not drafting: still look up (microseconds) and score the lookup next step.
            shadow = index.propose(tokens, 1)
            if shadow:
                acceptance.remember_shadow(shadow[0], len(tokens))
            return []
        drafts = index.propose(tokens, planned)
        if not drafts and acceptance.probing:   # nothing to probe with: try next step
            acceptance.probing = False
            acceptance.idle = acceptance.probe_every
        return drafts

    def observe(self, req, num_draft: int, num_accepted: int) -> None:
        """A step verified `num_draft` drafts of `req` and accepted `num_accepted`."""
        self.stats.observe(num_draft, num_accepted)
        if req.spec_acceptance is not None:
            req.spec_acceptance.observe(num_draft, num_accepted)
