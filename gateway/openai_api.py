"""The OpenAI-compatible HTTP face of the gateway: /v1/models, /v1/completions,
/v1/chat/completions (JSON or SSE), /health, /ready and /metrics.

Bodies are parsed by hand (not by FastAPI's parameter injection) so that every bad input gets
OpenAI's error shape with a 400, never FastAPI's 422; the work itself is gateway.generation's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.convert import StreamChunk
from gateway import openai_format as fmt
from gateway import openai_schemas as s
from gateway.auth import HttpAuth
from gateway.generation import GatewayError, GatewayState, Generation, invalid
from gateway.telemetry import CallTracing

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _error(e: GatewayError) -> JSONResponse:
    return JSONResponse(s.error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                        headers=e.headers or None)


class BodyLimit:
    """413 for a body over ``max_bytes``: by Content-Length up front, and by counting what
    actually arrives (a chunked body has no length). The body is read whole, then replayed
    to the app; later receive() calls pass through, so disconnects are still seen."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = GatewayError(413, f"request body exceeds {self.max_bytes} bytes",
                                 code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error(too_large)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return   # the client went away before its body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _error(too_large)(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _parse(request: Request, model: type[M]) -> M:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # Drop pydantic's union-member tags ("str", "list[int]") from the location.
        loc = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or not (
            "[" in x or "-" in x or x in _TYPE_TAGS))
        raise invalid(f"{loc}: {err['msg']}" if loc else err["msg"], loc or None) from None


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _merge(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, StreamChunk]]:
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


def _stream(gens: list[Generation], body: Callable[[], AsyncIterator[str]],
            headers: dict[str, str]) -> StreamingResponse:
    """SSE around ``body``; a failure mid-stream becomes an error event; leaving early (the
    client went away) cancels the generations unless their policy is ``continue``."""
    async def events() -> AsyncIterator[str]:
        try:
            async for line in body():
                yield line
        except GatewayError as e:
            yield _sse(s.error_body(e.message, e.type, e.param, e.code))
        finally:
            for g in gens:
                g.close()
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _start_all(state: GatewayState, prompts: list[list[int]], params: Any,
                     req: s._SamplingRequest, request: Request) -> list[Generation]:
    key = request.headers.get("idempotency-key")
    gens = []
    try:
        for i, ids in enumerate(prompts):
            k = None if key is None else (key if len(prompts) == 1 else f"{key}#{i}")
            gens.append(await state.start(ids, params, idempotency_key=k,
                                          disconnect=req.disconnect,
                                          tenant=request.state.tenant))
    except BaseException:
        for g in gens:
            g.close()
        raise
    return gens


async def _collect(gens: list[Generation], request: Request) -> None:
    """Run the generations to the end, unless the client goes away first (Starlette does
    not cancel a non-streaming handler then: we watch for the disconnect ourselves)."""
    work = asyncio.ensure_future(asyncio.gather(*(g.collect() for g in gens)))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done() or not watch.done():
            await work
    finally:   # failed, cancelled or abandoned: stop relaying, cancel what still runs
        work.cancel()
        watch.cancel()
        for g in gens:
            g.close()


async def _disconnected(request: Request) -> None:
    # The body was read (and replayed by BodyLimit): the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def add_ops_routes(app: FastAPI, state: GatewayState) -> None:
    """/health, /ready and /metrics: no prompt data, never behind a key; also served alone on
    --metrics-port (create_ops_app) so they can live on a port the public never reaches."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if await state.is_ready():
            return JSONResponse({"status": "ready"})
        return _error(GatewayError(503, f"no scheduler of {state.model_name} is ready (none ran "
                                   "a forward pass within its ready timeout)"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.telemetry.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_ops_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="Tessera gateway (operations)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    add_ops_routes(app, state)
    return app


def create_app(state: GatewayState) -> FastAPI:
    """The HTTP app of one gateway replica, serving ``state``'s model."""
    app = FastAPI(title="Tessera gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes)
    # Outside the body limit: a client without a valid key is refused before its body is read.
    app.add_middleware(HttpAuth, tenants=state.tenants)
    # Outermost: an inference call is traced and timed from arrival to its last byte.
    app.add_middleware(CallTracing, telemetry_=state.telemetry)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, e: GatewayError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(s.error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error")   # the traceback, never the request body
        return JSONResponse(s.error_body("internal server error", "server_error"), 500)

    add_ops_routes(app, state)

    @app.get("/v1/models")
    async def models() -> Response:
        m = state.model_info
        card = s.ModelCard(id=m.id, created=m.created, max_model_len=m.max_model_len)
        return JSONResponse(s.ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, s.CompletionRequest)
        state.check_model(req.model)
        prompts, texts = fmt.completion_prompts(state, req.prompt)
        try:
            kwargs = req.sampling_kwargs()
        except ValueError as e:
            raise invalid(str(e), "logit_bias") from None
        echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        params = state.make_params(max_tokens=req.max_tokens if req.max_tokens is not None
                                   else 16, logprobs=req.logprobs,
                                   prompt_logprobs=echo_logprobs, **kwargs)
        for ids in prompts:
            state.check_length(len(ids), params.max_tokens)
        gens = await _start_all(state, prompts, params, req, request)
        rid = f"cmpl-{gens[0].request_id}"
        headers = {"X-Request-Id": gens[0].request_id, **gens[0].rate_headers}
        if not req.stream:
            await _collect(gens, request)
            return JSONResponse(fmt.completion_response(state, rid, req, gens, texts).model_dump(),
                                headers=headers)

        async def body() -> AsyncIterator[str]:
            if req.echo:
                for i, g in enumerate(gens):
                    for j in range(params.n):
                        yield _sse(fmt.completion_chunk(state, rid, i * params.n + j,
                                                        fmt.prompt_text(state, g, texts[i])))
            async for i, chunk in _merge(gens):
                for c in chunk.choices:
                    yield _sse(fmt.completion_chunk(state, rid, i * params.n + c.index, c.text,
                                                    fmt.legacy_logprobs(state, c.logprobs),
                                                    c.finish_reason))
            if req.include_usage:
                usage = fmt.total_usage(gens)
                yield _sse(s.CompletionResponse(id=rid, model=state.model_name, choices=[],
                                                usage=usage))
        return _stream(gens, body, headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await _parse(request, s.ChatCompletionRequest)
        state.check_model(req.model)
        ids = state.render_chat([m.as_template_message() for m in req.messages])
        params = fmt.chat_params(state, req, len(ids))
        gens = await _start_all(state, [ids], params, req, request)
        rid = f"chatcmpl-{gens[0].request_id}"
        headers = {"X-Request-Id": gens[0].request_id, **gens[0].rate_headers}
        if not req.stream:
            await _collect(gens, request)
            return JSONResponse(fmt.chat_response(state, rid, gens[0]).model_dump(),
                                headers=headers)

        async def body() -> AsyncIterator[str]:
            for j in range(params.n):   # the role comes first, as OpenAI sends it
                yield _sse(fmt.chat_chunk(state, rid, j, s.DeltaMessage(role="assistant",
                                                                        content="")))
            async for _, chunk in _merge(gens):
                for c in chunk.choices:
                    if c.text or c.logprobs:
                        yield _sse(fmt.chat_chunk(state, rid, c.index,
                                                  s.DeltaMessage(content=c.text),
                                                  fmt.chat_logprobs(state, c.logprobs)))
                    if c.finish_reason is not None:
                        yield _sse(fmt.chat_chunk(state, rid, c.index, s.DeltaMessage(),
                                                  finish_reason=c.finish_reason))
            if req.include_usage:
                yield _sse(s.ChatCompletionChunk(id=rid, model=state.model_name, choices=[],
                                                 usage=fmt.total_usage(gens)))
        return _stream(gens, body, headers)

    return app

