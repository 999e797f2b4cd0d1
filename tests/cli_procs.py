"""Starting `tessera` subcommands as real processes in tests (through tessera/procs.py, as
`tessera serve` starts them), and reading what they print."""

from __future__ import annotations

import pathlib

import pytest

from tessera.procs import TESSERA, Proc, redis_server_path


def start_cli(args: list[str], ready: str, timeout: float = 120,
              log: pathlib.Path | None = None, env: dict[str, str] | None = None) -> Proc:
    """`tessera ARGS...`, returned once a line containing `ready` is printed. The Proc
    answers poll/wait/terminate/kill like a Popen; `stop()` stops its process group."""
    return Proc(f"tessera {args[0]}", [*TESSERA, *args], ready, env, log).start() \
        .wait_ready(timeout)


def start_serve(args: list[str], timeout: float = 240) -> tuple[Proc, list[str]]:
    """`tessera serve ARGS...` up to its endpoint listing; returns the process and those lines
    (the "Redis" line names its private redis-server, "Metrics" every /metrics URL)."""
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    proc = start_cli(["serve", *args], "Ctrl-C", timeout)
    return proc, proc.output().splitlines(keepends=True)


def listed(lines: list[str], label: str) -> str:
    """The value of a `tessera serve` endpoint line, e.g. listed(lines, "Redis")."""
    return next(l.split(None, 1)[1].strip() for l in lines if l.strip().startswith(label))
