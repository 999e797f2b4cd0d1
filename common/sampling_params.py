"""Sampling parameters: one definition for the offline API, the gateway and the workers.

Validated on construction; a bad value raises ValueError naming the field, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0            # 0 means greedy
    top_p: float = 1.0                  # in (0, 1]
    top_k: int = 0                      # 0 or -1: no limit
    min_p: float = 0.0                  # in [0, 1]
    repetition_penalty: float = 1.0     # > 0; 1 means none
    presence_penalty: float = 0.0       # in [-2, 2]
    frequency_penalty: float = 0.0      # in [-2, 2]
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None         # number of top logprobs besides the sampled token's
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, "a number >= 0")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
               "an integer >= 1, or 0 / -1 for no limit")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, name, v, "in [-2, 2]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "an integer >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, "an integer in [0, max_tokens]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a list of non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of token ids")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= 20), name, v,
                   "None or an integer in [0, 20]")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict) and all(
                _is_int(k) and k >= 0 and _is_num(v) for k, v in self.logit_bias.items()),
                "logit_bias", self.logit_bias, "a mapping of token id to bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
