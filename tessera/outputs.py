"""What `LLM.generate` returns: the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" (EOS, stop token or stop string) or "length"
    # per generated token: (token id, its logprob, top-N [(id, logprob)]) when asked
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    # per prompt position: None for the first, then (logprob, top-N) when asked
    prompt_logprobs: list | None = None
