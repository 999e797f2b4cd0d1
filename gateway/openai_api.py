"""The OpenAI-compatible HTTP face of the gateway: /v1/models, /v1/completions,
/v1/chat/completions (JSON or SSE), /health, /ready and /metrics.

Bodies are parsed by hand (not by FastAPI's parameter injection) so that every bad input gets
OpenAI's error shape with a 400, never FastAPI's 422; the work itself is
gateway.state's and gateway.generation's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import redis_schema as schema
from gateway import openai_format as fmt
from gateway import openai_schemas as s
from gateway import openapi
from gateway.auth import HttpAuth
from gateway.errors import GatewayError, invalid
from gateway.generation import Generation
from gateway.state import GatewayState
from gateway.openai_stream import chat_events, completion_events, stream_response
from gateway.queue import RequestNotFound
from gateway.resume import KIND_CHAT, KIND_COMPLETION, parse_event_id
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
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, bad UTF-8 and integers past Python's digit limit;
        # RecursionError a body nested too deep. Either is the client's mistake, never a 500.
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


async def _start_all(state: GatewayState, prompts: list[list[int]], params: Any,
                     req: s._SamplingRequest, request: Request, kind: str,
                     echo_texts: list[str | None] | None = None) -> list[Generation]:
    """Enqueue one request per prompt. Request ids are ``cmpl-...`` / ``chatcmpl-...``, so the
    id of every chunk (the first request's, for a batch) is a request id clients can resume."""
    await state.check_structured(params, req.structured_spec()[1])
    key = request.headers.get("idempotency-key")
    prefix = "chatcmpl" if kind == KIND_CHAT else "cmpl"
    gens = []
    try:
        for i, ids in enumerate(prompts):
            k = None if key is None else (key if len(prompts) == 1 else f"{key}#{i}")
            gens.append(await state.start(
                ids, params, request_id=f"{prefix}-{uuid.uuid4().hex}", idempotency_key=k,
                disconnect=req.disconnect, kind=kind, include_usage=req.include_usage,
                echo_text=None if echo_texts is None else fmt.prompt_text_of(
                    state, ids, params, echo_texts[i]),
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


async def _record(state: GatewayState, request_id: str) -> dict[str, str]:
    try:
        return await state.submitter.record(request_id)
    except RequestNotFound:
        raise GatewayError(404, f"request {request_id} is unknown or expired", "request_id",
                           "request_not_found") from None
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
    # /openapi.json and /docs are open (no prompt data), like /health.
    app = FastAPI(title="Tessera gateway", version="1", docs_url="/docs", redoc_url=None,
                  description="OpenAI-compatible completions and chat, plus stream resume.")
    openapi.install(app, [s.CompletionRequest, s.ChatCompletionRequest])
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

    @app.post("/v1/completions", openapi_extra=openapi.body(s.CompletionRequest))
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
                                   prompt_logprobs=echo_logprobs,
                                   structured_names=req.structured_spec()[1], **kwargs)
        for ids in prompts:
            state.check_length(len(ids), params.max_tokens)
        gens = await _start_all(state, prompts, params, req, request, KIND_COMPLETION,
                                texts if req.echo else None)
        rid = gens[0].request_id
        created = gens[0].meta.created
        headers = {"X-Request-Id": rid, **gens[0].rate_headers}
        if not req.stream:
            await _collect(gens, request)
            return JSONResponse(fmt.completion_response(state, rid, req.echo, gens, texts,
                                                        created).model_dump(), headers=headers)
        return stream_response(gens, lambda: completion_events(
            state, rid, gens, texts if req.echo else None, req.include_usage, created,
            resumed=False), headers)

    @app.post("/v1/chat/completions", openapi_extra=openapi.body(s.ChatCompletionRequest))
    async def chat(request: Request) -> Response:
        req = await _parse(request, s.ChatCompletionRequest)
        state.check_model(req.model)
        ids = state.render_chat([m.as_template_message() for m in req.messages])
        params = fmt.chat_params(state, req, len(ids))
        gens = await _start_all(state, [ids], params, req, request, KIND_CHAT)
        rid, created = gens[0].request_id, gens[0].meta.created
        headers = {"X-Request-Id": rid, **gens[0].rate_headers}
        if not req.stream:
            await _collect(gens, request)
            return JSONResponse(fmt.chat_response(state, rid, gens[0], created).model_dump(),
                                headers=headers)
        return stream_response(gens, lambda: chat_events(
            state, rid, gens[0], req.include_usage, created, resumed=False), headers)

    @app.get("/v1/streams/{request_id}")
    async def resume_stream(request_id: str, request: Request) -> Response:
        """Replay a request's stream after the client's last event id, then continue live
        (DESIGN.md §4): served from Redis, so by any replica."""
        raw = request.headers.get("last-event-id")
        if raw is None:
            raw = request.query_params.get("last_event_id")
        try:
            last = parse_event_id(raw, request_id)
        except ValueError as e:
            raise invalid(str(e), "Last-Event-ID") from None
        await state.check_owner(request_id, request.state.tenant)
        gen = await state.reattach(request_id, last)
        meta = gen.meta
        headers = {"X-Request-Id": request_id}
        if meta.kind == KIND_CHAT:
            body = lambda: chat_events(state, request_id, gen, meta.include_usage,  # noqa: E731
                                       meta.created, resumed=last >= 0)
        else:
            echo = None if meta.echo_text is None else [meta.echo_text]
            body = lambda: completion_events(state, request_id, [gen], echo,  # noqa: E731
                                             meta.include_usage, meta.created,
                                             resumed=last >= 0)
        return stream_response([gen], body, headers)

    @app.get("/v1/requests/{request_id}")
    async def request_result(request_id: str, request: Request) -> Response:
        """A request's final result, as its POST would have answered it (a non-streaming
        client whose gateway died fetches it here), or 202 while it runs."""
        await state.check_owner(request_id, request.state.tenant)
        rec = await _record(state, request_id)
        headers = {"X-Request-Id": request_id}
        if rec.get("state") not in schema.TERMINAL_STATES:
            return JSONResponse({"id": request_id, "object": "request",
                                 "status": rec.get("state", "queued")}, 202, headers=headers)
        gen = await state.reattach(request_id)
        gen.disconnect = schema.DISCONNECT_CONTINUE   # reading a result never cancels
        try:
            await gen.collect()
        finally:
            gen.close()
        meta = gen.meta
        if meta.kind == KIND_CHAT:
            out = fmt.chat_response(state, request_id, gen, meta.created)
        else:
            out = fmt.completion_response(state, request_id, meta.echo_text is not None,
                                          [gen], [meta.echo_text], meta.created)
        return JSONResponse(out.model_dump(), headers=headers)

    return app

