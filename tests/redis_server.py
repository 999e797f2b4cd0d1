"""A private, throw-away ``redis-server`` for tests (no persistence, a free port), started
the way `tessera serve` starts its own (tessera/procs.py).

Service tests run the real server a user would run: nothing here fakes Redis.
"""

from __future__ import annotations

import pathlib

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool

from tessera.procs import RedisProc


def start_redis_server(workdir: pathlib.Path, timeout_s: float = 10.0) -> RedisProc:
    """Start redis-server in ``workdir`` (no persistence) and wait until it is ready;
    ``.url`` names it, ``.stop()`` stops it."""
    return RedisProc(workdir, appendonly=False).start().wait_ready(timeout_s)


class CountingConnection(Connection):
    """Counts writes to the socket: a pipeline is one write, so this counts round trips."""
    writes = 0

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


def counting_client(url: str) -> tuple[aioredis.Redis, type[CountingConnection]]:
    """A client whose round trips can be read from the returned class's ``writes``."""
    cls = type("Counting", (CountingConnection,), {"writes": 0})
    pool = ConnectionPool.from_url(url, connection_class=cls)
    return aioredis.Redis(connection_pool=pool), cls
