"""A private, throw-away ``redis-server`` for tests (no persistence, a free port).

Service tests run the real server a user would run: nothing here fakes Redis.
"""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_redis_server(workdir: pathlib.Path, timeout_s: float = 10.0) -> RedisServer:
    """Start redis-server in ``workdir`` and wait until it answers PING."""
    exe = redis_server_path()
    if exe is None:
        raise FileNotFoundError("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(proc, port)
    deadline = time.monotonic() + timeout_s
    while not _answers_ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)
    return server


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
