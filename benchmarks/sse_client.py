"""A lean streaming client for the serving benchmarks: HTTP/1.1 over a raw asyncio socket.

On a 2-core machine the benchmark's client shares the cores with the stack it measures, so its
CPU time is taken from the model as the gateway's is. httpx (pure-Python h11 parsing, a task
switch and a JSON decode per event) spent ~190 us per streamed token there, about as much as
the gateway itself: as much noise in the measurement as the overhead being measured. This
client parses the chunked body and the SSE framing with bytes operations in the protocol's
data callback, decodes only the chunks it needs (those up to the first one with a choice, for
TTFT, and the usage chunk), and takes no task switch per event. (tessera/sse.py's SseReader,
which the tests and `tessera bench serve` use, decodes every event's JSON: the cost avoided.)

One connection per request (`Connection: close`), so a TTFT includes the TCP connect (~0.1 ms
on loopback). It is an instrument, not an OpenAI client: the tests use the official `openai`
package.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit


class _Stream(asyncio.Protocol):
    def __init__(self, start: float) -> None:
        self.start = start
        self.buf = b""           # bytes not parsed yet (headers, or a partial chunk)
        self.sse = b""           # the body's bytes not yet split into events
        self.headers: bytes | None = None
        self.chunked = True
        self.status = 0
        self.ttft: float | None = None
        self.usage: dict | None = None
        self.error_body = b""
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.headers is None:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.headers, self.buf = head, rest
            self.status = int(head.split(b" ", 2)[1])
            self.chunked = b"transfer-encoding: chunked" in head.lower()
        if self.status != 200:
            self.error_body += self.buf
            self.buf = b""
        elif self.chunked:
            self._chunks()
        else:   # the body ends when the connection does
            self.sse += self.buf
            self.buf = b""
            self._events()

    def _chunks(self) -> None:
        """Chunked transfer encoding: `size CRLF payload CRLF`, a 0 size ends the body."""
        buf = self.buf
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            end = eol + 2 + size
            if len(buf) < end + 2:
                break
            if size == 0:
                self._finish()
                pos = end + 2
                break
            self.sse += buf[eol + 2:end]
            pos = end + 2
        self.buf = buf[pos:]
        self._events()

    def _events(self) -> None:
        *events, self.sse = self.sse.split(b"\n\n")
        for event in events:
            at = event.find(b"data:")
            data = event[at + 5:].strip()
            if at < 0 or data == b"[DONE]":
                continue
            if self.ttft is None and json.loads(data).get("choices"):
                self.ttft = time.perf_counter() - self.start
            if b'"completion_tokens"' in data:   # only a usage object has the key
                self.usage = json.loads(data)["usage"]

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


async def stream_completion(base_url: str, body: dict, timeout: float
                            ) -> tuple[float, int]:
    """POST a streaming request to ``base_url + /v1/completions``; returns (seconds to the
    first chunk with a choice, completion tokens from the usage chunk)."""
    url = urlsplit(base_url)
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    transport, proto = await loop.create_connection(lambda: _Stream(start), url.hostname,
                                                    url.port)
    try:
        transport.write(request)
        await asyncio.wait_for(proto.done, timeout)
    finally:
        transport.close()
    if proto.status != 200:
        raise RuntimeError(f"HTTP {proto.status}: {proto.error_body[:200]!r}")
    if proto.ttft is None:
        raise RuntimeError("no token received")
    return proto.ttft, (proto.usage or {}).get("completion_tokens", 0)
