"""A request as the scheduler sees it: token accounting and a small status state machine.

One user request of n sequences is n of these (scheduler.engine_core groups them).
WAITING -> RUNNING -> FINISHED_*; RUNNING -> PREEMPTED (blocks freed, waits again, later
recomputed from prompt + generated tokens) -> RUNNING. Accounting names follow vLLM:
`num_prompt_tokens`, `num_computed_tokens` (in the KV cache), `num_tokens` (prompt + output).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from common.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0                 # admission order, set by the scheduler
    priority: int = 0                # lower value = served first (vLLM's convention)
    eos_token_ids: tuple[int, ...] = ()
    seed_offset: int = 0             # index among the n sequences of one user request
    cache_salt: str | None = None
    tenant: str = ""                 # fair share (scheduler.fair_share): whose request it is
    weight: float = 1.0              # ... and the tenant's weight
    fair_tag: float = 0.0            # virtual start tag, set by the scheduler
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0       # prefix-cache hit at first admission
    num_preemptions: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    stop_reason: int | None = None   # the stop token id that finished it, if any
    known_to_workers: bool = False   # sent in full since its last (re)admission
    num_slots: int = 0               # tokens its allocated blocks can hold
    num_worker_tokens: int = 0       # of all_token_ids, how many the workers were sent
    owner: Any = None                # the user request it belongs to (engine_core.EngineRequest)
    telemetry: Any = None            # the telemetry hooks' per-sequence state, if any
    ngram_index: Any = None          # speculative decoding's (scheduler.spec_decode), lazily
    spec_acceptance: Any = None      # ... and its draft acceptance (speed only: spec_policy)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)
        stops = set(self.params.stop_token_ids)
        # NOTE: a structured output stops at EOS even with ignore_eos: its grammar allows
        # EOS only where the output is complete, and only EOS once it is.
        if not self.params.ignore_eos or self.params.structured_outputs is not None:
            stops.update(self.eos_token_ids)
        self._stop_ids = frozenset(stops)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.fair_tag, self.arrival)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token causes, if any."""
        n = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n >= self.params.min_tokens and last in self._stop_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if n >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
