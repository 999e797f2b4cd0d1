"""`tessera serve`: the whole topology as separate processes on one machine, supervised.

A private `redis-server` on a free port with AOF (unless a Redis URL is given); per
data-parallel group, TP x PP workers (which meet at a TCP store on a free port) and one
scheduler; one gateway: the same processes, with the same flags, that compose and Kubernetes
run one per container. Each child's flags are generated from `ServeConfig`
(`settings.to_argv`), so every setting a child takes is also a `tessera serve` flag. Each tier
is started when the one before it is ready; the endpoints are printed once the gateway listens.

Supervision, as Kubernetes does it: a child that dies is restarted with exponential backoff
(a worker group as a group: its ranks cannot re-form a process group one by one), its restart
count printed and exported by the restarted process as `tessera:process_restarts_total`
(common/metrics.py); `--no-restart` stops the stack instead. Ctrl-C or SIGTERM stops every
process.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from common.config import GatewayConfig, SchedulerServiceConfig, ServeConfig, WorkerConfig
from common.metrics import RESTARTS_ENV, SERVICE_ENV
from common.settings import pick, to_argv
from tessera.procs import TESSERA, Proc, ProcessFailed, ProcessGroup, RedisProc, free_port

BACKOFF_S = (1.0, 30.0)   # first delay, longest delay; doubles per failure in a row
STABLE_S = 60.0           # a unit that ran this long before dying starts the backoff over


def cpu_share(num_workers: int) -> dict[str, str]:
    """Environment giving each of `num_workers` CPU workers on this machine its share of the
    cores. NOTE: measured on 2 cores: two workers with torch's default of one OpenMP thread
    per core each ran a TP=2 decode step 5x slower than one worker, their spinning thread
    teams fighting for the same cores; one thread each removes the fight."""
    if num_workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_workers))}


# libgomp's own knobs: a user who set either keeps his choice.
_WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# tcmalloc reports every allocation over this many bytes on stderr (default 1 GiB: the KV cache)
_LARGE_ALLOC_REPORT = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def cpu_allocator_env() -> dict[str, str]:
    """tcmalloc preloaded into a CPU worker (`LD_PRELOAD`), when its library is installed.

    NOTE: the model step allocates and frees many short-lived tensors of the same few sizes.
    Measured on 2 cores (benchmarks/allocator.py, the bench workload in fresh processes,
    alternating, 3 rounds): tcmalloc gave 1.10x glibc's tok/s (1.12x, 1.06x, 1.10x; 1.04x per
    CPU-second), jemalloc 0.95x; vLLM's CPU backend recommends tcmalloc too. Debian's package
    is libtcmalloc-minimal4 (scripts/setup.sh installs it). A user's LD_PRELOAD, even an empty
    one (`LD_PRELOAD= tessera serve`: glibc's malloc), wins."""
    if "LD_PRELOAD" in os.environ:
        return {}
    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib is None:
        return {}
    env = {"LD_PRELOAD": lib}
    if _LARGE_ALLOC_REPORT not in os.environ:
        env[_LARGE_ALLOC_REPORT] = str(1 << 40)
    return env


def colocated_worker_env(num_workers: int, device: str = "cpu") -> dict[str, str]:
    """cpu_share's threads, OpenMP threads that spin only briefly before they sleep, and
    tcmalloc (`cpu_allocator_env`), for CPU workers.

    NOTE: the workers of `tessera serve` share the machine's cores with the gateway, the
    scheduler, Redis and the clients. libgomp's default keeps a waiting thread spinning for
    300,000 rounds (milliseconds) after each parallel region: through every gap between two
    steps, while the scheduler and gateway need that core, and inside a step whenever one of
    the team's threads is preempted. Measured on 2 cores, 64 requests x 64 tokens through the
    stack under a neighbour's load (alternating stacks): the worker's CPU seconds over the
    batch were 54.5 with the default, 26.7-30.7 with GOMP_SPINCOUNT=20000 and 23.4 with
    OMP_WAIT_POLICY=PASSIVE; throughput 97, 142-171 and 172 tok/s. But sleeping at once costs
    a wake-up in every parallel region: a 64-token prefill (TTFT) took 49 ms passive against
    41 ms by default and 42 ms at 20,000 rounds, which covers the gaps inside a step and not
    those between steps. A worker alone on its machine (compose, Kubernetes) keeps libgomp's
    default; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if device != "cpu":
        return {}
    env = {**cpu_share(num_workers), **cpu_allocator_env()}
    if not any(k in os.environ for k in _WAIT_POLICY_VARS):
        env["GOMP_SPINCOUNT"] = "20000"
    return env


def worker_procs(config: WorkerConfig, labels: list[str], env: dict[str, str] | None = None
                 ) -> list[tuple[Proc, str, int]]:
    """The TP x PP workers of one group, not started: `config` with, per rank, its rank and
    free ports (a metrics port unless `config.metrics_port` is 0); per rank: (the Proc, its
    gRPC address, its metrics port). They meet at a TCP store on a free port, so all must be
    started before any is awaited."""
    dist_addr = config.dist_init_addr or f"127.0.0.1:{free_port()}"
    procs = []
    for rank, label in enumerate(labels):
        rank_config = dataclasses.replace(
            config, rank=rank, port=free_port(), dist_init_addr=dist_addr,
            metrics_port=free_port() if config.metrics_port else 0)
        argv = [*TESSERA, "worker", *to_argv(rank_config, WorkerConfig)]
        procs.append((Proc(label, argv, "worker ready", env),
                      f"127.0.0.1:{rank_config.port}", rank_config.metrics_port))
    return procs


class Unit(ProcessGroup):
    """Processes restarted together (a worker group; or one process), with its restarts."""

    def __init__(self, name: str, procs: list[Proc]) -> None:
        super().__init__(procs)
        self.name, self.restarts = name, 0
        self.started_at = time.monotonic()

    def start(self, timeout: float = 300.0) -> None:
        for proc in self.procs:
            if self.restarts:
                proc.env = {**(proc.env or os.environ), RESTARTS_ENV: str(self.restarts),
                            SERVICE_ENV: proc.name}
            proc.start()
        for proc in self.procs:
            proc.wait_ready(timeout)
        self.started_at = time.monotonic()

    def dead(self) -> Proc | None:
        return next((p for p in self.procs if p.poll() is not None), None)


class Stack:
    """The units of one local stack: started in order, supervised, stopped in reverse."""

    def __init__(self, restart: bool = True) -> None:
        self.units: list[Unit] = []
        self.restart = restart
        self.tmp = tempfile.mkdtemp(prefix="tessera-")
        self.stopping = threading.Event()
        self.failed: str | None = None       # with --no-restart: why the stack stops

    def start(self, name: str, procs: list[Proc]) -> Unit:
        unit = Unit(name, procs)
        self.units.append(unit)
        unit.start()
        return unit

    def supervise(self) -> None:
        """Until stop(): restart dead units (one thread each), or record the first death."""
        for unit in self.units:
            threading.Thread(target=self._watch, args=(unit,), daemon=True,
                             name=f"supervise-{unit.name}").start()

    def _watch(self, unit: Unit) -> None:
        failures = 0
        while not self.stopping.wait(0.5):
            dead = unit.dead()
            if dead is None:
                continue
            code = dead.returncode
            if not self.restart:
                self.failed = f"{dead.name} exited with status {code}"
                self.stopping.set()
                return
            failures = 1 if time.monotonic() - unit.started_at > STABLE_S else failures + 1
            delay = min(BACKOFF_S[0] * 2 ** (failures - 1), BACKOFF_S[1])
            unit.restarts += 1
            print(f"{dead.name} exited with status {code}: restarting {unit.name} in "
                  f"{delay:.0f} s (restarts: {unit.restarts})", file=sys.stderr, flush=True)
            unit.stop()
            if self.stopping.wait(delay):
                return
            try:
                unit.start()
                print(f"{unit.name} restarted (restarts: {unit.restarts})", flush=True)
                if self.stopping.is_set():   # stop() ran while this unit was starting
                    unit.stop()
            except RuntimeError as e:   # not ready again: dead once more, next round
                print(f"{unit.name} failed to restart: {e}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.stopping.set()
        ProcessGroup([p for unit in self.units for p in unit.procs]).stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def worker_config(config: ServeConfig, redis_url: str, group: str) -> WorkerConfig:
    """What a worker of group `group` takes from `tessera serve`'s settings (rank and ports
    are set per rank by worker_procs)."""
    return pick(WorkerConfig, config, served_model_name=config.model_name, redis_url=redis_url,
                group=group)


def scheduler_config(config: ServeConfig, redis_url: str, group: str,
                     workers: tuple[str, ...]) -> SchedulerServiceConfig:
    return pick(SchedulerServiceConfig, config, served_model_name=config.model_name,
                redis_url=redis_url, group=group, workers=workers, metrics_host="127.0.0.1",
                metrics_port=free_port())


def gateway_config(config: ServeConfig, redis_url: str) -> GatewayConfig:
    return pick(GatewayConfig, config, served_model_name=config.model_name, redis_url=redis_url,
                host=config.host, http_port=config.http_port, grpc_port=config.grpc_port)


def start_group(stack: Stack, config: ServeConfig, redis_url: str, group: str) -> list[str]:
    """One worker group and its scheduler; returns their metrics endpoints, "URL (label)"."""
    size, dp = config.world_size, config.data_parallel_size
    labels = ["worker"] if size * dp == 1 else [f"worker{group}-{rank}" for rank in range(size)]
    workers = worker_procs(worker_config(config, redis_url, group), labels,
                           env=colocated_worker_env(size * dp, config.device))
    stack.start("worker" if size * dp == 1 else f"worker group {group}",
                [p for p, _, _ in workers])
    endpoints = []
    # One active scheduler and standbys on the group's lease: the first started takes it.
    for replica in range(max(config.scheduler_replicas, 1)):
        label = "scheduler" if dp == 1 else f"scheduler{group}"
        if replica:
            label += f"-standby{replica}"
        scheduler = scheduler_config(config, redis_url, group, tuple(a for _, a, _ in workers))
        stack.start(label, [Proc(label, [*TESSERA, "scheduler",
                                         *to_argv(scheduler, SchedulerServiceConfig)],
                                 "scheduler ready")])
        endpoints.append(f"http://127.0.0.1:{scheduler.metrics_port}/metrics ({label})")
    return [*endpoints, *(f"http://127.0.0.1:{m}/metrics ({p.name})" for p, _, m in workers)]


def serve(config: ServeConfig) -> int:
    name = config.model_name
    stack = Stack(restart=config.restart)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = config.redis_url
        if redis_url is None:
            redis = RedisProc(stack.tmp)
            stack.start("redis", [redis])
            redis_url = redis.url
        # The gateway's ready line (its readiness here) comes once both faces listen, TLS or not.
        scheme = "https" if config.ssl_certfile else "http"
        metrics = [f"{scheme}://{config.host}:{config.http_port}/metrics (gateway)"]
        for group in range(config.data_parallel_size):
            metrics += start_group(stack, config, redis_url, str(group))
        gateway = gateway_config(config, redis_url)
        stack.start("gateway", [Proc("gateway", [*TESSERA, "gateway",
                                                 *to_argv(gateway, GatewayConfig)],
                                     "gateway ready")])
        print(f"tessera serving {name}\n"
              f"  OpenAI HTTP  {scheme}://{config.host}:{config.http_port}/v1\n"
              f"  gRPC         {config.host}:{config.grpc_port}"
              f"{' (TLS)' if config.ssl_certfile else ''}\n"
              f"  Internal     {'mutual TLS' if config.internal_tls else 'plaintext'} gRPC "
              f"between schedulers and workers\n"
              f"  Redis        {redis_url}\n"
              f"  Metrics      {', '.join(metrics)}\n"
              f"Ctrl-C stops everything.", flush=True)
        stack.supervise()
        while not stack.stopping.wait(1.0):
            pass
        print(f"{stack.failed}; stopping the stack (--no-restart)", file=sys.stderr)
        return 1
    except ProcessFailed as e:   # a child did not come up: its output says why
        print(f"tessera serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
