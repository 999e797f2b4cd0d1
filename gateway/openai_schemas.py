"""Request and response bodies of the OpenAI-compatible HTTP API (the subset Tessera serves).

Requests declare types only; value ranges are checked once, by SamplingParams, so the HTTP
and the gRPC face give the same message for the same mistake. The ranges appear in the
served OpenAPI schema (``_doc``: documentation, the check stays SamplingParams'). Unknown
fields are ignored (as OpenAI and vLLM do), so newer SDKs that send extra fields keep working.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from common.sampling_params import (INT32_MAX, INT64_MAX, INT64_MIN, MAX_LOGIT_BIAS_ENTRIES,
                                    MAX_N, MAX_STOP, MAX_STOP_TOKEN_IDS)
from common.structured_outputs import MAX_CHOICES, MAX_SPEC_CHARS
from gateway.errors import invalid


def _doc(default: Any = None, **bounds: Any) -> Any:
    """A field whose JSON schema shows the bounds SamplingParams enforces."""
    return Field(default, json_schema_extra=bounds)


# Request fields handed to SamplingParams under the same name.
_PASSED = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
           "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
           "skip_special_tokens", "include_stop_str_in_output", "stop_token_ids")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaSpec(_Request):
    """OpenAI's `response_format.json_schema`. The schema is always enforced (`strict` or
    not): the output matches it or the request ends by length."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputsIn(_Request):
    """vLLM's `structured_outputs` extra: exactly one of the fields."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = _doc(maxLength=MAX_SPEC_CHARS)
    choice: list[str] | None = _doc(minItems=1, maxItems=MAX_CHOICES)
    grammar: str | None = _doc(maxLength=MAX_SPEC_CHARS)
    json_object: bool | None = None


# The older vLLM names: guided_X is structured_outputs.X.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


class _SamplingRequest(_Request):
    """Fields both endpoints take; None means "the SamplingParams default"."""
    model: str | None = None
    n: int | None = _doc(minimum=1, maximum=MAX_N)
    temperature: float | None = _doc(minimum=0)
    top_p: float | None = _doc(exclusiveMinimum=0, maximum=1)
    stop: str | list[str] | None = _doc(maxItems=MAX_STOP)
    seed: int | None = _doc(minimum=INT64_MIN, maximum=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = _doc(minimum=-2, maximum=2)
    frequency_penalty: float | None = _doc(minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = _doc(maxProperties=MAX_LOGIT_BIAS_ENTRIES)
    user: str | None = None
    # vLLM extras
    top_k: int | None = _doc(minimum=-1, maximum=INT32_MAX)
    min_p: float | None = _doc(minimum=0, maximum=1)
    repetition_penalty: float | None = _doc(exclusiveMinimum=0)
    min_tokens: int | None = _doc(minimum=0, maximum=INT32_MAX)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = _doc(maxItems=MAX_STOP_TOKEN_IDS)
    # Structured output: OpenAI's response_format, vLLM's structured_outputs (and the older
    # guided_* names); at most one of them. Compiled before enqueue: a bad spec is a 400.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsIn | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = _doc(maxLength=MAX_SPEC_CHARS)
    guided_choice: list[str] | None = _doc(minItems=1, maxItems=MAX_CHOICES)
    guided_grammar: str | None = _doc(maxLength=MAX_SPEC_CHARS)
    # Tessera extension (DESIGN.md §4): keep generating when the client goes away.
    disconnect: Literal["cancel", "continue"] = "cancel"

    def structured_spec(self) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """(StructuredOutputs fields, or None; for each `structured_outputs.KIND` the request
        field it came from, so errors name what the client sent). Two sources: a 400."""
        sources: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            sources.append(("response_format", {"json_object": True},
                            {"json_object": "response_format"}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise invalid("response_format of type json_schema needs json_schema.schema",
                              "response_format.json_schema.schema")
            sources.append(("response_format", {"json": rf.json_schema.schema_},
                            {"json": "response_format.json_schema.schema"}))
        so = self.structured_outputs
        if so is not None:
            fields = {k: v for k, v in (("json", so.json_), ("regex", so.regex),
                                        ("choice", so.choice), ("grammar", so.grammar),
                                        ("json_object", so.json_object))
                      if v is not None and v is not False}
            sources.append(("structured_outputs", fields,
                            {k: f"structured_outputs.{k}" for k in fields}))
        for name, kind in _GUIDED.items():
            value = getattr(self, name)
            if value is not None:
                sources.append((name, {kind: value}, {kind: name}))
        if not sources:
            return None, {}
        if len(sources) > 1:
            raise invalid("set at most one of response_format, structured_outputs, "
                          f"guided_json, guided_regex, guided_choice, guided_grammar; got "
                          f"{', '.join(n for n, _, _ in sources)}", sources[1][0])
        _, fields, names = sources[0]
        return fields, {f"structured_outputs.{k}": v for k, v in names.items()}

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams keyword arguments this request sets (max_tokens and logprobs
        are the endpoints' own business). Raises ValueError("logit_bias ...")."""
        kw: dict[str, Any] = {k: getattr(self, k) for k in _PASSED
                              if getattr(self, k) is not None}
        spec, _ = self.structured_spec()
        if spec is not None:
            kw["structured_outputs"] = spec
        if self.stop is not None:
            kw["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.logit_bias:
            try:
                kw["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids") from None
        return kw

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = _doc(16, minimum=1, maximum=INT32_MAX)
    logprobs: int | None = _doc(minimum=0, maximum=20)
    echo: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)   # vLLM joins text parts so
        # OpenAI's "developer" role is the system role of newer models.
        return {"role": "system" if self.role == "developer" else self.role,
                "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn]
    max_tokens: int | None = _doc(minimum=1, maximum=INT32_MAX)
    max_completion_tokens: int | None = _doc(minimum=1, maximum=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = _doc(minimum=0, maximum=20)


# ---- responses ---------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends only what a delta changes: {"role": ...} first, then {"content": ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tessera"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
