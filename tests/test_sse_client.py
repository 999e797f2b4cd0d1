"""The chunked-SSE parser of the benchmarks' lean client (benchmarks/sse_client.py), fed a
recorded response in every split a socket could deliver it in."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks.sse_client import _Stream


def _chunked(events: list[str]) -> bytes:
    body = b""
    for e in events:
        data = e.encode()
        body += f"{len(data):x}\r\n".encode() + data + b"\r\n"
    return body + b"0\r\n\r\n"


HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
CHUNK = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": " a\n\nb", "logprobs": None, "finish_reason": None}],
         "usage": None}
USAGE = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
         "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
EVENTS = [f"id: r:0\ndata: {json.dumps(CHUNK)}\n\n", f"id: r:1\ndata: {json.dumps(CHUNK)}\n\n",
          f"data: {json.dumps(USAGE)}\n\n", "data: [DONE]\n\n"]


async def _feed(pieces: list[bytes]) -> _Stream:
    proto = _Stream(start=0.0)
    for p in pieces:
        proto.data_received(p)
    await asyncio.wait_for(proto.done, 1)
    return proto


@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_every_split_of_a_stream_gives_the_first_token_and_the_usage(size):
    raw = HEAD + _chunked(EVENTS)
    proto = asyncio.run(_feed([raw[i:i + size] for i in range(0, len(raw), size)]))
    assert proto.status == 200
    assert proto.ttft is not None and proto.ttft > 0
    assert proto.usage == USAGE["usage"]
    assert proto.buf == b"" and proto.sse == b""


def test_an_error_status_keeps_its_body():
    body = b'{"error": {"message": "max_tokens must be at least 1"}}'

    async def run():
        proto = _Stream(start=0.0)
        proto.data_received(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(body))
        proto.data_received(body)
        proto.connection_lost(None)
        await proto.done
        return proto

    proto = asyncio.run(run())
    assert proto.status == 400 and proto.error_body == body and proto.usage is None
