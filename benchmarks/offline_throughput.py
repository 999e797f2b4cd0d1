"""Offline throughput: Tessera's engine against the fp32 compute roofline and HF `generate`, one run.

The bench workload: the `bench` model from make-model, 64 requests, prompt lengths uniform in
[16, 512] (seed 0), 64 greedy output tokens each, ignore_eos, float32. In one run it prints:
tokens/s of the engine with the CPU fast path (C++ attention and elementwise kernels,
oneDNN-prepacked weights) and of the same engine on the plain torch path (`TESSERA_KERNELS=
torch`: what the engine did before them), the workload's useful FLOPs, the fp32 GEMM peak
measured in the same run, the roofline fraction (useful FLOPs at that peak vs the wall time),
per-phase time, and HF `generate` one request at a time and on left-padded batches. All runs
are interleaved (--rounds) and each one's best is kept: the machine is shared. The script runs
itself again under tcmalloc, the allocator `tessera serve` preloads into its CPU workers
(benchmarks/allocator.py `as_served`; `LD_PRELOAD=` keeps glibc's malloc): every number of a
run, HF's included, comes from the same allocator.

    python benchmarks/offline_throughput.py [--num-requests 64] [--output-len 64] [--rounds 2]
                                            [--model DIR] [--max-num-batched-tokens N]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package: the repository root goes there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time

import torch

from common.model_config import ModelConfig
from benchmarks.allocator import allocator_of, as_served
from benchmarks.phase_timer import PHASES
from benchmarks.engine_meter import add_workload_arguments, model_or_bench
from benchmarks.roofline import (StepRecorder, last_level_cache_bytes, read_bandwidth,
                                 step_floor)
from benchmarks.workload import (layer_params, peak_matmul_flops, run_hf_one_at_a_time,
                                 run_hf_padded, workload)
from tessera import LLM, SamplingParams


def workload_flops(cfg: ModelConfig, prompts: list[list[int]], out_len: int) -> float:
    """Useful FLOPs of the workload: every computed position's layer matmuls (2 per weight),
    causal attention (QK and PV over the position's keys), the LM head only for the positions
    whose token is sampled (one per output token)."""
    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    layer = 2 * cfg.num_layers * layer_params(cfg)
    total = 0.0
    for p in prompts:
        n = len(p) + out_len - 1                    # positions computed
        total += n * layer + out_len * 2 * h * cfg.vocab_size
        total += cfg.num_layers * 4 * q * n * (n + 1) / 2   # key count of position i is i + 1
    return total


def memory_floor(llm, cfg: ModelConfig, steps, peak: float, bandwidth: float):
    """The step-by-step roofline with memory traffic (benchmarks/roofline.py); None off CPU."""
    if not bandwidth:
        return None
    runner = llm.engine.executor.worker.runner
    weight_elem = torch.empty((), dtype=runner.dtype).element_size()
    kv_elem = runner.kv_caches[0][0].element_size()
    return step_floor(cfg, steps, peak, bandwidth, weight_elem, kv_elem)


def run_tessera(llm, prompts, out_len: int, fast: bool) -> tuple[float, float, dict, list]:
    """(tok/s, CPU seconds of this process, seconds per phase, the steps run) of one run."""
    from benchmarks.phase_timer import PhaseTimer
    from kernels import set_kernel_backend

    set_kernel_backend("auto" if fast else "torch")
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    try:
        cpu = time.process_time()
        with PhaseTimer(llm) as timer, StepRecorder(llm) as steps:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        cpu = time.process_time() - cpu
    finally:
        set_kernel_backend("auto")
    assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
    return len(prompts) * out_len / timer.wall, cpu, timer.seconds, steps.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: make the bench model in a temp dir)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype), float32, "
                    "float16 or bfloat16: the KV cache's storage (compute stays fp32)")
    add_workload_arguments(ap, num_requests=64, output_len=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the engine's token budget (default: LLM's default)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of fast / torch path")
    ap.add_argument("--skip-torch-path", action="store_true", help="only the fast path")
    args = ap.parse_args()
    as_served()   # the allocator `tessera serve` gives its CPU workers, as they run the model
    torch.manual_seed(0)
    model_dir = model_or_bench(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    prompts = workload(args.num_requests, cfg.vocab_size)
    budget = {} if args.max_num_batched_tokens is None else {
        "max_num_batched_tokens": args.max_num_batched_tokens}
    # No prefix caching: every run (and round) computes the whole workload. With it, a run
    # after the first found the same prompts' blocks cached and skipped their prefill (how
    # the torch path once came out with a tenth of the fast path's prefill time).
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_num_seqs=256,
              enable_prefix_caching=False, kv_cache_dtype=args.kv_cache_dtype, **budget)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    compute = llm.engine.executor.worker.runner.dtype
    configs = ["fast"] + ([] if args.skip_torch_path else ["torch path"])
    runs: dict[str, list] = {c: [] for c in configs}
    peaks, bandwidths, singles, batches = [], [], [], []
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute).to(args.device).eval()
        hf.generation_config.eos_token_id = None
    for _ in range(args.rounds):   # everything interleaved: the machine's load drifts
        peaks.append(peak_matmul_flops(compute, args.device))
        if args.device == "cpu":
            bandwidths.append(read_bandwidth())
        for c in configs:
            runs[c].append(run_tessera(llm, prompts, args.output_len, c == "fast"))
        if hf is not None:
            with torch.inference_mode():
                singles.append(run_hf_one_at_a_time(hf, prompts[:args.hf_single], args.output_len,
                                                    args.device))
                batches.append(run_hf_padded(hf, prompts[:args.hf_batched], args.output_len,
                                             args.hf_batch_size, args.device))
    peak = max(peaks)
    flops = workload_flops(cfg, prompts, args.output_len)
    n_tokens = args.num_requests * args.output_len
    roofline = n_tokens / (flops / peak)
    single = max(singles, default=float("nan"))
    batched = max(batches, default=float("nan"))
    print(f"\nworkload: {args.num_requests} requests, prompts U[16,512], {args.output_len} output "
          f"tokens, {args.dtype} (computes in {str(compute)[6:]}), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, allocator {allocator_of()}, token budget "
          f"{getattr(getattr(llm.engine.scheduler, 'config', None), 'max_num_batched_tokens', '?')}")
    print(f"useful FLOPs {flops / 1e12:.3f} TFLOP | GEMM peak (2048^3, torch or oneDNN, best of {args.rounds}) "
          f"{peak / 1e9:.0f} GFLOP/s | roofline {roofline:.0f} tok/s")
    print(f"HF generate: one at a time {single:.1f} tok/s, padded batches of {args.hf_batch_size} "
          f"{batched:.1f} tok/s")
    print(f"{'engine':11s} {'tok/s':>7s} {'roofline':>8s} {'+memory':>7s} {'x HF 1-by-1':>11s} "
          f"{'x HF batch':>10s} {'tok/CPU-s':>9s} | seconds: " + " | ".join(PHASES))
    floors = {}
    for c, results in runs.items():
        tps, cpu, phases, steps = max(results, key=lambda r: r[0])
        floors[c] = floor = memory_floor(llm, cfg, steps, peak, max(bandwidths, default=0.0))
        # tok/s against the floor's tok/s: the fraction of the memory-aware roofline
        with_memory = f"{tps * floor.floor_s / n_tokens * 100:6.1f}%" if floor else f"{'-':>7s}"
        print(f"{c:11s} {tps:7.1f} {tps / roofline * 100:7.1f}% {with_memory} {tps / single:11.2f} "
              f"{tps / batched:10.2f} {n_tokens / cpu:9.1f} | "
              + " | ".join(f"{phases[p]:.2f}" for p in PHASES))
    floor = floors["fast"]
    if floor:
        print(f"roofline with memory traffic (DRAM read {max(bandwidths) / 1e9:.1f} GB/s, best of "
              f"{args.rounds}, over {4 * last_level_cache_bytes() >> 20} MiB; the fast run's "
              f"{len(runs['fast'][0][3])} steps, {floor.memory_bound_steps} of them memory-bound, "
              f"{floor.bytes_read / 1e9:.1f} GB read): floor {floor.floor_s:.2f} s = "
              f"{n_tokens / floor.floor_s:.0f} tok/s (compute alone {floor.compute_s:.2f} s, "
              f"bytes alone {floor.memory_s:.2f} s)")
    if len(runs) == 2:
        fast, base = (max(r[0] for r in runs[c]) for c in configs)
        print(f"fast path / torch path: {fast / base:.2f}x (best of {args.rounds} each, interleaved)")


if __name__ == "__main__":
    main()
