"""Python clients of a Tessera gateway's gRPC API (tessera.v1.Generate), sync and asyncio.

    from tessera.client import TesseraClient

    with TesseraClient("127.0.0.1:50051") as client:
        result = client.generate("The capital of France is", max_tokens=16, temperature=0)
        print(result.choices[0].text, result.completion_tokens)
        for chunk in client.stream("Once upon a time", max_tokens=32):
            print(chunk.choices[0].text if chunk.choices else "", end="", flush=True)

Sampling arguments are SamplingParams' fields (validated here, before any network call, with
a ValueError naming the field). A server refusal raises TesseraError with the gRPC status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc

from common import convert
from common.convert import Choice, GenerateResult, ModelInfo, StreamChunk
from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc
from common.sampling_params import SamplingParams

__all__ = ["TesseraClient", "AsyncTesseraClient", "TesseraError", "GenerateResult",
           "StreamChunk", "Choice", "ModelInfo"]

# Text, token ids, or chat messages ({"role": ..., "content": ...}) rendered by the server
# with the model's chat template.
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


class TesseraError(Exception):
    """The gateway refused or failed a call; ``code`` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _error(e: grpc.RpcError) -> TesseraError:
    return TesseraError(e.code(), e.details() or "")  # type: ignore[attr-defined]


def _prompt(prompt: Prompt) -> convert.Prompt:
    if isinstance(prompt, str):
        return prompt
    items = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        return [{"role": m["role"], "content": m["content"]} for m in items]
    return [int(t) for t in items]   # type: ignore[arg-type]


def _request(prompt: Prompt | None, model: str, request_id: str, idempotency_key: str,
             last_event_index: int | None, priority: int, disconnect: str,
             sampling: dict[str, Any]) -> generate_pb2.GenerateRequest:
    call = convert.GenerateCall(
        model=model, prompt=None if prompt is None else _prompt(prompt),
        params=SamplingParams(**sampling), request_id=request_id,
        idempotency_key=idempotency_key, last_event_index=last_event_index,
        priority=priority, disconnect=disconnect)
    return convert.generate_request_to_proto(call)


def _tokenize_request(text: str | Sequence[Mapping[str, str]], model: str
                      ) -> generate_pb2.TokenizeRequest:
    msg = generate_pb2.TokenizeRequest(model=model)
    convert.prompt_to_proto(msg, text if isinstance(text, str) else _prompt(text))
    return msg


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The gateway's key check (``--api-key`` / ``--tenants``) reads this metadata."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _open_channel(module: Any, address: str, options: Sequence[tuple[str, Any]],
                  root_certificates: bytes | None) -> Any:
    """``module`` is grpc or grpc.aio; TLS when root certificates are given."""
    if root_certificates is None:
        return module.insecure_channel(address, options=list(options))
    return module.secure_channel(address, grpc.ssl_channel_credentials(root_certificates),
                                 options=list(options))


class TesseraClient:
    """Blocking client. ``model`` may stay empty when the gateway serves one model.

    Request options (keyword-only on every generate/stream call): ``request_id`` (names the
    generation: cancel or resume it by it), ``idempotency_key``, ``priority`` (lower first),
    ``disconnect`` ("cancel" or "continue"), ``last_event_index`` (stream only: resume after
    that event of ``request_id``, on any gateway replica: pass ``None`` as the prompt; the
    gateway rebuilds the stream from Redis). Streams never yield an index twice.
    ``api_key`` goes with every call as ``authorization`` metadata (a gateway started with
    --api-key or --tenants asks for it); ``root_certificates`` (PEM bytes) makes the channel
    TLS, checked against them.
    """

    def __init__(self, address: str, *, model: str = "", timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = (), api_key: str | None = None,
                 root_certificates: bytes | None = None) -> None:
        self.model = model
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key)
        self._channel = _open_channel(grpc, address, options, root_certificates)
        self._stub = generate_pb2_grpc.GenerateStub(self._channel)

    def generate(self, prompt: Prompt, *, request_id: str = "", idempotency_key: str = "",
                 priority: int = 0, disconnect: str = "cancel", **sampling: Any) -> GenerateResult:
        """Run a generation to the end; ``sampling`` takes SamplingParams' fields."""
        req = _request(prompt, self.model, request_id, idempotency_key, None, priority,
                       disconnect, sampling)
        try:
            return convert.generate_result_from_proto(self._stub.Generate(req, timeout=self.timeout,
            metadata=self._metadata))
        except grpc.RpcError as e:
            raise _error(e) from None

    def stream(self, prompt: Prompt | None, *, request_id: str = "", idempotency_key: str = "",
               priority: int = 0, disconnect: str = "cancel", last_event_index: int | None = None,
               **sampling: Any) -> Iterator[StreamChunk]:
        """Chunks as the generation runs; the last carries usage. Closing the iterator early
        cancels the call (and, with disconnect="cancel", the generation)."""
        req = _request(prompt, self.model, request_id, idempotency_key, last_event_index,
                       priority, disconnect, sampling)
        call = self._stub.GenerateStream(req, timeout=self.timeout, metadata=self._metadata)
        last = -1 if last_event_index is None else last_event_index
        try:
            for msg in call:
                if msg.index <= last:
                    continue   # a duplicate (a replayed event): each chunk reaches you once
                last = msg.index
                yield convert.stream_chunk_from_proto(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    def tokenize(self, text: str | Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a text (with the tokenizer's special tokens) or of a rendered chat."""
        try:
            resp = self._stub.Tokenize(_tokenize_request(text, self.model), timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return list(resp.token_ids)

    def list_models(self) -> list[ModelInfo]:
        try:
            resp = self._stub.ListModels(generate_pb2.ListModelsRequest(), timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return [convert.model_info_from_proto(m) for m in resp.models]

    def cancel(self, request_id: str) -> None:
        """Stop a generation; unknown or finished ids are not an error."""
        try:
            self._stub.Cancel(generate_pb2.CancelRequest(request_id=request_id),
                              timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TesseraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTesseraClient:
    """asyncio client (grpc.aio); the same calls as TesseraClient, awaited."""

    def __init__(self, address: str, *, model: str = "", timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = (), api_key: str | None = None,
                 root_certificates: bytes | None = None) -> None:
        self.model = model
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key)
        self._channel = _open_channel(grpc.aio, address, options, root_certificates)
        self._stub = generate_pb2_grpc.GenerateStub(self._channel)

    async def generate(self, prompt: Prompt, *, request_id: str = "",
                       idempotency_key: str = "", priority: int = 0, disconnect: str = "cancel",
                       **sampling: Any) -> GenerateResult:
        req = _request(prompt, self.model, request_id, idempotency_key, None, priority,
                       disconnect, sampling)
        try:
            msg = await self._stub.Generate(req, timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return convert.generate_result_from_proto(msg)

    async def stream(self, prompt: Prompt | None, *, request_id: str = "",
                     idempotency_key: str = "", priority: int = 0, disconnect: str = "cancel",
                     last_event_index: int | None = None,
                     **sampling: Any) -> AsyncIterator[StreamChunk]:
        req = _request(prompt, self.model, request_id, idempotency_key, last_event_index,
                       priority, disconnect, sampling)
        call = self._stub.GenerateStream(req, timeout=self.timeout, metadata=self._metadata)
        last = -1 if last_event_index is None else last_event_index
        try:
            async for msg in call:
                if msg.index <= last:
                    continue   # a duplicate (a replayed event): each chunk reaches you once
                last = msg.index
                yield convert.stream_chunk_from_proto(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def tokenize(self, text: str | Sequence[Mapping[str, str]]) -> list[int]:
        try:
            resp = await self._stub.Tokenize(_tokenize_request(text, self.model),
                                             timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return list(resp.token_ids)

    async def list_models(self) -> list[ModelInfo]:
        try:
            resp = await self._stub.ListModels(generate_pb2.ListModelsRequest(),
                                               timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return [convert.model_info_from_proto(m) for m in resp.models]

    async def cancel(self, request_id: str) -> None:
        try:
            await self._stub.Cancel(generate_pb2.CancelRequest(request_id=request_id),
                                    timeout=self.timeout,
            metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTesseraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
