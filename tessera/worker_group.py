"""A worker group for the offline API: TP x PP `tessera worker` processes on this machine.

`LLM(model, tensor_parallel_size=2)` runs the same worker processes the services run (each
rank one process, joined by torch.distributed over gloo on CPU, NCCL on CUDA) and drives them
through the scheduler's gRPC executor; the engine loop is unchanged.
"""

from __future__ import annotations

import atexit
import weakref

from scheduler.executor import GrpcExecutor
from tessera.launcher import TESSERA, Stack, cpu_share, free_port


class LocalWorkerGroup:
    def __init__(self, model: str, tensor_parallel_size: int, pipeline_parallel_size: int,
                 dtype: str = "float32", block_size: int = 16, device: str = "cpu",
                 kv_cache_memory_bytes: int = 2 << 30, seed: int = 0,
                 step_timeout_s: float = 300.0) -> None:
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        self.stack = Stack()
        self._finalizer = weakref.finalize(self, self.stack.stop)
        atexit.register(self._finalizer)
        dist_addr = f"127.0.0.1:{free_port()}"
        workers = []
        try:
            for rank in range(tp * pp):
                port = free_port()
                argv = [*TESSERA, "worker", "--model", model, "--dtype", dtype,
                        "--device", device, "--port", str(port), "--block-size", str(block_size),
                        "--kv-cache-memory-gb", repr(kv_cache_memory_bytes / (1 << 30)),
                        "--seed", str(seed), "--tensor-parallel-size", str(tp),
                        "--pipeline-parallel-size", str(pp), "--rank", str(rank),
                        "--dist-init-addr", dist_addr, "--metrics-port", "0"]
                env = cpu_share(tp * pp) if device == "cpu" else None
                workers.append((f"worker.{rank}", self.stack.spawn(f"worker.{rank}", argv, env),
                                f"127.0.0.1:{port}"))
            for name, proc, _ in workers:
                self.stack.wait_ready(name, proc, "worker ready")
            self.executor = GrpcExecutor([a for _, _, a in workers], step_timeout_s)
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
