"""Sampling parameters: one definition for the offline API, the gateway and the workers.

Validated on construction; a bad value raises ValueError naming the field, before any work.
Every number is range-checked here, for both API faces and the offline API: integers must fit
the wire types the workers receive (int32, int64 for the seed) and floats must be finite, so a
value that would have made a scheduler or worker raise is refused where it enters (DESIGN.md §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.structured_outputs import StructuredOutputs

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128                 # choices per request: each is a sequence with its own KV blocks
MAX_LOGIT_BIAS = 100.0      # OpenAI's documented range for a bias
MAX_STOP, MAX_STOP_CHARS = 64, 1024   # stop strings per request, characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 4096         # the detokenizer and sampler cost grows with each


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
    # The output must match this (common/structured_outputs.py); None: free text.
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs",
                               StructuredOutputs(**self.structured_outputs))
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs", _short(self.structured_outputs),
               "None or a StructuredOutputs (or a dict of its fields)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", self.n,
               f"an integer in [1, {MAX_N}]")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, "a finite number >= 0")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_int(self.top_k) and -1 <= self.top_k <= INT32_MAX, "top_k", self.top_k,
               f"an integer in [1, {INT32_MAX}], or 0 / -1 for no limit")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, name, v, "in [-2, 2]")
        _check(self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX),
               "seed", self.seed, f"an integer in [{INT64_MIN}, {INT64_MAX}]")
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= INT32_MAX, "max_tokens",
               self.max_tokens, f"an integer in [1, {INT32_MAX}]")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, "an integer in [0, max_tokens]")
        _check(len(self.stop) <= MAX_STOP and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
            _short(self.stop), f"at most {MAX_STOP} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS and all(
            _is_token_id(t) for t in self.stop_token_ids), "stop_token_ids",
            _short(self.stop_token_ids), f"at most {MAX_STOP_TOKEN_IDS} token ids in "
            f"[0, {INT32_MAX}]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= 20), name, v,
                   "None or an integer in [0, 20]")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict)
                   and len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES and all(
                       _is_token_id(k) and _is_bias(v) for k, v in self.logit_bias.items()),
                   "logit_bias", _short(self.logit_bias), f"at most {MAX_LOGIT_BIAS_ENTRIES} "
                   f"entries of token id to a bias in [-{MAX_LOGIT_BIAS:g}, "
                   f"{MAX_LOGIT_BIAS:g}] (or -inf: never sample it)")
        # The grammar decides where a structured output ends (it allows EOS only there): a
        # min_tokens ban on EOS could leave a row with no token to sample.
        _check(self.structured_outputs is None or self.min_tokens == 0, "min_tokens",
               self.min_tokens, "0 with structured_outputs (the grammar decides the length)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A finite real: NaN and infinities are refused (they poison every later computation).
    An int too large for a float (e.g. 10**400) is refused too."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_bias(v) -> bool:
    # -inf bans a token outright; +inf or NaN would turn the whole row into NaN.
    return (_is_num(v) and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS) or (
        isinstance(v, float) and v == -math.inf)


def _is_token_id(v) -> bool:
    return _is_int(v) and 0 <= v <= INT32_MAX


def _short(value) -> object:
    """A value for an error message: a long list or mapping is named by its size."""
    try:
        return value if len(value) <= 8 else f"<{type(value).__name__} of {len(value)}>"
    except TypeError:
        return value


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
