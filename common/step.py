"""The step contract between the scheduler and its workers (DESIGN.md §3), as dataclasses.

A step is a diff: a sequence new to the workers (or re-sent after preemption) comes in full
once; a sequence they already know comes as a delta (its new blocks and the scheduler's
`num_computed_tokens`, which the worker checks against its own count); sequences finished or
preempted since the last step are listed so the workers drop them. The in-process engine
passes these objects directly; the gRPC services convert them to and from protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.sampling_params import SamplingParams

# A worker's answer (gRPC ABORTED) to a call carrying an older lease epoch than the newest it
# has seen: the caller is a scheduler that lost its lease (scheduler.fence).
FENCED_DETAIL = "fenced: a newer scheduler drives this group"


@dataclass(slots=True)
class NewSequence:
    seq_id: str
    token_ids: list[int]            # prompt + tokens generated so far (recompute after preemption)
    num_prompt_tokens: int
    num_computed_tokens: int        # already in the cache (prefix-cache hits)
    num_scheduled_tokens: int
    block_ids: list[int]
    params: SamplingParams
    seed_offset: int = 0            # which of a request's n sequences: its own seeded stream


@dataclass(slots=True)
class RunningSequence:
    seq_id: str
    num_computed_tokens: int
    num_scheduled_tokens: int
    new_block_ids: list[int]
    # Tokens sampled since the workers last saw this sequence (usually the one token of the
    # last step): every rank of a group appends them, not only the rank that sampled them.
    new_token_ids: list[int] = field(default_factory=list)
    # Speculative decoding: tokens the scheduler guessed follow the last known one. They are
    # scheduled (counted in num_scheduled_tokens) after that token, the worker computes and
    # verifies them; they are not the sequence's tokens until the output says so.
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class StepPlan:
    step_id: int
    new: list[NewSequence] = field(default_factory=list)
    running: list[RunningSequence] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)   # workers forget these first
    preempted_ids: list[str] = field(default_factory=list)  # informational: freed this step
    # W3C traceparents of the step's traced sequences (only while tracing): the executor sends
    # them as gRPC metadata, the workers' step span joins the first's trace and links to all.
    trace_context: tuple[str, ...] = ()

    @property
    def num_sequences(self) -> int:
        return len(self.new) + len(self.running)

    @property
    def total_tokens(self) -> int:
        return (sum(s.num_scheduled_tokens for s in self.new)
                + sum(s.num_scheduled_tokens for s in self.running))


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class StepOutput:
    step_id: int
    # One entry per sequence that reached the end of its known tokens this step (a finished
    # prompt or a decode); sequences still mid-prompt have none.
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    # Per sequence asking for prompt_logprobs, for the prompt positions computed this step:
    # (logprob of the actual next prompt token, top-N) per position.
    prompt_logprobs: dict[str, list[tuple[float, list[tuple[int, float]]]]] = field(
        default_factory=dict)
    # Speculative decoding: per sequence with drafts, the tokens emitted after its `sampled`
    # one (the accepted drafts but the last, then the token sampled after them): the step
    # emitted [sampled] + extra. Absent: no draft was accepted.
    extra_sampled: dict[str, list[SampledToken]] = field(default_factory=dict)
    # Sequences at a sampling point that were not sampled (their grammar still compiles,
    # worker/structured.py): the scheduler computes their last known token again later.
    deferred: list[str] = field(default_factory=list)
