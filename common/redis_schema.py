"""Every Redis key name Tessera uses, and the wire format of what goes into them.

One module owns the schema so that the gateway, the scheduler and the workers cannot drift
apart (DESIGN.md §3). All keys start with ``tessera:``. Values are compact JSON, never
pickle: a Redis that several services (or an attacker who reaches it) write to must not be
able to make a reader execute code, and humans can read the entries with ``redis-cli``.

Output streams use explicit entry ids ``0-{index + 1}`` (an event's index is its position in
the request's output, counted over all n sequences). Redis rejects an XADD whose id is not
above the stream's top, so a recovering scheduler that re-publishes an event cannot deliver a
token twice, and a client resuming after index k reads from id ``0-{k + 1}`` without a scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.sampling_params import SamplingParams

PREFIX = "tessera:"
SCHEDULERS_GROUP = "schedulers"

# Values of the ``state`` field of a request record.
STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_FINISHED = "finished"
STATE_FAILED = "failed"
TERMINAL_STATES = frozenset({STATE_FINISHED, STATE_FAILED})

DISCONNECT_CANCEL = "cancel"
DISCONNECT_CONTINUE = "continue"


# ---- key names -----------------------------------------------------------------------------
def requests_stream(model: str) -> str:
    """Stream of QueuedRequest entries for one model; consumer group ``schedulers``."""
    return f"{PREFIX}requests:{model}"


def output_stream(request_id: str) -> str:
    """Stream of OutputEvent entries of one request, ids ``0-{index + 1}``."""
    return f"{PREFIX}out:{request_id}"


def gateway_wakeup(reader_id: str) -> str:
    """Stream one gateway process's output-stream reader blocks on besides the output
    streams: an entry wakes it to read a stream it did not read yet (gateway.stream_reader)."""
    return f"{PREFIX}gwwake:{reader_id}"


def request_record(request_id: str) -> str:
    """Hash: state, owner, model, tenant, n, cancelled, timestamps; expires (RedisLimits)."""
    return f"{PREFIX}req:{request_id}"


def cancels_stream(model: str) -> str:
    """Stream of ``request_id`` entries; every scheduler of the model reads all of it."""
    return f"{PREFIX}cancels:{model}"


def deadletter_stream(model: str) -> str:
    """Stream of requests given up on: delivered ``--max-deliveries`` times without finishing
    (each delivery's scheduler died on it). Fields: request_id, entry_id, deliveries, reason,
    data (the request entry's body, to replay or inspect with ``redis-cli``)."""
    return f"{PREFIX}deadletter:{model}"


def workers_registry(model: str) -> str:
    """Hash worker_id -> JSON description of the model's registered workers."""
    return f"{PREFIX}workers:{model}"


def worker_heartbeat(model: str, worker_id: str) -> str:
    """Key a worker re-sets with a TTL; it vanishing means the worker is gone."""
    return f"{PREFIX}worker:{model}:{worker_id}"


def group_lease(model: str, group: str) -> str:
    """Lease (SET NX PX) naming the one scheduler that drives a worker group."""
    return f"{PREFIX}lease:{model}:{group}"


def group_rendezvous(model: str, group: str) -> str:
    """host:port of a worker group's torch.distributed TCP store, published by its rank 0."""
    return f"{PREFIX}rendezvous:{model}:{group}"


def scheduler_stats(model: str, group: str) -> str:
    """Hash a group's scheduler rewrites every step: running, waiting, KV blocks in use/total."""
    return f"{PREFIX}stats:{model}:{group}"


def scheduler_ready(model: str, group: str) -> str:
    """Key a group's scheduler keeps while it is ready: set with a TTL of what is left of its
    readiness window (a forward pass within --ready-timeout), deleted when it is not. Redis
    expires it on its own clock, so a reader never compares two machines' clocks."""
    return f"{PREFIX}ready:{model}:{group}"


def ready_groups(model: str) -> str:
    """Set of the groups that ever published ``scheduler_ready`` (readers check each key)."""
    return f"{PREFIX}ready-groups:{model}"


def entry_time(entry_id: str | bytes) -> float:
    """When Redis added a stream entry (its id's milliseconds part), in Redis's clock seconds."""
    return int(text(entry_id).split("-", 1)[0]) / 1000.0


def idempotency_key(tenant: str, key: str) -> str:
    """Maps (tenant, client's Idempotency-Key) to a request id.

    Hashed: the client's key is arbitrary user text (length, colons), and hashing the pair
    keeps "tenant a:b, key c" apart from "tenant a, key b:c".
    """
    digest = hashlib.sha256(json.dumps([tenant, key]).encode()).hexdigest()
    return f"{PREFIX}idem:{digest}"


def tenant_bucket(tenant: str, kind: str) -> str:
    """Hash {level, ts}: one tenant's token bucket, ``kind`` "requests" or "tokens"."""
    return f"{PREFIX}limit:{tenant}:{kind}"


def tenant_inflight(tenant: str) -> str:
    """Sorted set: the tenant's unfinished request ids, scored by when each entry expires."""
    return f"{PREFIX}limit:{tenant}:inflight"


def tenant_queued(tenant: str) -> str:
    """Sorted set: the tenant's admitted requests with no output yet, scored by expiry."""
    return f"{PREFIX}limit:{tenant}:queued"


@dataclass(frozen=True)
class RedisLimits:
    """Lifetimes and caps of what Tessera keeps in Redis."""
    record_ttl_s: float = 24 * 3600        # a request record (and idempotency key) while live
    finished_ttl_s: float = 600.0          # out stream + record after finish: resume window
    output_maxlen: int = 1 << 16           # safety cap on one request's events
    cancels_maxlen: int = 10_000           # cancels are read within a step; a small tail will do
    deadletter_maxlen: int = 10_000        # the newest dead letters are kept for inspection

    @property
    def record_ttl_ms(self) -> int:
        return int(self.record_ttl_s * 1000)

    @property
    def finished_ttl_ms(self) -> int:
        return int(self.finished_ttl_s * 1000)


# ---- serialization -------------------------------------------------------------------------
class MalformedEntry(ValueError):
    """A stream entry that does not decode; ``request_id`` is set when it could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def text(value: str | bytes) -> str:
    """A Redis reply (or gRPC metadata) value as str, whether the client decodes or not."""
    return value.decode() if isinstance(value, bytes) else value


def _decode(fields: Mapping[Any, Any]) -> dict[str, str]:
    """Entry fields as str -> str, whether the client decodes responses or not."""
    return {text(k): text(v) for k, v in fields.items()}


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(params)
    if d["logit_bias"] is not None:   # JSON object keys are strings
        d["logit_bias"] = {str(k): v for k, v in d["logit_bias"].items()}
    return d


def params_from_json(d: Mapping[str, Any]) -> SamplingParams:
    """Rebuild (and so re-validate) SamplingParams.

    NOTE: unknown fields raise: a scheduler older than the gateway must fail the request
    loudly rather than silently ignore a parameter the user asked for.
    """
    d = dict(d)
    for name in ("stop", "stop_token_ids"):
        if isinstance(d.get(name), list):
            d[name] = tuple(d[name])
    if d.get("logit_bias") is not None:
        d["logit_bias"] = {int(k): v for k, v in d["logit_bias"].items()}
    return SamplingParams(**d)


@dataclass(frozen=True)
class QueuedRequest:
    """A request as it waits in the request stream: token ids, never text."""
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0                       # lower is served first (vLLM's convention)
    arrival_time: float = 0.0               # wall clock at the gateway; informational only
    deadline: float | None = None           # wall clock after which the result is useless
    tenant: str = ""
    idempotency_key: str | None = None
    disconnect: str = DISCONNECT_CANCEL     # what to do when the client goes away
    traceparent: str | None = None          # W3C trace context of the gateway's span
    cache_salt: str | None = None           # set by the gateway from the tenant, never the client
    weight: float = 1.0                     # the tenant's fair-share weight (gateway's tenants)
    # "" for a new request; "worker" / "scheduler": re-enqueued by a scheduler whose worker
    # group died (or dead-scheduler recovery), so whoever reads it resumes from out:{id}.
    recovered: str = ""

    def to_fields(self) -> dict[str, str]:
        """Stream entry fields. The id sits apart from the body so a body that fails to
        decode can still be answered with an error event."""
        body = {
            "model": self.model, "prompt": self.prompt_token_ids,
            "params": params_to_json(self.params), "priority": self.priority,
            "arrival": self.arrival_time, "deadline": self.deadline, "tenant": self.tenant,
            "idem": self.idempotency_key, "disconnect": self.disconnect,
            "trace": self.traceparent, "salt": self.cache_salt,
            "weight": self.weight,
        }
        if self.recovered:
            body["recovered"] = self.recovered
        return {"request_id": self.request_id, "data": _dumps(body)}

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> QueuedRequest:
        """Decode a stream entry; raises MalformedEntry for anything invalid."""
        f = _decode(fields)
        request_id = f.get("request_id") or None
        if request_id is None:
            raise MalformedEntry("entry has no request_id")
        try:
            b = json.loads(f["data"])
            prompt = b["prompt"]
            if not (isinstance(prompt, list) and prompt
                    and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                            for t in prompt)):
                raise ValueError("prompt must be a non-empty list of token ids")
            if b["disconnect"] not in (DISCONNECT_CANCEL, DISCONNECT_CONTINUE):
                raise ValueError(f"unknown disconnect policy {b['disconnect']!r}")
            return cls(
                request_id=request_id, model=str(b["model"]), prompt_token_ids=prompt,
                params=params_from_json(b["params"]), priority=int(b["priority"]),
                arrival_time=float(b["arrival"]),
                deadline=None if b["deadline"] is None else float(b["deadline"]),
                tenant=str(b["tenant"]), idempotency_key=b["idem"],
                disconnect=b["disconnect"], traceparent=b["trace"],
                cache_salt=None if b.get("salt") is None else str(b["salt"]),
                weight=_weight(b.get("weight", 1.0)),
                recovered=str(b.get("recovered") or ""))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MalformedEntry(f"bad request entry: {e}", request_id) from e


def _weight(value: Any) -> float:
    w = float(value)
    if not 1e-3 <= w <= 1e6:   # NaN fails both comparisons too
        raise ValueError(f"weight {value!r} is outside [0.001, 1e6]")
    return w


# NOTE: slots, not frozen: the engine core makes one per sequence per step, and a frozen
# dataclass takes ~4x as long to build (object.__setattr__ per field).
@dataclass(slots=True)
class OutputEvent:
    """One request's output from one step (or its failure).

    ``index`` counts the request's events from 0 over all its sequences; ``seq_index`` says
    which of the n sequences the tokens extend. ``final`` marks the request's last event (all
    n sequences finished, or it failed): readers stop there and the scheduler expires the
    stream. ``logprobs`` entries are ``[token_id, logprob, [[id, lp], ...]]``.
    """
    index: int
    token_ids: list[int]
    seq_index: int = 0
    finish_reason: str | None = None
    final: bool = False
    logprobs: list[Any] | None = None
    prompt_logprobs: list[Any] | None = None
    error: str | None = None

    @property
    def stream_id(self) -> str:
        return f"0-{self.index + 1}"

    def to_fields(self) -> dict[str, str]:
        f = {"i": str(self.index), "s": str(self.seq_index), "t": _dumps(self.token_ids)}
        if self.finish_reason is not None:
            f["f"] = self.finish_reason
        if self.final:
            f["final"] = "1"
        if self.logprobs is not None:
            f["lp"] = _dumps(self.logprobs)
        if self.prompt_logprobs is not None:
            f["plp"] = _dumps(self.prompt_logprobs)
        if self.error is not None:
            f["err"] = self.error
        return f

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> OutputEvent:
        f = _decode(fields)
        try:
            return cls(
                index=int(f["i"]), seq_index=int(f["s"]), token_ids=json.loads(f["t"]),
                finish_reason=f.get("f"), final=f.get("final") == "1",
                logprobs=json.loads(f["lp"]) if "lp" in f else None,
                prompt_logprobs=json.loads(f["plp"]) if "plp" in f else None,
                error=f.get("err"))
        except (KeyError, ValueError) as e:
            raise MalformedEntry(f"bad output event: {e}") from e
