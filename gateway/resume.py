"""What a gateway keeps in a request's Redis record so that ANY replica can resume its relay.

A gateway holds no request state (DESIGN.md §4): when the one relaying a stream dies, the
client reconnects to another replica with the request id and the last event id it saw, and
that replica rebuilds the relay from Redis alone: the output events (``out:{id}``) and this
record (``req:{id}``): the API kind (completion or chat), ``created``, the prompt's token
count and its last few ids (the detokenizer's context), the sampling params (stop strings,
n, logprobs...), and how the original response was shaped (usage chunk, echo).

Event ids on the wire are ``<request_id>:<index>``: the SSE ``id:`` field (so a browser's
EventSource and any SSE client send it back as ``Last-Event-ID``) and the gRPC chunk's index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.redis_schema import params_from_json, params_to_json
from common.sampling_params import INT32_MAX, SamplingParams

KIND_COMPLETION = "completion"
KIND_CHAT = "chat"
PROMPT_TAIL = 8   # the detokenizer's window needs 5 prompt tokens of context (common.detokenize)


@dataclass(frozen=True)
class RelayMeta:
    """How to rebuild a request's relay on another replica."""
    kind: str                        # KIND_COMPLETION or KIND_CHAT
    created: int                     # Unix seconds, the same in every chunk of the request
    num_prompt_tokens: int
    prompt_tail: list[int]
    params: SamplingParams
    disconnect: str = "cancel"
    include_usage: bool = False
    echo_text: str | None = None     # completions with echo: the prompt text as first sent

    def to_record(self) -> dict[str, str]:
        """Fields added to the request's record at submission (one HSET with the rest)."""
        relay = {"params": params_to_json(self.params), "tail": self.prompt_tail,
                 "usage": self.include_usage, "echo": self.echo_text}
        return {"kind": self.kind, "created": str(self.created),
                "prompt_tokens": str(self.num_prompt_tokens),
                "relay": json.dumps(relay, separators=(",", ":"))}

    @classmethod
    def from_record(cls, rec: Mapping[Any, Any]) -> RelayMeta | None:
        """None when the record has no relay fields (submitted by an older gateway)."""
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                           else v) for k, v in rec.items()}
        if "relay" not in f:
            return None
        relay = json.loads(f["relay"])
        return cls(kind=f["kind"], created=int(f["created"]),
                   num_prompt_tokens=int(f["prompt_tokens"]), prompt_tail=list(relay["tail"]),
                   params=params_from_json(relay["params"]),
                   disconnect=f.get("disconnect", "cancel"),
                   include_usage=bool(relay["usage"]), echo_text=relay["echo"])


def parse_event_id(value: str | None, request_id: str) -> int:
    """The event index in a ``Last-Event-ID`` (``<request_id>:<index>``, or a bare index);
    -1 (replay everything) when absent. Raises ValueError naming what is wrong."""
    if value is None or value == "":
        return -1
    rid, sep, index = value.rpartition(":")
    if sep and rid != request_id:
        raise ValueError(f"the event id {value!r} belongs to another request")
    try:
        i = int(index)
    except ValueError:
        raise ValueError(f"the event id {value!r} is not <request_id>:<index>") from None
    if not -1 <= i <= INT32_MAX:
        raise ValueError(f"the event index must be in [-1, {INT32_MAX}], got {i}")
    return i


def event_id(request_id: str, index: int) -> str:
    return f"{request_id}:{index}"
