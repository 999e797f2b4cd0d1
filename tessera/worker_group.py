"""A worker group for the offline API: TP x PP `tessera worker` processes on this machine.

`LLM(model, tensor_parallel_size=2)` runs the same worker processes the services run (each
rank one process, joined by torch.distributed over gloo on CPU, NCCL on CUDA) and drives them
through the scheduler's gRPC executor; the engine loop is unchanged.
"""

from __future__ import annotations

import atexit
import weakref

from scheduler.executor import GrpcExecutor
from tessera.launcher import Stack, cpu_share, start_workers


class LocalWorkerGroup:
    def __init__(self, model: str, tensor_parallel_size: int, pipeline_parallel_size: int,
                 dtype: str = "float32", block_size: int = 16, device: str = "cpu",
                 kv_cache_memory_bytes: int = 2 << 30, seed: int = 0,
                 step_timeout_s: float = 300.0) -> None:
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        self.stack = Stack()
        self._finalizer = weakref.finalize(self, self.stack.stop)
        atexit.register(self._finalizer)
        try:
            # Each rank takes its own GPU from `device` and its rank (worker/group.py).
            args = ["--model", model, "--dtype", dtype, "--device", device,
                    "--block-size", str(block_size), "--seed", str(seed),
                    "--kv-cache-memory-gb", repr(kv_cache_memory_bytes / (1 << 30))]
            workers = start_workers(self.stack, tp, pp, args,
                                    [f"worker.{rank}" for rank in range(tp * pp)],
                                    cpu_share(tp * pp) if device == "cpu" else None,
                                    metrics=False)
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
