"""The roofline of an engine run with memory traffic counted, step by step.

The compute-only roofline (useful FLOPs at the GEMM peak) assumes every step is compute-bound.
A decode step is not: it computes a few FLOPs per byte it must read. Every step reads the
layer weights once (and the LM head's when it samples), and attention reads every cached K/V
row of every scheduled sequence once per layer. On a CPU whose last-level cache is smaller
than the weights plus one step's K/V, those bytes come from DRAM, so a step cannot take less
than max(FLOPs / GEMM peak, bytes / DRAM read bandwidth). Summed over the steps the engine
actually ran, that is the time floor this module reports, next to the compute-only one.

`StepRecorder` wraps the in-process engine's executor (like benchmarks/phase_timer.py) and
records each plan's sequences as (cached tokens, scheduled tokens) and its sampled rows;
`read_bandwidth` measures DRAM read bandwidth on a buffer several times the last-level cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.workload import layer_params
from common.model_config import ModelConfig


def last_level_cache_bytes(default: int = 256 << 20) -> int:
    """The largest CPU cache sysfs lists (the L3 on these machines), or `default`."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=default)


def read_bandwidth(reps: int = 3) -> float:
    """Bytes/s of a read-only pass (a sum) over 4x the last-level cache, best of `reps`."""
    n = 4 * last_level_cache_bytes() // 4
    x = torch.ones(n, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return n * 4 / best


@dataclass
class Step:
    """One executed plan: (tokens already cached, tokens scheduled) per sequence, rows sampled."""
    seqs: list[tuple[int, int]]
    sampled: int


@dataclass
class StepRecorder:
    """Records every plan the engine executes while active (`with StepRecorder(llm) as rec:`)."""
    llm: object
    steps: list[Step] = field(default_factory=list)

    def __enter__(self) -> "StepRecorder":
        executor = self.llm.engine.executor
        self._inner = executor.__dict__.get("execute")   # a wrapper another timer put there
        execute = executor.execute

        def recorded(plan):
            seqs = [(s.num_computed_tokens, s.num_scheduled_tokens) for s in plan.new]
            seqs += [(s.num_computed_tokens, s.num_scheduled_tokens) for s in plan.running]
            out = execute(plan)
            self.steps.append(Step(seqs, len(out.sampled)))
            return out
        executor.execute = recorded
        return self

    def __exit__(self, *exc) -> None:
        executor = self.llm.engine.executor
        if self._inner is None:
            del executor.execute
        else:
            executor.execute = self._inner


@dataclass
class Floor:
    """Seconds the recorded steps need at least: compute-only, and with memory traffic."""
    compute_s: float
    memory_s: float            # bytes / bandwidth summed over steps
    floor_s: float             # sum over steps of max(compute, memory)
    memory_bound_steps: int
    bytes_read: float


def step_floor(cfg: ModelConfig, steps: list[Step], peak_flops: float, bandwidth: float,
               weight_elem: int, kv_elem: int) -> Floor:
    """The per-step roofline of `steps` (see the module docstring). FLOPs counted as in
    offline_throughput.workload_flops; bytes = layer weights + the LM head when a row is sampled
    + every scheduled sequence's K/V (its cached and new positions) in every layer."""
    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    params = layer_params(cfg)
    layer_flops = 2 * cfg.num_layers * params
    head_params = h * cfg.vocab_size
    kv_bytes_per_pos = cfg.num_layers * 2 * kv * kv_elem
    compute = memory = floor = 0.0
    total_bytes, bound = 0.0, 0
    for st in steps:
        tokens = sum(n for _, n in st.seqs)
        flops = tokens * layer_flops + st.sampled * 2 * head_params
        # query i of a chunk after c cached tokens sees c + i + 1 keys
        flops += sum(cfg.num_layers * 4 * q * (n * c + n * (n + 1) / 2) for c, n in st.seqs)
        nbytes = (cfg.num_layers * params + (head_params if st.sampled else 0)) * weight_elem
        nbytes += sum((c + n) * kv_bytes_per_pos for c, n in st.seqs)
        tc, tm = flops / peak_flops, nbytes / bandwidth
        compute, memory, floor = compute + tc, memory + tm, floor + max(tc, tm)
        total_bytes += nbytes
        bound += tm > tc
    return Floor(compute, memory, floor, bound, total_bytes)
