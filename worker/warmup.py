"""Warm-up: size the KV cache to what a worst-case step leaves free, then capture decode graphs.

Shared by the worker service (`Warmup`, which a scheduler sends again after every restart or
reset) and the offline engine on one GPU. The order matters on CUDA: the old cache and graphs
are freed and handed back to the driver BEFORE the profile run, so a second warm-up measures
the same free memory as the first (measured with the old cache still held, the budget came out
near zero and the worker aborted). The scratch block the decode graphs' padding writes to is
taken out of the budget, not added past it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.kv_cache import kv_cache_bytes_per_block
from worker.runner import ModelRunner


def cuda_kv_budget(device: torch.device, gpu_memory_utilization: float) -> int:
    """Bytes the KV cache may take on a CUDA device: this process's share of the device
    (`gpu_memory_utilization` of it) less everything in use now, by this process (weights,
    the profile run's peak activations, still held by the caching allocator) and others."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total * gpu_memory_utilization) - (total - free)


def warm_up(runner: ModelRunner, max_num_batched_tokens: int, max_num_seqs: int,
            kv_budget: Callable[[], int], decode_graphs: bool) -> tuple[int, int]:
    """Profile a worst-case step, size and allocate the KV cache from `kv_budget()` (called
    after the profile run), and capture decode graphs if asked and supported. Returns
    (KV blocks for the scheduler, bytes per block); any earlier cache is dropped first."""
    runner.release_kv_cache()
    runner.profile_run(max(1, max_num_batched_tokens), max(1, max_num_seqs))
    per_block = kv_cache_bytes_per_block(runner.config, runner.block_size,
                                         runner.kv_cache_dtype)
    num_blocks = max(kv_budget() // per_block, 0)
    graphs = decode_graphs and runner.decode_graphs_supported() and num_blocks > 1
    if graphs:
        num_blocks -= 1   # the graphs' scratch block (runner.capture_decode_graphs adds it)
    runner.allocate_kv_cache(num_blocks)
    if graphs:
        runner.capture_decode_graphs(max_num_seqs)
    return num_blocks, per_block
