"""The one check of a prompt against a deployment's limits, wherever a prompt enters (the
offline `LLM`, the engine, the scheduler, the gateway): one rule, one message per failure."""

from __future__ import annotations

from collections.abc import Sequence


class PromptError(ValueError):
    """A prompt that cannot be served; the message says why (never the prompt's text)."""
    param = "prompt"


def check_prompt(token_ids: Sequence[int], max_model_len: int | None = None,
                 vocab_size: int | None = None) -> None:
    """Raise PromptError unless `token_ids` is non-empty, within the vocabulary (when given)
    and leaves at least one position of `max_model_len` (when given) for the output."""
    if not token_ids:
        raise PromptError("the prompt is empty")
    if vocab_size is not None:
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise PromptError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if max_model_len is not None and len(token_ids) >= max_model_len:
        raise PromptError(f"prompt of {len(token_ids)} tokens is too long: max_model_len is "
                          f"{max_model_len} (at least one token must remain for the output)")
