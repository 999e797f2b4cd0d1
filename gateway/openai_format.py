"""Builders between the gateway core and the OpenAI bodies: prompts in, choices and logprobs
out. Kept apart from openai_api.py so the routes read on one screen."""

from __future__ import annotations

from collections.abc import Sequence

from common.convert import TokenLogprobs
from common.sampling_params import SamplingParams
from gateway import openai_schemas as s
from gateway.errors import GatewayError, invalid
from gateway.generation import Generation
from gateway.state import GatewayState


def completion_prompts(state: GatewayState, prompt: str | list
                       ) -> tuple[list[list[int]], list[str | None]]:
    """A completion's prompt(s) as token ids, with the original text where there was one
    (echo returns it as sent, not a re-decoding)."""
    if isinstance(prompt, str):
        return [state.encode_prompt(prompt)], [prompt]
    if not prompt:
        raise invalid("the prompt is empty", "prompt")
    if isinstance(prompt[0], str):
        return [state.encode_prompt(p) for p in prompt], list(prompt)
    if isinstance(prompt[0], int):
        return [state.encode_prompt(prompt)], [None]
    return [state.encode_prompt(p) for p in prompt], [None] * len(prompt)


def prompt_text(state: GatewayState, g: Generation, text: str | None) -> str:
    if text is not None:
        return text
    return state.tokenizer.decode(g.prompt_token_ids, g.params.skip_special_tokens)


def prompt_text_of(state: GatewayState, ids: list[int], params: SamplingParams,
                   text: str | None) -> str:
    """The echo of a prompt: its text as sent, or its ids decoded."""
    return text if text is not None else state.tokenizer.decode(ids, params.skip_special_tokens)


def token_str(state: GatewayState, token_id: int) -> str:
    return state.tokenizer.decode([token_id], skip_special_tokens=False)


def legacy_logprobs(state: GatewayState, lps: TokenLogprobs | None, offset: int = 0,
                    prompt: tuple[list[int], list | None] | None = None
                    ) -> s.CompletionLogprobs | None:
    """The completions API's parallel lists; with ``prompt`` (echo), the prompt's tokens come
    first, the first without a logprob (nothing precedes it)."""
    if lps is None:
        return None
    out = s.CompletionLogprobs()

    def add(token_id: int, lp: float | None, top: dict[str, float] | None) -> None:
        text = token_str(state, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(top)
        out.text_offset.append(offset + sum(len(t) for t in out.tokens[:-1]))

    if prompt is not None:
        ids, entries = prompt
        entries = list(entries or [])
        for pos, token_id in enumerate(ids):
            e = entries[pos] if pos < len(entries) else None
            if e is None:
                add(token_id, None, None)
            else:
                add(token_id, e[0], {token_str(state, i): v for i, v in e[1]})
    for token_id, lp, top in lps:
        # vLLM's convention: the sampled token is in its own top dict.
        add(token_id, lp, {token_str(state, token_id): lp,
                           **{token_str(state, i): v for i, v in top}})
    return out


def completion_chunk(state: GatewayState, rid: str, index: int, text: str,
                     logprobs: s.CompletionLogprobs | None = None,
                     finish_reason: str | None = None, created: int | None = None
                     ) -> s.CompletionResponse:
    extra = {} if created is None else {"created": created}
    return s.CompletionResponse(id=rid, model=state.model_name, choices=[s.CompletionChoice(
        index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)], **extra)


def completion_response(state: GatewayState, rid: str, echo_prompt: bool,
                        gens: Sequence[Generation], texts: Sequence[str | None],
                        created: int | None = None) -> s.CompletionResponse:
    choices = []
    for i, g in enumerate(gens):
        echo = prompt_text(state, g, texts[i]) if echo_prompt else ""
        for c in g.result().choices:
            lp = legacy_logprobs(state, c.logprobs, len(echo), None)
            if lp is not None and echo_prompt:
                lp = legacy_logprobs(state, c.logprobs, 0,
                                     (g.prompt_token_ids, g.prompt_logprobs))
            choices.append(s.CompletionChoice(index=i * g.params.n + c.index,
                                              text=echo + c.text, logprobs=lp,
                                              finish_reason=c.finish_reason))
    extra = {} if created is None else {"created": created}
    return s.CompletionResponse(id=rid, model=state.model_name, choices=choices,
                                usage=total_usage(gens), **extra)


def total_usage(gens: Sequence[Generation]) -> s.UsageInfo:
    return s.UsageInfo.of(sum(g.usage[0] for g in gens), sum(g.usage[1] for g in gens))


def chat_params(state: GatewayState, req: s.ChatCompletionRequest,
                num_prompt_tokens: int) -> SamplingParams:
    """max_completion_tokens wins over the deprecated max_tokens; neither: the rest of the
    context. Errors name the chat API's parameter, not SamplingParams' field."""
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = state.default_max_tokens(num_prompt_tokens)
    try:
        kwargs = req.sampling_kwargs()
    except ValueError as e:
        raise invalid(str(e), "logit_bias") from None
    try:
        params = state.make_params(max_tokens=max_tokens,
                                   logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                   structured_names=req.structured_spec()[1], **kwargs)
    except GatewayError as e:
        e.param = {"logprobs": "top_logprobs", "max_tokens": param}.get(e.param, e.param)
        raise
    state.check_length(num_prompt_tokens, params.max_tokens, "messages")
    return params


def chat_logprobs(state: GatewayState, lps: TokenLogprobs | None) -> s.ChatLogprobs | None:
    if lps is None:
        return None

    def entry(token_id: int, lp: float) -> dict:
        text = token_str(state, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return s.ChatLogprobs(content=[
        s.ChatLogprob(**entry(t, lp), top_logprobs=[s.TopLogprob(**entry(i, v)) for i, v in top])
        for t, lp, top in lps])


def chat_response(state: GatewayState, rid: str, g: Generation,
                  created: int | None = None) -> s.ChatCompletionResponse:
    choices = [s.ChatChoice(index=c.index, message=s.ChatMessageOut(content=c.text),
                            logprobs=chat_logprobs(state, c.logprobs),
                            finish_reason=c.finish_reason)
               for c in g.result().choices]
    extra = {} if created is None else {"created": created}
    return s.ChatCompletionResponse(id=rid, model=state.model_name, choices=choices,
                                    usage=total_usage([g]), **extra)


def chat_chunk(state: GatewayState, rid: str, index: int, delta: s.DeltaMessage,
               logprobs: s.ChatLogprobs | None = None,
               finish_reason: str | None = None, created: int | None = None
               ) -> s.ChatCompletionChunk:
    extra = {} if created is None else {"created": created}
    return s.ChatCompletionChunk(id=rid, model=state.model_name, choices=[s.ChatStreamChoice(
        index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)], **extra)


