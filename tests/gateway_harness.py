"""A gateway served for real (uvicorn + grpc.aio in a thread) and a SCRIPTED STAND-IN for the
scheduler service, for the gateway's tests.

The stand-in is not the scheduler: it speaks the scheduler's side of Redis through the real
``scheduler.queue.RequestQueue`` (read requests, publish token-id events, drain cancels,
ack), but its "model" replies with a fixed text per sequence, one token per step. The
end-to-end tests with the real stack live elsewhere; these pin the gateway's own behaviour.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis
from tessera.procs import free_port

from common.redis_schema import OutputEvent, QueuedRequest
from common.tokenizer import Tokenizer
from gateway.service import GatewayConfig, serve
from scheduler.queue import RequestQueue

REPLY = "Hello world. The quick brown fox jumps over the lazy dog."
MAX_BODY = 64 * 1024   # small, so the 413 / RESOURCE_EXHAUSTED tests send little


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class _LoopThread(abc.ABC):
    """Runs `main()` in a private event loop on a daemon thread; stop() cancels it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @abc.abstractmethod
    async def main(self) -> None:
        """The coroutine the thread runs (a gateway, a stand-in scheduler)."""

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.main())
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:   # noqa: BLE001 - surfaced to the test
            self.error = e

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(15)


class GatewayThread(_LoopThread):
    def __init__(self, config: GatewayConfig) -> None:
        super().__init__()
        self.config = config
        self.base_url = f"http://{config.host}:{config.http_port}"
        self.grpc_address = f"{config.host}:{config.grpc_port}"

    async def main(self) -> None:
        await serve(self.config)

    def start(self, timeout: float = 30.0) -> None:
        super().start()

        def up() -> bool:
            if self.error is not None:
                raise self.error
            try:
                return httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(up, timeout):
            raise RuntimeError("the gateway did not start")


@dataclass
class _Live:
    entry_id: str
    request: QueuedRequest
    replies: list[list[int]]
    positions: list[int]
    finished: list[bool]
    next_index: int = 0


@dataclass
class ScriptedScheduler(_LoopThread):
    """Scheduler stand-in: sequence s of every request replies ``reply_text(s)``, one token per
    step, "length" at max_tokens else "stop"; a cancelled request gets a final "abort" event.
    ``requests`` and ``cancelled`` record what it saw, for the tests to assert on."""
    redis_url: str = ""
    model: str = ""
    tokenizer: Tokenizer | None = None
    step_s: float = 0.005
    long_reply: bool = False
    requests: dict[str, QueuedRequest] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def reply_text(self, seq_index: int) -> str:
        text = REPLY if seq_index == 0 else f"[{seq_index}] {REPLY}"
        return " ".join([text] * 20) if self.long_reply else text

    def reply_ids(self, seq_index: int) -> list[int]:
        return self.tokenizer.encode(self.reply_text(seq_index), add_special_tokens=False)

    async def main(self) -> None:
        client = aioredis.from_url(self.redis_url)
        queue = RequestQueue(client, self.model, "scripted-stand-in")
        await queue.ensure_group()
        live: dict[str, _Live] = {}
        try:
            while True:
                for entry_id, q in await queue.read_new(16, block_ms=None if live else 20):
                    self.requests[q.request_id] = q
                    n = q.params.n
                    live[q.request_id] = _Live(entry_id, q, [self.reply_ids(s) for s in range(n)],
                                               [0] * n, [False] * n)
                events, acks = [], []
                for rid in await queue.drain_cancels():
                    self.cancelled.append(rid)
                    r = live.pop(rid, None)
                    if r is not None:
                        events.append((rid, OutputEvent(r.next_index, [], finish_reason="abort",
                                                        final=True)))
                        acks.append(r.entry_id)
                for rid, r in list(live.items()):
                    events.extend((rid, ev) for ev in self._step(r))
                    if all(r.finished):
                        acks.append(live.pop(rid).entry_id)
                await queue.publish(events, acks=acks)
                await asyncio.sleep(self.step_s)
        finally:
            await client.aclose()

    def _step(self, r: _Live) -> list[OutputEvent]:
        out = []
        p = r.request.params
        for s, reply in enumerate(r.replies):
            if r.finished[s]:
                continue
            token = reply[r.positions[s]]
            r.positions[s] += 1
            reason = None
            if r.positions[s] >= p.max_tokens:
                reason = "length"
            elif r.positions[s] >= len(reply):
                reason = "stop"
            r.finished[s] = reason is not None
            logprobs = None
            if p.logprobs is not None:
                top = [[(token + k) % 500, -0.25 * (k + 1)] for k in range(p.logprobs)]
                logprobs = [[token, -0.25, top]]
            out.append(OutputEvent(r.next_index, [token], seq_index=s, finish_reason=reason,
                                   final=all(r.finished), logprobs=logprobs))
            r.next_index += 1
        return out


@pytest.fixture(scope="module")
def stack(redis_url: str, tiny_model):
    """(gateway, scheduler stand-in, tokenizer) for one test module; a fresh model name keeps
    modules apart in the shared redis-server."""
    model_dir = tiny_model("llama")
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    config = GatewayConfig(model=str(model_dir), served_model_name=name, redis_url=redis_url,
                           http_port=free_port(), grpc_port=free_port(), max_body_bytes=MAX_BODY)
    gateway = GatewayThread(config)
    gateway.start()
    tokenizer = Tokenizer.from_dir(model_dir)
    sched = ScriptedScheduler(redis_url=redis_url, model=name, tokenizer=tokenizer)
    sched.start()
    yield gateway, sched, tokenizer
    sched.stop()
    gateway.stop()
