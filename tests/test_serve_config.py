"""Settings declared once (common/config.py): `tessera serve` takes every setting of the
processes it starts and hands each child, through the real CLI parser, what it takes; the
served model name is the same in every process however the model path is spelled."""

from __future__ import annotations

import dataclasses
import uuid

import httpx
import pytest

from cli_procs import start_cli, start_serve
from common.config import (EngineConfig, GatewayConfig, SchedulerServiceConfig, ServeConfig,
                           WorkerConfig, served_model_name)
from common.settings import from_args, to_argv
from tessera import LLM
from tessera.cli import _build_parser
from tessera.launcher import gateway_config, scheduler_config, worker_config, worker_procs
from tessera.procs import TESSERA, free_port

SERVE_FLAGS = ["--device", "--dtype", "--max-model-len", "--block-size", "--enforce-eager",
               "--gpu-memory-utilization", "--kv-cache-memory-gb", "--max-num-seqs",
               "--max-num-batched-tokens", "-tp", "-pp", "-dp", "--no-restart", "--step-timeout",
               "--dist-timeout", "--max-body-bytes", "--scheduler-replicas", "--request-timeout"]


def _subparser(name: str):
    parser = _build_parser()
    return parser._subparsers._group_actions[0].choices[name]


def _parse(argv: list[str]):
    """A child's argv (python -m tessera.cli SUB ...) through the real parser, as its config."""
    assert argv[:len(TESSERA)] == TESSERA
    sub = argv[len(TESSERA)]
    cls = {"worker": WorkerConfig, "scheduler": SchedulerServiceConfig,
           "gateway": GatewayConfig}[sub]
    return from_args(cls, _build_parser().parse_args(argv[len(TESSERA):]))


def test_serve_help_lists_every_child_setting():
    options = {o for a in _subparser("serve")._actions for o in a.option_strings}
    assert set(SERVE_FLAGS) <= options
    help_text = _subparser("serve").format_help()
    assert "tokens per KV cache block (default: 16)" in help_text


def test_serve_hands_each_child_the_settings_it_takes(tiny_model):
    argv = ["--model", str(tiny_model("llama")), "--device", "cpu", "--dtype", "bfloat16",
            "--max-model-len", "100", "--block-size", "8", "--enforce-eager",
            "--gpu-memory-utilization", "0.5", "--kv-cache-memory-gb", "0.25",
            "--max-num-seqs", "7", "--max-num-batched-tokens", "96", "-tp", "2", "-pp", "1",
            "--no-prefix-caching", "--seed", "3", "--log-format", "json", "--host", "0.0.0.0",
            "--http-port", "8123", "--step-timeout", "9.5", "--dist-timeout", "33",
            "--max-body-bytes", "1000", "--request-timeout", "42.5", "--scheduler-replicas", "3"]
    serve = from_args(ServeConfig, _build_parser().parse_args(["serve", *argv]))
    assert serve.max_num_batched_tokens == 96 and serve.kv_cache_memory_gb == 0.25
    assert not serve.enable_prefix_caching and serve.enforce_eager and serve.restart

    procs = worker_procs(worker_config(serve, "redis://r:1/0", "g"), ["w0", "w1"])
    workers = [_parse(p.argv) for p, _, _ in procs]
    assert [w.rank for w in workers] == [0, 1]
    for w in workers:
        assert (w.device, w.dtype, w.block_size, w.enforce_eager, w.gpu_memory_utilization,
                w.kv_cache_memory_gb, w.tensor_parallel_size, w.seed, w.log_format) == \
            ("cpu", "bfloat16", 8, True, 0.5, 0.25, 2, 3, "json")
        assert w.redis_url == "redis://r:1/0" and w.group == "g" and w.dist_timeout_s == 33
        assert w.host == "127.0.0.1", "serve's --host is the gateway's, not the workers'"
        assert w.served_model_name == serve.model_name
    assert workers[0].dist_init_addr == workers[1].dist_init_addr

    sched = _parse([*TESSERA, "scheduler", *to_argv(
        scheduler_config(serve, "redis://r:1/0", "g", ("a:1", "b:2")), SchedulerServiceConfig)])
    assert (sched.max_model_len, sched.max_num_seqs, sched.max_num_batched_tokens,
            sched.block_size, sched.enable_prefix_caching, sched.tensor_parallel_size,
            sched.workers, sched.step_timeout_s, sched.request_timeout_s) == \
        (100, 7, 96, 8, False, 2, ("a:1", "b:2"), 9.5, 42.5)
    assert serve.scheduler_replicas == 3
    gateway = _parse([*TESSERA, "gateway", *to_argv(gateway_config(serve, "redis://r:1/0"),
                                                    GatewayConfig)])
    assert (gateway.max_model_len, gateway.host, gateway.http_port, gateway.log_format,
            gateway.max_body_bytes) == (100, "0.0.0.0", 8123, "json", 1000)
    assert gateway.served_model_name == sched.served_model_name == serve.model_name


def test_llm_takes_the_engine_config(tiny_model):
    model = str(tiny_model("llama"))
    config = EngineConfig(model=model, num_kv_blocks=16, max_model_len=64)
    assert LLM(config=config).engine.config == config
    llm = LLM(model, num_kv_blocks=16, max_model_len=64)
    assert llm.engine.config == config and llm.engine.max_model_len == 64
    with pytest.raises(TypeError):
        LLM(model, no_such_setting=1)
    with pytest.raises(ValueError, match="max_model_len must be in"):
        LLM(model, num_kv_blocks=16, max_model_len=10 ** 6)
    assert dataclasses.replace(config, block_size=8).block_size == 8


def test_the_served_name_is_the_path_as_written(tmp_path, tiny_model, monkeypatch):
    real = tiny_model("llama")
    link = tmp_path / "my-model"
    link.symlink_to(real, target_is_directory=True)
    assert served_model_name(str(link)) == served_model_name(str(link) + "/") == "my-model"
    monkeypatch.chdir(real)
    assert served_model_name(".") == real.name
    assert served_model_name(".", "given") == "given"


def _complete(base: str, name: str) -> dict:
    r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "hello",
                                                    "max_tokens": 3, "ignore_eos": True},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("spelling", ["dot", "symlink"])
def test_serve_model_dot_and_symlink_serve_a_completion(tmp_path, tiny_model, monkeypatch,
                                                        spelling):
    real = tiny_model("llama")
    if spelling == "dot":
        monkeypatch.chdir(real)   # the children inherit the working directory
        model, name = ".", real.name
    else:
        name = f"link-{uuid.uuid4().hex[:6]}"
        (tmp_path / name).symlink_to(real, target_is_directory=True)
        model = str(tmp_path / name)
    http = free_port()
    proc, _ = start_serve(["--model", model, "--http-port", str(http), "--grpc-port",
                           str(free_port()), "--kv-cache-memory-gb", "0.02"], timeout=180)
    try:
        base = f"http://127.0.0.1:{http}"
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == [name]
        assert _complete(base, name)["usage"]["completion_tokens"] == 3
    finally:
        proc.stop(timeout=30)


def test_services_started_apart_agree_on_the_model_name(tmp_path, tiny_model, redis_url,
                                                        monkeypatch):
    real = tiny_model("llama")
    name = f"apart-{uuid.uuid4().hex[:6]}"
    link = tmp_path / name
    link.symlink_to(real, target_is_directory=True)
    port, http = free_port(), free_port()
    procs = []
    try:
        # three spellings of one path, no --served-model-name anywhere
        procs.append(start_cli(["worker", "--model", str(link), "--port", str(port),
                                "--kv-cache-memory-gb", "0.02", "--metrics-port", "0"],
                               "worker ready"))
        procs.append(start_cli(["scheduler", "--model", str(link) + "/", "--redis-url",
                                redis_url, "--workers", f"127.0.0.1:{port}",
                                "--metrics-port", "0"], "scheduler ready"))
        monkeypatch.chdir(tmp_path)
        procs.append(start_cli(["gateway", "--model", f"./{name}", "--redis-url", redis_url,
                                "--http-port", str(http), "--grpc-port", str(free_port())],
                               "gateway ready"))
        assert "model " + name in procs[1].output()
        assert _complete(f"http://127.0.0.1:{http}", name)["model"] == name
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.mark.parametrize("setting,value", [("block_size", 0), ("gpu_memory_utilization", 1.5),
                                           ("max_num_seqs", -1), ("dtype", "int8"),
                                           ("seed", 1 << 63), ("kv_cache_memory_gb", float("nan")),
                                           ("tensor_parallel_size", 0)])
def test_a_setting_out_of_range_is_refused_naming_its_flag(setting, value):
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        EngineConfig(model="m", **{setting: value})
    from tessera.cli import main
    try:   # the CLI: one line, status 2, no traceback
        code = main(["worker", "--model", "m", flag, str(value)])
    except SystemExit as e:   # argparse refuses a choice itself
        code = e.code
    assert code == 2


def test_a_foreign_kernels_package_is_named_instead_of_failing_in_the_worker(tmp_path):
    """Hugging Face's `kernels` distribution has our kernels/'s import name: with it ahead on
    the path every subcommand refuses to start and says which file shadows ours."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(repo)]))
    run = subprocess.run([sys.executable, "-m", "tessera.cli", "worker", "--model", "m"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert str(tmp_path / "kernels" / "__init__.py") in run.stderr
    assert "pip uninstall kernels" in run.stderr and "Traceback" not in run.stderr
    # the same command finds ours without the shadow (and fails later, on the model path)
    env["PYTHONPATH"] = str(repo)
    (tmp_path / "elsewhere").mkdir()
    run = subprocess.run([sys.executable, "-m", "tessera.cli", "worker", "--model", "m"],
                         cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=120)
    assert "kernels" not in run.stderr and run.returncode != 0
