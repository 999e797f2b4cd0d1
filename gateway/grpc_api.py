"""The gRPC face of the gateway: tessera.v1.Generate, grpc.health.v1 and server reflection.

Same core as the HTTP face (gateway.state and gateway.generation), so both answer the same
request the same way; HTTP 400 / 404 / 413 / 503 / 500 become INVALID_ARGUMENT / NOT_FOUND /
RESOURCE_EXHAUSTED / UNAVAILABLE / INTERNAL. Messages are converted in common.convert only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import convert
from common import redis_schema as schema
from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc
from common.sampling_params import INT32_MAX
from gateway.auth import UNAUTHENTICATED, GrpcAuth, grpc_tenant
from gateway.errors import GatewayError, invalid
from gateway.generation import Generation
from gateway.state import GatewayState
from gateway.resume import KIND_CHAT, KIND_COMPLETION

logger = logging.getLogger(__name__)

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    """tessera.v1.Generate on a GatewayState."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def _abort(self, context: grpc.aio.ServicerContext, e: GatewayError) -> None:
        # A 429's retry-after and x-ratelimit-* travel as trailing metadata.
        await context.abort(_CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message,
                            tuple(e.headers.items()))

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        tenant = grpc_tenant(self.state.tenants, context.invocation_metadata())
        if tenant is None:   # GrpcAuth refuses these first; kept for servers built without it
            raise GatewayError(401, UNAUTHENTICATED)
        return tenant

    def _prompt_ids(self, prompt: convert.Prompt | None) -> list[int]:
        if prompt is None:
            raise invalid("a prompt is required (text, token_ids or chat)", "prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.state.render_chat(prompt)
        return self.state.encode_prompt(prompt)

    async def _open(self, request: generate_pb2.GenerateRequest,
                    context: grpc.aio.ServicerContext) -> Generation:
        """Validate and enqueue, or reattach to a running request (last_event_index set)."""
        tenant = self._tenant(context)
        try:
            call = convert.generate_request_from_proto(request)
        except ValueError as e:
            raise invalid(str(e), str(e).split(" ", 1)[0]) from None
        state = self.state
        state.check_model(call.model)
        if call.disconnect not in (schema.DISCONNECT_CANCEL, schema.DISCONNECT_CONTINUE):
            raise invalid(f"unknown disconnect policy {call.disconnect}", "disconnect_policy")
        if call.last_event_index is not None:
            if not call.request_id:
                raise invalid("a resume (last_event_index) needs the request_id", "request_id")
            if not -1 <= call.last_event_index <= INT32_MAX:
                raise invalid(f"last_event_index must be in [-1, {INT32_MAX}], got "
                              f"{call.last_event_index}", "last_event_index")
            await state.check_owner(call.request_id, tenant)
            # The record holds the prompt's context, params and shape, so a resume needs
            # neither prompt nor params and works on any replica; they are only the fallback
            # for a record written without them.
            ids = self._prompt_ids(call.prompt) if call.prompt is not None else []
            return await state.reattach(call.request_id, call.last_event_index,
                                        fallback=(ids, call.params, call.disconnect))
        kind = KIND_CHAT if request.WhichOneof("prompt") == "chat" else KIND_COMPLETION
        await state.check_structured(call.params)
        return await state.start(self._prompt_ids(call.prompt), call.params,
                                 request_id=call.request_id, kind=kind,
                                 idempotency_key=call.idempotency_key or None,
                                 priority=call.priority, disconnect=call.disconnect,
                                 tenant=tenant)

    def _call(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """The traced, timed client call (gateway.telemetry), continuing the metadata's
        traceparent."""
        operation = "chat" if request.WhichOneof("prompt") == "chat" else "text_completion"
        return self.state.telemetry.call(operation, context.invocation_metadata() or ())

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.GenerateResponse:
        gen = None
        with self._call(request, context):
            try:
                gen = await self._open(request, context)
                result = await gen.collect()
            except GatewayError as e:
                await self._abort(context, e)
            finally:   # cancelled (the client went away) or failed: stop the generation
                if gen is not None:
                    gen.close()
        return convert.generate_result_to_proto(result)

    async def GenerateStream(self, request: generate_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        gen = None
        with self._call(request, context):
            try:
                gen = await self._open(request, context)
                async for chunk in gen.chunks():
                    yield convert.stream_chunk_to_proto(chunk)
            except GatewayError as e:
                await self._abort(context, e)
            finally:
                if gen is not None:
                    gen.close()

    async def Tokenize(self, request: generate_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.TokenizeResponse:
        try:
            self.state.check_model(request.model)
            ids = self._prompt_ids(convert.prompt_from_proto(request))
        except GatewayError as e:
            await self._abort(context, e)
        return generate_pb2.TokenizeResponse(token_ids=ids)

    async def ListModels(self, request: generate_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> generate_pb2.ListModelsResponse:
        return generate_pb2.ListModelsResponse(
            models=[convert.model_info_to_proto(self.state.model_info)])

    async def Cancel(self, request: generate_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> generate_pb2.CancelResponse:
        if not request.request_id:
            await self._abort(context, invalid("request_id is required", "request_id"))
        # Unknown or finished ids are not an error: a cancel races with the generation's end.
        # Another tenant's request counts as unknown: nothing is cancelled, nothing revealed.
        try:
            await self.state.check_owner(request.request_id, self._tenant(context))
        except GatewayError as e:
            if e.status == 401:
                await self._abort(context, e)
            return generate_pb2.CancelResponse()
        await self.state.submitter.cancel(request.request_id)
        return generate_pb2.CancelResponse()


class _Health(health.aio.HealthServicer):
    """grpc.health.v1 with the Generate service's status computed when asked: SERVING while
    a scheduler of the model is ready (the same answer as HTTP /ready)."""

    def __init__(self, state: GatewayState) -> None:
        super().__init__()
        self.state = state

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service != SERVICE_NAME:
            return await super().Check(request, context)
        ready = await self.state.is_ready()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING)


async def create_server(state: GatewayState, address: str,
                        tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int]:
    """A started-to-be grpc.aio server bound to ``address``; returns it and the bound port.
    With ``tls`` (PEM certificate chain, private key) the port speaks TLS only.

    The receive limit is the HTTP face's body limit: gRPC answers RESOURCE_EXHAUSTED itself
    for a larger message, before any of our code runs.
    """
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", state.max_body_bytes)],
        interceptors=[GrpcAuth(state.tenants, SERVICE_NAME)])
    generate_pb2_grpc.add_GenerateServicer_to_server(GenerateServicer(state), server)
    health_servicer = _Health(state)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Liveness: "" (this process answers). Readiness: the Generate service (_Health.Check).
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {address}")
    return server, port
