"""Shared fixtures: random-weight checkpoints built once per test session."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

TinyModelFactory = Callable[..., pathlib.Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Factory ``tiny_model(arch, preset="tiny", dtype="float32", seed=0) -> Path``.

    Each distinct model is written once into one session directory and shared by every test
    that asks for it (make-model is deterministic, so sharing cannot hide a difference).
    Tests must treat the returned directory as read-only.
    """
    from tessera.make_model import make_model

    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple[str, str, str, int], pathlib.Path] = {}

    def factory(arch: str, preset: str = "tiny", dtype: str = "float32", seed: int = 0) -> pathlib.Path:
        key = (arch, preset, dtype, seed)
        if key not in cache:
            cache[key] = make_model(root / f"{arch}-{preset}-{dtype}-s{seed}", arch, preset=preset, seed=seed, dtype=dtype)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """URL of a private redis-server for the whole session (no persistence, free port).

    Tests sharing it keep apart by using their own model names / request ids.
    """
    from redis_server import start_redis_server
    from tessera.procs import redis_server_path

    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()
