"""Offline throughput on a GPU (scripts/gpu_check.sh runs it): Tessera's engine against HF
`generate`, in one run, same model and dtype. The CPU roofline benchmark is
benchmarks/offline_throughput.py.

Standard workload: the `bench` model from make-model, 128 requests, prompt lengths uniform in
[16, 512] (seed 0), 128 output tokens each, ignore_eos. Baselines: HF `generate` one request
at a time (measured on the first 16 requests: its rate does not depend on how many) and HF
`generate` on left-padded batches of 32. Also reports model-FLOPs utilisation in steady decode
against a peak matmul rate measured in the same run.

On CUDA, `--energy` adds joules per generated token over Tessera's timed run (NVML or
nvidia-smi, benchmarks/power.py), and `--graphs-vs-eager N` times N short requests decoding
with CUDA graphs and with --enforce-eager, in the same run.

    python benchmarks/gpu_throughput.py [--dtype bfloat16 float32] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package: the repository root goes there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import gc
import time

import torch

from common.model_config import ModelConfig
from benchmarks.workload import (peak_matmul_flops, run_hf_one_at_a_time,
                                 run_hf_padded, sync, workload)
from benchmarks.engine_meter import (add_workload_arguments, meter_decode, model_or_bench,
                                     print_rows, warm_up)
from tessera import LLM, SamplingParams


def _free(device: str) -> None:
    """Release a finished engine's GPU memory (its KV cache takes a share of the device)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_tessera(model_dir: str, prompts, out_len: int, dtype: str, device: str, cfg: ModelConfig,
                energy: bool = False, enforce_eager: bool = False,
                gpu_memory_utilization: float = 0.5):
    llm = LLM(model_dir, dtype=dtype, device=device, max_num_seqs=256, max_num_batched_tokens=4096,
              enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    warm_up(llm, prompts[:4])
    decode = meter_decode(llm, cfg, device)
    meter = None
    if energy and device.startswith("cuda"):
        from benchmarks.power import GpuEnergy
        meter = GpuEnergy(torch.device(device).index or 0)
        meter.__enter__()
    t = time.perf_counter()
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        sync(device)
        elapsed = time.perf_counter() - t
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
    assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
    if meter is not None:
        decode["energy"] = (meter.joules / (len(prompts) * out_len), meter.mean_watts,
                            meter.source)
    return len(prompts) * out_len / elapsed, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: make the bench model in a temp dir)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    add_workload_arguments(ap, num_requests=128, output_len=128)
    ap.add_argument("--energy", action="store_true", help="CUDA: joules per token (NVML)")
    ap.add_argument("--graphs-vs-eager", type=int, default=0, metavar="N",
                    help="CUDA: also time N short requests with CUDA graphs and eagerly")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="CUDA: the engine's share (the rest is for the HF baselines)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = model_or_bench(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    prompts = workload(args.num_requests, cfg.vocab_size)
    rows = []
    for dtype in args.dtype:
        tdtype = getattr(torch, dtype)
        ours, decode = run_tessera(model_dir, prompts, args.output_len, dtype, args.device, cfg,
                                   args.energy, gpu_memory_utilization=args.gpu_memory_utilization)
        _free(args.device)
        if args.graphs_vs_eager:   # small-batch decode, where launch overhead dominates
            short = [p[:16] for p in prompts[:args.graphs_vs_eager]]
            speeds = []
            for eager in (False, True):
                speeds.append(run_tessera(model_dir, short, args.output_len, dtype, args.device,
                                          cfg, enforce_eager=eager,
                                          gpu_memory_utilization=args.gpu_memory_utilization)[1])
                _free(args.device)
            g, e = (d["tokens"] / d["time"] if d["time"] else float("nan") for d in speeds)
            decode["graphs_vs_eager"] = (g, e)
        # MFU against the peak of the dtype the engine computes in (float32 on a CPU without
        # native half-precision matmuls, see worker/runner.py compute_dtype)
        peak = peak_matmul_flops(decode["compute_dtype"], args.device)
        single = batched = float("nan")
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype).to(args.device).eval()
            hf.generation_config.eos_token_id = None
            with torch.inference_mode():
                single = run_hf_one_at_a_time(hf, prompts[:args.hf_single], args.output_len, args.device)
                batched = run_hf_padded(hf, prompts[:args.hf_batched], args.output_len,
                                        args.hf_batch_size, args.device)
            del hf
            _free(args.device)
        mfu = decode["flops"] / decode["time"] / peak if decode["time"] else float("nan")
        rows.append((dtype, ours, single, batched, mfu, peak, decode))
    print(f"\nworkload: {args.num_requests} requests, prompts U[16,512], {args.output_len} output tokens, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print_rows(rows)
    for dtype, ours, _, _, _, _, decode in rows:
        if "energy" in decode:
            per_token, watts, source = decode["energy"]
            print(f"energy {dtype}: {per_token:.4f} J/token at {ours:.0f} tok/s "
                  f"(mean {watts:.0f} W, {source})")
        if "graphs_vs_eager" in decode:
            g, e = decode["graphs_vs_eager"]
            print(f"graphs {dtype}: decode {g:.0f} tok/s with CUDA graphs, {e:.0f} eager "
                  f"({g / e:.2f}x, {args.graphs_vs_eager} sequences)")


if __name__ == "__main__":
    main()
