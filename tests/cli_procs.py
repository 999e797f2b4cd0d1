"""Starting `tessera` subcommands as real processes in tests, and reading what they print."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from redis_server import redis_server_path


def start_cli(args: list[str], ready: str, timeout: float = 120) -> subprocess.Popen:
    """`tessera ARGS...`, returned once a line containing `ready` is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if ready in line:
            return proc
    proc.kill()
    raise RuntimeError(f"tessera {args[0]} did not start:\n" + "".join(lines[-30:]))


def start_serve(args: list[str], timeout: float = 240) -> tuple[subprocess.Popen, list[str]]:
    """`tessera serve ARGS...` up to its endpoint listing; returns the process and those lines
    (the "Redis" line names its private redis-server, "Metrics" every /metrics URL)."""
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Ctrl-C" in line or (not line and proc.poll() is not None):
            break
    if proc.poll() is not None or not lines[-1].startswith("Ctrl-C"):
        proc.kill()
        raise RuntimeError("tessera serve failed:\n" + "".join(lines))
    return proc, lines


def listed(lines: list[str], label: str) -> str:
    """The value of a `tessera serve` endpoint line, e.g. listed(lines, "Redis")."""
    return next(l.split(None, 1)[1].strip() for l in lines if l.strip().startswith(label))
