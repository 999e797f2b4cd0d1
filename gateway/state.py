"""The gateway's core, shared by the gRPC and the OpenAI face: validate and enqueue.

A request turns into a QueuedRequest of token ids (validated here, so both faces give the
same answer to the same mistake). `GatewayState` holds what every request needs (tokenizer,
chat template, queue, limits, tenants, telemetry); gateway.generation relays the output.

NOTE: nothing here logs prompt or output text: it is user content.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

import jinja2
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import redis_schema as schema
from common.convert import ModelInfo
from common.config import resolve_max_model_len
from common.grammar import GrammarCompiler, GrammarError, StructuredOutputUnavailable
from common.limits import PromptError, check_prompt
from common.model_config import ModelConfig
from common.redis_schema import QueuedRequest
from common.sampling_params import SamplingParams
from common.tokenizer import Tokenizer
from gateway.auth import Tenants
from gateway.errors import GatewayError, invalid
from gateway.limits import Limiter
from gateway.generation import Generation
from gateway.queue import RequestNotFound, RequestSubmitter
from gateway.resume import KIND_COMPLETION, PROMPT_TAIL, RelayMeta
from gateway.telemetry import GatewayTelemetry, current_call
from gateway.tenancy import TenantPolicy

logger = logging.getLogger(__name__)


def _named(message: str, param: str, names: Mapping[str, str] | None) -> GatewayError:
    """A 400 whose message and param say the request field the client used (guided_regex,
    response_format.json_schema.schema, ...) rather than SamplingParams' name for it."""
    if names and param in names:
        message = names[param] + message[len(param):] if message.startswith(param) else message
        param = names[param]
    return invalid(message, param)


@dataclass
class GatewayState:
    """Everything a gateway replica holds: the model's tokenizer and limits, and Redis.

    No request state: a request lives in Redis, so any replica can serve any client.
    """
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    redis: aioredis.Redis
    max_body_bytes: int = 4 << 20
    resume_ttl_s: float = 600.0   # a "continue" request nobody re-attaches to is then cancelled
    tenants: Tenants = field(default_factory=Tenants)
    shared_prefix_cache: bool = False       # True: tenants may hit each other's cached prompts
    max_queued_requests: int | None = None  # the model's queue depth past which we answer 429
    eos_token_ids: tuple[int, ...] = ()     # the grammars' stop tokens (structured output)
    created: int = field(default_factory=lambda: int(time.time()))
    _background: set[asyncio.Task] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.submitter = RequestSubmitter(self.redis)
        self.telemetry = GatewayTelemetry(self.model_name)
        self.policy = TenantPolicy(self.tenants, Limiter(self.redis), self.submitter,
                                   self.model_name, self.shared_prefix_cache,
                                   self.max_queued_requests)
        # Structured output specs compile here, with the model's tokenizer, before enqueue.
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)

    @classmethod
    def load(cls, model_dir: str | pathlib.Path, model_name: str, redis: aioredis.Redis,
             max_body_bytes: int = 4 << 20, max_model_len: int | None = None,
             resume_ttl_s: float = 600.0, **policy: object) -> GatewayState:
        config = ModelConfig.from_dir(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        if tokenizer.chat_template is None:
            logger.warning("the model has no chat template (none in %s): "
                           "/v1/chat/completions will answer 400", tokenizer.template_source)
        limit = resolve_max_model_len(max_model_len, config.max_position_embeddings)
        # Ids past the model's embedding rows would crash a worker: the model's size rules.
        return cls(tokenizer, model_name, limit, config.vocab_size, redis, max_body_bytes,
                   resume_ttl_s, eos_token_ids=tuple(config.eos_token_ids),
                   **policy)  # type: ignore[arg-type]

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.max_model_len, self.created)

    # ---- validation ---------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise GatewayError(404, f"The model `{name}` does not exist.", "model",
                               "model_not_found")

    @staticmethod
    def make_params(structured_names: Mapping[str, str] | None = None,
                    **kwargs: object) -> SamplingParams:
        """SamplingParams, with its ValueError (which starts with the field name) as a 400.
        structured_names: the request field each `structured_outputs.KIND` came from."""
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise _named(str(e), str(e).split(" ", 1)[0].rstrip(":"),
                         structured_names) from None

    async def check_structured(self, params: SamplingParams,
                               names: Mapping[str, str] | None = None) -> None:
        """Compile the request's structured output spec (cached): a bad spec is a 400
        naming its field, before anything is enqueued."""
        spec = params.structured_outputs
        if spec is None:
            return
        try:
            # Off the event loop: a first compile (and the xgrammar import) takes a while.
            await asyncio.to_thread(self.grammars.compile, spec)
        except GrammarError as e:
            raise _named(str(e), e.field, names) from None
        except StructuredOutputUnavailable as e:
            field = f"structured_outputs.{spec.kind}"
            raise invalid(str(e), (names or {}).get(field, field)) from None

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        try:
            # The length is check_length's, with the OpenAI message that counts max_tokens.
            check_prompt(ids, vocab_size=self.vocab_size)
        except PromptError as e:
            raise invalid(str(e), e.param) from None
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not messages:
            raise invalid("messages must not be empty", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
        except (jinja2.TemplateError, ValueError) as e:
            # The template's own message (e.g. "roles must alternate"), never the text.
            raise invalid(f"chat template: {e}", "messages") from None
        return self.encode_prompt(ids)

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """What is left of the context (vLLM's chat default); >= 1 so check_length refuses."""
        return max(self.max_model_len - num_prompt_tokens, 1)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, param: str = "prompt") -> None:
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise invalid(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                f"for the completion). Please reduce the prompt or max_tokens.", param,
                "context_length_exceeded")

    # ---- running ------------------------------------------------------------------------
    async def start(self, prompt_token_ids: list[int], params: SamplingParams, *,
                    request_id: str = "", idempotency_key: str | None = None,
                    priority: int = 0, disconnect: str = schema.DISCONNECT_CANCEL,
                    tenant: str = "", kind: str = KIND_COMPLETION, include_usage: bool = False,
                    echo_text: str | None = None) -> Generation:
        """Enqueue a validated request and return its relay. ``kind``, ``include_usage`` and
        ``echo_text`` shape the response; they go into the record so any replica can resume
        the relay (gateway.resume)."""
        self.check_length(len(prompt_token_ids), params.max_tokens)
        meta = RelayMeta(kind, int(time.time()), len(prompt_token_ids),
                         list(prompt_token_ids[-PROMPT_TAIL:]), params, disconnect,
                         include_usage, echo_text)
        call = current_call()   # the client call this runs in (gateway.telemetry)
        request_id = request_id or uuid.uuid4().hex
        policy = self.policy
        await policy.check_queue_depth()
        reserved = len(prompt_token_ids) + params.n * params.max_tokens
        admission = await policy.admit(tenant, request_id, reserved)
        priority, weight = policy.shape(tenant, priority)
        queued = QueuedRequest(
            request_id=request_id, model=self.model_name,
            prompt_token_ids=prompt_token_ids, params=params, priority=priority, weight=weight,
            arrival_time=time.time(), tenant=tenant, idempotency_key=idempotency_key or None,
            disconnect=disconnect, traceparent=call.traceparent if call is not None else None,
            cache_salt=policy.cache_salt(tenant))
        try:
            rid = await self.submitter.submit(queued, meta.to_record())
        except BaseException:
            if admission is not None:
                self.release_soon(tenant, request_id, reserved)
            raise
        if call is not None:
            call.started(rid, params, len(prompt_token_ids), tenant)
        gen = Generation(self, rid, prompt_token_ids, params, disconnect, meta=meta)
        if admission is not None:
            gen.reservation = (tenant, request_id, reserved)
            gen.rate_headers = admission.headers
        return gen

    async def reattach(self, request_id: str, last_index: int = -1,
                       fallback: tuple[list[int], SamplingParams, str] | None = None
                       ) -> Generation:
        """The relay of an existing request, continuing after event ``last_index`` (a client
        resuming on this replica, or fetching a result). Its prompt context, params and shape
        come from the request's record; ``fallback`` (prompt ids, params, disconnect) serves a
        record written without them (an older gateway)."""
        try:
            rec = await self.submitter.record(request_id)
        except RequestNotFound:
            raise GatewayError(404, f"request {request_id} is unknown or expired",
                               "request_id", "request_not_found") from None
        if rec.get("model") != self.model_name:
            raise GatewayError(404, f"request {request_id} is not a request of model "
                               f"{self.model_name}", "request_id", "request_not_found")
        meta = RelayMeta.from_record(rec)
        if meta is None:
            if fallback is None:
                raise GatewayError(404, f"request {request_id} cannot be resumed here (its "
                                   "record has no relay fields)", "request_id")
            ids, params, disconnect = fallback
            meta = RelayMeta(KIND_COMPLETION, int(time.time()), len(ids), ids[-PROMPT_TAIL:],
                             params, disconnect)
        if last_index >= 0:
            self.telemetry.metrics.stream_resumes.inc()
        try:
            attached = await self.submitter.attach(request_id)
        except RequestNotFound:
            raise GatewayError(404, f"request {request_id} is unknown or expired",
                               "request_id", "request_not_found") from None
        gen = Generation(self, request_id, meta.prompt_tail, meta.params, meta.disconnect,
                         last_index, meta=meta)
        gen.attached = attached
        return gen

    # ---- tenants (gateway.tenancy) ----------------------------------------------------
    async def check_owner(self, request_id: str, tenant: str) -> None:
        await self.policy.check_owner(request_id, tenant)

    def release_soon(self, tenant: str, request_id: str, refund: int) -> None:
        """Give back a finished request's concurrency slot and its unused tokens."""
        self._spawn(self._quietly(self.policy.release(tenant, request_id, refund), request_id))

    def started_soon(self, tenant: str, request_id: str) -> None:
        """The request's first event arrived: it no longer counts as its tenant's queued."""
        self._spawn(self._quietly(self.policy.started(tenant, request_id), request_id))

    def release_when_finished(self, tenant: str, request_id: str, reserved: int,
                              num_prompt_tokens: int) -> None:
        """A ``continue`` request whose client left keeps its tenant's slots until it
        finishes (on whatever scheduler): follow its record, then release what it reserved
        less the tokens it used (the prompt, and the outputs counted from its stream)."""
        self._spawn(self.policy.release_when_finished(tenant, request_id, reserved,
                                                      num_prompt_tokens))

    @staticmethod
    async def _quietly(coro: Any, request_id: str) -> None:
        try:
            await coro
        except (RedisError, OSError) as e:   # the entries expire after their lease
            logger.warning("limits of %s: Redis does not answer: %s", request_id, e)

    async def is_ready(self) -> bool:
        """Some scheduler of this model is ready: its worker group finished a real forward
        pass within its ready timeout (scheduler.health keeps one key per group, with a TTL)."""
        try:
            groups = await self.redis.smembers(schema.ready_groups(self.model_name))
            if not groups:
                return False
            keys = [schema.scheduler_ready(self.model_name, schema.text(g)) for g in groups]
            return bool(await self.redis.exists(*keys))
        except (RedisError, OSError) as e:   # no Redis: nothing can be served
            logger.warning("readiness: Redis does not answer: %s", e)
            return False

    def cancel_soon(self, request_id: str) -> None:
        """Cancel from a context that is itself being cancelled (a client that went away):
        an await there would be cancelled too, so the cancel runs as its own task."""
        self._spawn(self.submitter.cancel(request_id))

    def detach_soon(self, request_id: str, attached: int) -> None:
        """A "continue" client went away: cancel the request after ``resume_ttl_s`` unless a
        client re-attached meanwhile (on any replica: the record's attach count says so).
        NOTE: the timer lives in this process; if it dies too, the request runs to its end
        (bounded by max_tokens) and its events stay resumable for the finished TTL."""
        self._spawn(self._cancel_unless_attached(request_id, attached))

    async def _cancel_unless_attached(self, request_id: str, attached: int) -> None:
        """``attached``: the record's attach count when the leaving client attached."""
        rec = schema.request_record(request_id)
        try:
            await asyncio.sleep(self.resume_ttl_s)
            if int(await self.redis.hget(rec, "attached") or 0) == attached:
                await self.submitter.cancel(request_id)
        except (RedisError, OSError) as e:
            logger.warning("resume TTL of %s: Redis does not answer: %s", request_id, e)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
