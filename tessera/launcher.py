"""`tessera serve`: the whole topology as separate processes on one machine.

A private `redis-server` on a free port (unless a Redis URL is given); per data-parallel
group, TP x PP workers (which meet at a TCP store on a free port) and one scheduler; one
gateway: the same processes, with the same flags, that compose and Kubernetes run one per
container. Each tier is started when the one before it is ready; the endpoints are printed
once the gateway listens; Ctrl-C or SIGTERM stops every process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    redis_url: str | None = None
    served_model_name: str | None = None
    dtype: str = "float32"
    worker_args: list[str] = field(default_factory=list)
    scheduler_args: list[str] = field(default_factory=list)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    log_args: list[str] = field(default_factory=list)       # --log-format / --log-prompts, to all


class Stack:
    """The processes of one local stack, stopped in reverse order of their start."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._tmp = tempfile.mkdtemp(prefix="tessera-")

    def start(self, name: str, argv: list[str], ready: str, timeout: float = 300) -> None:
        self.wait_ready(name, self.spawn(name, argv), ready, timeout)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True,
                                env=None if env is None else {**os.environ, **env})
        self.procs.append((name, proc))
        return proc

    def wait_ready(self, name: str, proc: subprocess.Popen, ready: str,
                   timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        tail: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            tail = (tail + [line])[-20:]
            if ready in line:
                # keep draining its output so a full pipe never blocks the process
                threading.Thread(target=self._relay, args=(name, proc), daemon=True).start()
                return
        raise RuntimeError(f"{name} did not become ready:\n{''.join(tail)}")

    @staticmethod
    def _relay(name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if os.environ.get("TESSERA_SERVE_VERBOSE"):
                sys.stderr.write(f"[{name}] {line}")

    def start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server), "
                               "or pass --redis-url")
        port = free_port()
        self.start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", self._tmp],
                   "Ready to accept connections")
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def wait_any(self) -> tuple[str, int]:
        """Blocks until a process exits; returns its name and exit status."""
        while True:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    return name, proc.returncode
            time.sleep(0.5)


TESSERA = [sys.executable, "-m", "tessera.cli"]


def cpu_share(num_workers: int) -> dict[str, str]:
    """Environment giving each of `num_workers` CPU workers on this machine its share of the
    cores. NOTE: measured on 2 cores: two workers with torch's default of one OpenMP thread
    per core each ran a TP=2 decode step 5x slower than one worker, their spinning thread
    teams fighting for the same cores; one thread each removes the fight."""
    if num_workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_workers))}


def parallel_flags(tp: int, pp: int) -> list[str]:
    return ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]


def start_workers(stack: Stack, tp: int, pp: int, worker_args: list[str], labels: list[str],
                  env: dict[str, str] | None = None, metrics: bool = True
                  ) -> list[tuple[str, str, int]]:
    """The TP x PP workers of one group, all started before any is awaited (they meet first,
    at a TCP store on a free port); per rank: (label, gRPC address, metrics port or 0)."""
    dist_addr = f"127.0.0.1:{free_port()}"
    started = []
    for rank, label in enumerate(labels):
        port, metrics_port = free_port(), (free_port() if metrics else 0)
        proc = stack.spawn(label, [
            *TESSERA, "worker", "--port", str(port), *parallel_flags(tp, pp), "--rank", str(rank),
            "--dist-init-addr", dist_addr, "--metrics-port", str(metrics_port), *worker_args],
            env)
        started.append((label, proc, f"127.0.0.1:{port}", metrics_port))
    for label, proc, _, _ in started:
        stack.wait_ready(label, proc, "worker ready")
    return [(label, address, metrics_port) for label, _, address, metrics_port in started]


def start_group(stack: Stack, config: ServeConfig, name: str, redis_url: str,
                group: str) -> list[str]:
    """One worker group and its scheduler; returns their metrics endpoints, "URL (label)"."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    single = tp * pp * config.data_parallel_size == 1
    labels = ["worker"] if single else [f"worker{group}-{rank}" for rank in range(tp * pp)]
    workers = start_workers(
        stack, tp, pp, ["--model", config.model, "--dtype", config.dtype, "--redis-url", redis_url,
                        "--served-model-name", name, "--group", group, *config.log_args,
                        *config.worker_args],
        labels, env=cpu_share(tp * pp * config.data_parallel_size))
    label, metrics_port = ("scheduler" if config.data_parallel_size == 1
                           else f"scheduler{group}"), free_port()
    stack.start(label, [
        *TESSERA, "scheduler", "--model", config.model,
        "--workers", ",".join(a for _, a, _ in workers), "--redis-url", redis_url,
        "--served-model-name", name, "--group", group, *parallel_flags(tp, pp),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), *config.log_args,
        *config.scheduler_args], "scheduler ready")
    return [f"http://127.0.0.1:{metrics_port}/metrics ({label})",
            *(f"http://127.0.0.1:{m}/metrics ({w})" for w, _, m in workers)]


def serve(config: ServeConfig) -> int:
    tessera = TESSERA
    name = config.served_model_name or os.path.basename(os.path.normpath(config.model))
    stack = Stack()

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = config.redis_url or stack.start_redis()
        metrics = [f"http://{config.host}:{config.http_port}/metrics (gateway)"]
        for group in range(config.data_parallel_size):
            metrics += start_group(stack, config, name, redis_url, str(group))
        stack.start("gateway", [*tessera, "gateway", "--model", config.model,
                                "--served-model-name", name, "--redis-url", redis_url,
                                "--host", config.host, "--http-port", str(config.http_port),
                                "--grpc-port", str(config.grpc_port), *config.log_args],
                    "gateway ready")
        print(f"tessera serving {name}\n"
              f"  OpenAI HTTP  http://{config.host}:{config.http_port}/v1\n"
              f"  gRPC         {config.host}:{config.grpc_port}\n"
              f"  Redis        {redis_url}\n"
              f"  Metrics      {', '.join(metrics)}\n"
              f"Ctrl-C stops everything.", flush=True)
        died, code = stack.wait_any()
        print(f"{died} exited with status {code}; stopping the stack", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
