"""Offline throughput on a real model's chat answers (`--model x.gguf --chat`, answers stop at
the model's EOS) and the older bench-model comparison with HF; the CPU roofline benchmark is
benchmarks/offline_throughput.py.

Offline throughput: Tessera's engine against HF `generate`, in one run, same model and dtype.

Standard workload: the `bench` model from make-model, 128 requests, prompt lengths uniform in
[16, 512] (seed 0), 128 output tokens each, ignore_eos. Baselines: HF `generate` one request
at a time (measured on the first 16 requests: its rate does not depend on how many) and HF
`generate` on left-padded batches of 32. Also reports model-FLOPs utilisation in steady decode
against a peak matmul rate measured in the same run.

    python benchmarks/chat_throughput.py [--dtype bfloat16 float32] [--device cpu|cuda]

A real model: `--model x.gguf --chat` (e.g. SmolLM2-135M-Instruct, which `make run` installs)
sends chat questions through the model's template and lets every answer stop at its EOS, on
our side and HF's; throughput then counts the tokens actually generated.
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
from benchmarks.workload import left_padded, peak_matmul_flops, sync, workload
from benchmarks.engine_meter import (add_workload_arguments, meter_decode, model_or_bench,
                                     print_rows, warm_up)
from tessera import LLM, SamplingParams


def chat_workload(model: str, n: int) -> list[list[int]]:
    """`n` chat questions (cycled) rendered with the model's own template."""
    from common.tokenizer import Tokenizer
    from tessera.bench_serve import CHAT_QUESTIONS

    tok = Tokenizer.from_dir(model)
    return [tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}],
                                    tokenize=True) for i in range(n)]


def load_hf(model: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    from common.gguf_file import is_gguf
    path = Path(model)
    extra = {"gguf_file": path.name} if is_gguf(path) else {}
    return AutoModelForCausalLM.from_pretrained(str(path.parent) if extra else model, dtype=dtype,
                                                **extra).to(device).eval()


def _generated(row: list[int], eos: set[int] | None) -> int:
    """Tokens a request produced: all of them, or up to and including its first EOS."""
    if not eos:
        return len(row)
    return next((i + 1 for i, t in enumerate(row) if t in eos), len(row))


def run_tessera(model_dir: str, prompts, out_len: int, dtype: str, device: str, cfg: ModelConfig,
                real_eos: bool = False):
    llm = LLM(model_dir, dtype=dtype, device=device, max_num_seqs=256, max_num_batched_tokens=4096)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=not real_eos)
    warm_up(llm, prompts[:4])
    decode = meter_decode(llm, cfg, device)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    assert real_eos or all(len(o.outputs[0].token_ids) == out_len for o in outs)
    decode["mean_output_len"] = sum(len(o.outputs[0].token_ids) for o in outs) / len(outs)
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, decode


def run_hf_one_at_a_time(hf, prompts, out_len: int, device: str,
                         eos: set[int] | None = None) -> float:
    """Without `eos` every request makes exactly out_len tokens; with it, stops at EOS."""
    t, total = time.perf_counter(), 0
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=out_len,
                          min_new_tokens=0 if eos else out_len, do_sample=False, pad_token_id=0,
                          eos_token_id=list(eos) if eos else None)
        total += _generated(out[0, len(ids):].tolist(), eos)
    sync(device)
    return total / (time.perf_counter() - t)


def run_hf_padded(hf, prompts, out_len: int, batch: int, device: str,
                  eos: set[int] | None = None) -> float:
    t, total = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        ids, mask = left_padded(group)
        out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=out_len,
                          min_new_tokens=0 if eos else out_len, do_sample=False, pad_token_id=0,
                          eos_token_id=list(eos) if eos else None)
        total += sum(_generated(row[ids.shape[1]:].tolist(), eos) for row in out)
    sync(device)
    return total / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory or .gguf file (default: make the bench "
                    "model in a temp dir)")
    ap.add_argument("--chat", action="store_true", help="chat questions through the model's "
                    "template, every answer stopping at its EOS (a real model)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    add_workload_arguments(ap, num_requests=128, output_len=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = model_or_bench(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    prompts = (chat_workload(model_dir, args.num_requests) if args.chat
               else workload(args.num_requests, cfg.vocab_size))
    eos = set(cfg.eos_token_ids) if args.chat else None
    rows = []
    for dtype in args.dtype:
        tdtype = getattr(torch, dtype)
        ours, decode = run_tessera(model_dir, prompts, args.output_len, dtype, args.device, cfg,
                                   real_eos=args.chat)
        # MFU against the peak of the dtype the engine computes in (float32 on a CPU without
        # native half-precision matmuls, see worker/runner.py compute_dtype)
        peak = peak_matmul_flops(decode["compute_dtype"], args.device)
        single = batched = float("nan")
        if not args.skip_hf:
            hf = load_hf(model_dir, tdtype, args.device)
            hf.generation_config.eos_token_id = None
            with torch.inference_mode():
                single = run_hf_one_at_a_time(hf, prompts[:args.hf_single], args.output_len,
                                              args.device, eos)
                batched = run_hf_padded(hf, prompts[:args.hf_batched], args.output_len,
                                        args.hf_batch_size, args.device, eos)
        mfu = decode["flops"] / decode["time"] / peak if decode["time"] else float("nan")
        rows.append((dtype, ours, single, batched, mfu, peak, decode))
    shape = (f"chat questions, answers to EOS (at most {args.output_len} tokens; tessera's mean "
             f"{rows[0][6]['mean_output_len']:.1f})" if args.chat
             else f"prompts U[16,512], {args.output_len} output tokens")
    print(f"\nmodel {model_dir}\nworkload: {args.num_requests} requests, {shape}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print_rows(rows)


if __name__ == "__main__":
    main()
