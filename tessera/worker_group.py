"""A worker group for the offline API: TP x PP `tessera worker` processes on this machine.

`LLM(model, tensor_parallel_size=2)` runs the same worker processes the services run (each
rank one process, joined by torch.distributed over gloo on CPU, NCCL on CUDA), started the way
`tessera serve` starts them (tessera/launcher.py), and drives them through the scheduler's
gRPC executor; the engine loop is unchanged.
"""

from __future__ import annotations

import atexit
import weakref

from common.config import EngineConfig, WorkerConfig
from common.settings import pick
from scheduler.executor import GrpcExecutor
from tessera.launcher import cpu_allocator_env, cpu_share, worker_procs
from tessera.procs import ProcessGroup


class LocalWorkerGroup:
    """The worker processes of one sharded `LLM`; `close()` (or exit) stops them."""

    def __init__(self, config: EngineConfig, step_timeout_s: float = 300.0) -> None:
        self.procs = ProcessGroup()
        self._finalizer = weakref.finalize(self, self.procs.stop)
        atexit.register(self._finalizer)
        try:
            worker = pick(WorkerConfig, config, metrics_port=0)
            workers = worker_procs(worker, [f"worker.{rank}" for rank in range(config.world_size)],
                                   {**cpu_share(config.world_size), **cpu_allocator_env()}
                                   if config.device == "cpu" else None)
            for proc, _, _ in workers:
                self.procs.add(proc).start()
            for proc, _, _ in workers:
                proc.wait_ready()
            self.executor = GrpcExecutor([a for _, a, _ in workers], step_timeout_s)
            self.executor.info(60.0)
        except BaseException:
            self.close()
            raise

    def warmup(self, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Profile every rank; the KV blocks the whole group can hold."""
        return self.executor.warmup(max_num_batched_tokens, max_num_seqs)

    def close(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.close()
        self._finalizer()
