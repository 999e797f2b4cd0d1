"""Picking a TCP port for a child to listen on, one way for every launcher and test."""

from __future__ import annotations

import pathlib
import random
import socket

_handed_out: set[int] = set()
_rng = random.Random()   # own generator: a test seeding `random` must not make ports repeat


def _listen_range() -> range:
    """Ports below the kernel's ephemeral range (where the OS picks the local port of every
    outgoing connection): a port chosen there cannot be taken by one of our own clients
    between the moment we pick it and the moment a child binds it."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    return range(10000, low) if low - 10000 >= 2000 else range(0)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host`, never one this process handed out before.
    Chosen at random below the ephemeral range where there is room (see `_listen_range`),
    else the OS's choice."""
    candidates = _listen_range()
    for _ in range(200 if candidates else 0):
        port = _rng.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port
