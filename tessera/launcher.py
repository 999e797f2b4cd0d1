"""`tessera serve`: the whole topology as separate processes on one machine.

A private `redis-server` on a free port (unless a Redis URL is given), one worker, one
scheduler and one gateway: the same processes, with the same flags, that compose and
Kubernetes run one per container. Each is started when the one before it is ready; the
endpoints are printed once the gateway listens; Ctrl-C or SIGTERM stops every process.
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
    log_args: list[str] = field(default_factory=list)       # --log-format / --log-prompts, to all


class Stack:
    """The processes of one local stack, stopped in reverse order of their start."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._tmp = tempfile.mkdtemp(prefix="tessera-")

    def start(self, name: str, argv: list[str], ready: str, timeout: float = 300) -> None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.procs.append((name, proc))
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


def serve(config: ServeConfig) -> int:
    tessera = [sys.executable, "-m", "tessera.cli"]
    name = config.served_model_name or os.path.basename(os.path.normpath(config.model))
    stack = Stack()

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = config.redis_url or stack.start_redis()
        worker_port = free_port()
        worker_metrics, scheduler_metrics = free_port(), free_port()
        stack.start("worker", [*tessera, "worker", "--model", config.model, "--dtype", config.dtype,
                               "--port", str(worker_port), "--redis-url", redis_url,
                               "--served-model-name", name, "--metrics-port", str(worker_metrics),
                               *config.log_args, *config.worker_args], "worker ready")
        stack.start("scheduler", [*tessera, "scheduler", "--model", config.model,
                                  "--workers", f"127.0.0.1:{worker_port}", "--redis-url", redis_url,
                                  "--served-model-name", name, "--metrics-host", "127.0.0.1",
                                  "--metrics-port", str(scheduler_metrics), *config.log_args,
                                  *config.scheduler_args],
                    "scheduler ready")
        stack.start("gateway", [*tessera, "gateway", "--model", config.model,
                                "--served-model-name", name, "--redis-url", redis_url,
                                "--host", config.host, "--http-port", str(config.http_port),
                                "--grpc-port", str(config.grpc_port), *config.log_args],
                    "gateway ready")
        print(f"tessera serving {name}\n"
              f"  OpenAI HTTP  http://{config.host}:{config.http_port}/v1\n"
              f"  gRPC         {config.host}:{config.grpc_port}\n"
              f"  Redis        {redis_url}\n"
              f"  Metrics      http://{config.host}:{config.http_port}/metrics (gateway), "
              f"http://127.0.0.1:{scheduler_metrics}/metrics (scheduler), "
              f"http://127.0.0.1:{worker_metrics}/metrics (worker)\n"
              f"Ctrl-C stops everything.", flush=True)
        died, code = stack.wait_any()
        print(f"{died} exited with status {code}; stopping the stack", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
