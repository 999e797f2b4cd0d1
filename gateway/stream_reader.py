"""One blocking XREAD for all the output streams a gateway process relays.

NOTE: a relay used to block in its own XREAD on its request's stream: with 128 streams, every
scheduler step woke 128 readers, each one a command to send, a reply to parse and a Redis
round trip, per token. Measured on 2 cores (benchmarks/serving_overhead.py) that was about a
third of the gateway's CPU time, taken from the model's matmuls. Here one task reads every
stream a relay waits on in one XREAD (the cursors of all of them), and hands each relay its
entries; Redis answers one command per step for the whole gateway.

A relay that starts waiting while the XREAD blocks would wait for its timeout: it wakes the
reader by an entry on this reader's own wake-up stream, which the XREAD always includes.
Each stream's entries are kept for its relay until it takes them, at most ``MAX_BUFFERED``:
past that the stream is left out of the XREAD until the relay catches up (a slow client).
The relay (gateway.queue.RequestSubmitter.events) still checks every index, so an entry it
sees twice (it also reads directly, without blocking) is dropped there.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis

from common import redis_schema as schema

logger = logging.getLogger(__name__)

MAX_BUFFERED = 256   # entries read ahead for one relay (also XREAD's COUNT per stream)


if hasattr(asyncio, "timeout"):   # Python 3.11+: no task per wait (one per token per relay)
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        async with asyncio.timeout(seconds):
            await event.wait()
else:
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        await asyncio.wait_for(event.wait(), seconds)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """One relay's view of one stream: ``read`` gives the entries after its cursor."""

    def __init__(self, reader: "StreamReader", key: str, after: str) -> None:
        self.reader, self.key = reader, key
        self.cursor = _id(after)          # the last id this relay was handed (or started at)
        self.entries: list[Any] = []
        self.ready = asyncio.Event()
        self.error: BaseException | None = None

    async def read(self, timeout_ms: int) -> list[Any]:
        """The entries read for this relay since the last call, else the next to arrive,
        or [] after ``timeout_ms``."""
        if not self.entries and self.error is None:
            self.reader._need(self)
            self.ready.clear()
            try:
                await _wait(self.ready, timeout_ms / 1000)
            except asyncio.TimeoutError:
                return []
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        entries, self.entries = self.entries, []
        return entries

    def skip_to(self, entry_id: str) -> None:
        """The relay read up to ``entry_id`` itself (directly): start after it."""
        seen = _id(entry_id)
        if self.entries and _id(schema.text(self.entries[0][0])) <= seen:
            self.entries = [e for e in self.entries if _id(schema.text(e[0])) > seen]
        self.cursor = max(self.cursor, seen)

    def close(self) -> None:
        self.reader._drop(self)


class StreamReader:
    """Reads many streams in one blocking XREAD, for the relays subscribed to them."""

    def __init__(self, client: aioredis.Redis, block_ms: int = 1000) -> None:
        self.redis = client
        self.block_ms = block_ms
        self._wake_key = schema.gateway_wakeup(uuid.uuid4().hex)
        self._subs: dict[str, list[Subscription]] = {}
        self._blocked: dict[str, tuple[int, int]] = {}   # what the XREAD in progress reads
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()    # there is something to read (the loop idles on it)
        self._waking = False

    def subscribe(self, key: str, after: str) -> Subscription:
        """Entries of stream ``key`` after id ``after``; ``close()`` the subscription."""
        sub = Subscription(self, key, after)
        self._subs.setdefault(key, []).append(sub)
        return sub

    def _drop(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.key]

    def _need(self, sub: Subscription) -> None:
        """``sub`` waits: make sure an XREAD covers it (wake the one in progress if not)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        covered = self._blocked.get(sub.key)
        if covered is not None and covered <= sub.cursor:
            return
        self._changed.set()
        if self._blocked and not self._waking:   # blocked on other streams: interrupt it
            self._waking = True
            asyncio.ensure_future(self._send_wake())

    async def _send_wake(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.pexpire(self._wake_key, 60_000)
            await pipe.execute()
        except Exception as e:   # noqa: BLE001 - the XREAD's own timeout still ends it
            logger.warning("cannot wake the stream reader: %s", e)

    def _streams(self) -> dict[str, tuple[int, int]]:
        """Per stream, the earliest cursor among its relays that are not full."""
        out = {}
        for key, subs in self._subs.items():
            cursors = [s.cursor for s in subs if len(s.entries) < MAX_BUFFERED]
            if cursors:
                out[key] = min(cursors)
        return out

    async def _run(self) -> None:
        while True:
            streams = self._streams()
            if not streams:
                self._changed.clear()
                await self._changed.wait()
                continue
            self._blocked, self._waking = streams, False
            try:
                reply = await self.redis.xread(
                    {**{k: f"{c[0]}-{c[1]}" for k, c in streams.items()}, self._wake_key: "$"},
                    count=MAX_BUFFERED, block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - every relay reading these streams gets it
                for key in streams:
                    for sub in self._subs.get(key, ()):
                        sub.error = e
                        sub.ready.set()
                await asyncio.sleep(0.1)
                continue
            finally:
                self._blocked = {}
            for name, entries in reply or ():
                for sub in self._subs.get(schema.text(name), ()):
                    new = [e for e in entries if _id(schema.text(e[0])) > sub.cursor]
                    if new:
                        sub.entries.extend(new)
                        sub.cursor = _id(schema.text(new[-1][0]))
                        sub.ready.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):   # noqa: BLE001
                pass
