"""What the offline engine benchmarks share: the model they run and the decode-step meter."""

from __future__ import annotations

import tempfile
import time

from benchmarks.workload import flops_per_token, sync
from common.model_config import ModelConfig
from tessera import SamplingParams


def model_or_bench(model: str | None) -> str:
    """``model``, or the bench model made in a temp dir when none is given."""
    if model is not None:
        return model
    from tessera.make_model import make_model
    return str(make_model(tempfile.mkdtemp() + "/bench", "llama", preset="bench"))


def warm_up(llm, prompts: list[list[int]]) -> None:
    """Short requests first, so one-time costs (allocation, kernels) stay out of the timing."""
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)


def meter_decode(llm, cfg: ModelConfig, device: str) -> dict:
    """Times the engine's steady-decode steps (every sequence computing one token) for the MFU
    figure: wraps its executor, and returns the dict it fills (time, flops, tokens)."""
    executor = llm.engine.executor
    inner = executor.execute
    decode = {"time": 0.0, "flops": 0.0, "tokens": 0}

    def timed(plan):
        t = time.perf_counter()
        out = inner(plan)
        sync(device)
        dt = time.perf_counter() - t
        if not plan.new and all(s.num_scheduled_tokens == 1 for s in plan.running):
            ctx = sum(s.num_computed_tokens for s in plan.running) / len(plan.running)
            decode["time"] += dt
            decode["tokens"] += len(plan.running)
            decode["flops"] += len(plan.running) * flops_per_token(cfg, ctx)
        return out

    executor.execute = timed
    decode["compute_dtype"] = executor.worker.runner.dtype
    return decode


def add_workload_arguments(ap, num_requests: int = 128, output_len: int = 128) -> None:
    """The flags the offline throughput benchmarks share: device, workload size, HF baselines."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=num_requests)
    ap.add_argument("--output-len", type=int, default=output_len)
    ap.add_argument("--hf-single", type=int, default=16,
                    help="requests for the one-at-a-time baseline")
    ap.add_argument("--hf-batched", type=int, default=64,
                    help="requests for the padded-batch baseline")
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")


def print_rows(rows: list[tuple]) -> None:
    """The throughput table: per dtype, Tessera against the HF baselines and the decode MFU.
    ``rows``: (dtype, tok/s, HF one-at-a-time, HF batched, mfu, peak, meter_decode's dict)."""
    print(f"{'dtype':9s} {'computes in':>11s} {'tessera tok/s':>13s} {'HF 1-at-a-time':>15s} "
          f"{'HF batch':>9s} {'x 1-at-a-time':>13s} {'x batch':>8s} {'decode MFU':>10s} "
          f"{'peak GFLOP/s':>12s} {'decode tok/s':>12s}")
    for dtype, ours, single, batched, mfu, peak, decode in rows:
        dec = decode["tokens"] / decode["time"] if decode["time"] else float("nan")
        print(f"{dtype:9s} {str(decode['compute_dtype'])[6:]:>11s} {ours:13.1f} {single:15.1f} "
              f"{batched:9.1f} {ours / single:13.2f} {ours / batched:8.2f} {mfu * 100:9.1f}% "
              f"{peak / 1e9:12.0f} {dec:12.1f}")
