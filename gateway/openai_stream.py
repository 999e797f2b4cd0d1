"""The OpenAI face's SSE streams, for a request's first relay and for a resume alike.

Every SSE event that carries an output event's deltas has ``id: <request_id>:<index>`` (the
index of that output event), so a client that loses the connection resumes after the last
id it saw with ``GET /v1/streams/{request_id}`` (``Last-Event-ID``) on any replica, and gets
the same chunks the first relay would have sent next. The chunks of one output event go out
in ONE write with the id on its last SSE event: a client has all of them or none.
Events that precede every output event (chat's role chunk, completions' echo) carry no id and
are replayed only by a resume from the start; the usage chunk and ``[DONE]`` end every relay.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from common.convert import StreamChunk
from gateway import openai_format as fmt
from gateway import openai_schemas as s
from gateway.errors import GatewayError
from gateway.generation import Generation
from gateway.state import GatewayState
from gateway.resume import event_id


def sse(payload: BaseModel | dict, eid: str | None = None) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n" if eid is None else f"id: {eid}\ndata: {data}\n\n"


def _event(parts: list[BaseModel], request_id: str, index: int) -> str:
    """The SSE events of one output event, the id on the last (one write)."""
    return "".join(sse(p, event_id(request_id, index) if k == len(parts) - 1 else None)
                   for k, p in enumerate(parts))


async def merge(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Chunks of several generations (a batch of prompts) as they come: (which, chunk)."""
    if len(gens) == 1:
        async for chunk in gens[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for chunk in g.chunks():
                await queue.put((i, chunk, None))
            await queue.put((i, None, None))
        except Exception as e:   # handed to the consumer, which raises it
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, chunk, err = await queue.get()
            if err is not None:
                raise err
            if chunk is None:
                left -= 1
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()


def stream_response(gens: list[Generation], body: Callable[[], AsyncIterator[str]],
                    headers: dict[str, str]) -> StreamingResponse:
    """SSE around ``body``; a failure mid-stream becomes an error event; leaving early (the
    client went away) cancels the generations unless their policy is ``continue``."""
    async def events() -> AsyncIterator[str]:
        try:
            async for line in body():
                yield line
        except GatewayError as e:
            yield sse(s.error_body(e.message, e.type, e.param, e.code))
        finally:
            for g in gens:
                g.close()
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def completion_events(state: GatewayState, rid: str, gens: Sequence[Generation],
                            echo_texts: Sequence[str | None] | None, include_usage: bool,
                            created: int, resumed: bool) -> AsyncIterator[str]:
    """A completion's SSE events; ``echo_texts`` (one per prompt) when echo was asked."""
    if echo_texts is not None and not resumed:
        for i, g in enumerate(gens):
            for j in range(g.params.n):
                yield sse(fmt.completion_chunk(state, rid, i * g.params.n + j,
                                               fmt.prompt_text(state, g, echo_texts[i]),
                                               created=created))
    async for i, chunk in merge(gens):
        n = gens[i].params.n
        parts = [fmt.completion_chunk(state, rid, i * n + c.index, c.text,
                                      fmt.legacy_logprobs(state, c.logprobs), c.finish_reason,
                                      created=created) for c in chunk.choices]
        if parts:
            yield _event(parts, gens[i].request_id, chunk.index)
    if include_usage:
        yield sse(s.CompletionResponse(id=rid, model=state.model_name, choices=[],
                                       usage=fmt.total_usage(gens), created=created))


async def chat_events(state: GatewayState, rid: str, gen: Generation, include_usage: bool,
                      created: int, resumed: bool) -> AsyncIterator[str]:
    """A chat completion's SSE events: the role first (as OpenAI sends it), then content
    deltas (one per output event, "" when it added no visible text, so ids stay contiguous),
    then each choice's finish chunk with an empty delta."""
    if not resumed:
        for j in range(gen.params.n):
            yield sse(fmt.chat_chunk(state, rid, j, s.DeltaMessage(role="assistant", content=""),
                                     created=created))
    async for _, chunk in merge([gen]):
        parts = []
        for c in chunk.choices:
            if c.text or c.logprobs or c.token_ids:
                parts.append(fmt.chat_chunk(state, rid, c.index, s.DeltaMessage(content=c.text),
                                            fmt.chat_logprobs(state, c.logprobs),
                                            created=created))
            if c.finish_reason is not None:
                parts.append(fmt.chat_chunk(state, rid, c.index, s.DeltaMessage(),
                                            finish_reason=c.finish_reason, created=created))
        if parts:
            yield _event(parts, gen.request_id, chunk.index)
    if include_usage:
        yield sse(s.ChatCompletionChunk(id=rid, model=state.model_name, choices=[],
                                        usage=fmt.total_usage([gen]), created=created))
