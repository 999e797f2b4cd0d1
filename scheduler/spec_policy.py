"""How many drafts pay for themselves: speculative decoding's adaptive draft length.

A draft token costs a row of the step's forward pass whether it is accepted or not; it gains a
token only when it and every draft before it are accepted. So each step, for every decoding
sequence, draft j (1-based) is proposed only while

    P(drafts 1..j all accepted)  >  cost of one more row, in tokens the step emits

- The left side comes from the sequence's own history (`Acceptance`): per draft position, an
  exponentially weighted estimate of P(accepted | the drafts before it were), started from an
  optimistic prior so a new sequence drafts at once, and an occasional one-token probe once
  its drafts have stopped, so a sequence that starts to copy comes back.
- The right side comes from the step's cost (`StepCost`): a running least-squares fit of a
  decode step's seconds against its token count, T(n) = c0 + c1 n. A plain step of n tokens
  that emits E tokens makes E / T(n) tokens/s; one more row is worth it iff its expected gain
  exceeds c1 E / T(n). On a small batch the fixed cost c0 dominates and drafts are nearly free;
  on a large, compute-bound batch (c1 n >> c0) only drafts that are almost surely accepted pay.
  Until the fit has data the cost is taken as zero (drafts limited by acceptance alone).

NOTE: all of this only changes how many tokens are verified per step, never which tokens a
sequence emits (every emitted token is sampled from the model as without speculation). So the
state may be lost, stale or fresh at any time: a preempted request keeps its `Acceptance`, a
scheduler that takes a request over (DESIGN.md §4) starts it from the prior, and outputs are
the same either way (tests/test_spec_decode_models.py).
"""

from __future__ import annotations

PRIOR_P = 0.7        # a new sequence's assumed acceptance at every draft position
PRIOR_WEIGHT = 0.5   # ... worth half a trial: the first observations outweigh it
DECAY = 0.8          # per observed step: an estimate follows about the last five
MIN_GAIN = 0.1       # a draft expected to add fewer tokens than this is never proposed
PROBE_FIRST = 4      # decode steps without drafts before the first probe ...
PROBE_MAX = 32       # ... doubling after each rejected probe, up to this


class Acceptance:
    """One sequence's draft acceptance, per draft position (speed only: see the module)."""

    __slots__ = ("hits", "trials", "idle", "probe_every", "probing", "shadow", "shadow_at")

    def __init__(self, k: int) -> None:
        self.hits = [0.0] * k      # weighted count of accepted drafts at position j
        self.trials = [0.0] * k    # ... of drafts at j whose predecessors were all accepted
        self.idle = 0              # decode steps since the last draft
        self.probe_every = PROBE_FIRST
        self.probing = False       # the pending draft is a probe
        self.shadow = -1           # the first draft the index proposed but the plan did not send
        self.shadow_at = -1        # ... for the token at this position (-1: none pending)

    def p(self, j: int) -> float:
        """P(draft j accepted | drafts before it accepted), 0-based j."""
        return (self.hits[j] + PRIOR_P * PRIOR_WEIGHT) / (self.trials[j] + PRIOR_WEIGHT)

    def draft_length(self, k: int, cost: float) -> int:
        """The longest run of drafts, at most k, whose every member's expected gain (the
        probability that it and all before it are accepted) exceeds `cost`."""
        gain, n, floor = 1.0, 0, max(cost, MIN_GAIN)
        hits, trials = self.hits, self.trials
        while n < k:
            gain *= (hits[n] + PRIOR_P * PRIOR_WEIGHT) / (trials[n] + PRIOR_WEIGHT)
            if gain <= floor:
                break
            n += 1
        return n

    def plan(self, k: int, cost: float) -> int:
        """Drafts to propose this step: draft_length, or a one-token probe once the sequence
        has gone `probe_every` decode steps without any (0 otherwise)."""
        n = self.draft_length(k, cost)
        if n:
            self.idle = 0
            return n
        self.idle += 1
        if self.idle < self.probe_every or k <= 0:
            return 0
        self.idle = 0
        self.probing = True
        return 1

    def check_shadow(self, tokens: list[int]) -> None:
        """Score the unsent draft of the last step against the token the step sampled, as a
        trial of the first draft position: free evidence (no row was spent), so a sequence
        that stopped drafting comes back as soon as its lookups start to match, not at its
        next probe."""
        at, self.shadow_at = self.shadow_at, -1
        if at >= 0 and len(tokens) == at + 1:
            self.hits[0] = self.hits[0] * DECAY + (tokens[at] == self.shadow)
            self.trials[0] = self.trials[0] * DECAY + 1.0

    def remember_shadow(self, token: int, at: int) -> None:
        self.shadow, self.shadow_at = token, at

    def observe(self, num_draft: int, accepted: int) -> None:
        """A step verified `num_draft` drafts and accepted the first `accepted`: positions up
        to the first rejection were tried (those after it tell nothing)."""
        hits, trials = self.hits, self.trials
        for j in range(min(accepted + 1, num_draft, len(hits))):
            hits[j] = hits[j] * DECAY + (j < accepted)
            trials[j] = trials[j] * DECAY + 1.0
        if self.probing:
            self.probing = False
            # Accepted: probe again next step (the estimate climbs back within a few);
            # rejected: wait twice as long before the next one.
            self.probe_every = 1 if accepted else min(max(2 * self.probe_every, PROBE_FIRST),
                                                      PROBE_MAX)


class StepCost:
    """Exponentially weighted least squares of decode-step seconds on tokens, T(n) = c0 + c1 n.

    Fed by the driver with steps that only decode (prompt chunks cost differently per token:
    no LM head). The fit changes only when the window's token counts spread enough to tell
    a slope (else the last fit stays: drafting off flattens the spread it was fitted on)."""

    DECAY = 0.98       # per step: a window of about 50 steps
    MIN_STEPS = 8
    MIN_VARIANCE = 1.0   # tokens^2

    def __init__(self) -> None:
        self.w = self.n = self.t = self.nn = self.nt = 0.0
        self.steps = 0
        self.fit: tuple[float, float] | None = None   # (c0, c1) in seconds

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.DECAY
        self.w = self.w * d + 1.0
        self.n = self.n * d + tokens
        self.t = self.t * d + seconds
        self.nn = self.nn * d + tokens * tokens
        self.nt = self.nt * d + tokens * seconds
        self.steps += 1
        if self.steps < self.MIN_STEPS:
            return
        mean_n, mean_t = self.n / self.w, self.t / self.w
        var = self.nn / self.w - mean_n * mean_n
        if var < self.MIN_VARIANCE:
            return
        c1 = max((self.nt / self.w - mean_n * mean_t) / var, 0.0)
        self.fit = (max(mean_t - c1 * mean_n, 0.0), c1)

    def row_cost(self, tokens: int, emitting: int) -> float:
        """What one more row costs a step of `tokens` tokens, `emitting` of which produce an
        output token, in output tokens (0 until fitted)."""
        if self.fit is None:
            return 0.0
        c0, c1 = self.fit
        total = c0 + c1 * tokens
        return c1 * emitting / total if total > 0 else 0.0
