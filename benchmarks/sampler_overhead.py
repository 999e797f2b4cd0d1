"""Sampler cost per call at decode batch size: ms per call of worker.sampler.Sampler, next to a
naive torch baseline run in the same process (this machine is noisy: read the ratios).

    .venv/bin/python benchmarks/sampler_overhead.py [--rows 256] [--vocab 32000] [--repeat 15]

"flat" logits are randn (a top_p 0.9 nucleus spans most of the vocabulary, where a sort-based
sampler is at its worst); "peaked" logits are randn * 4, closer to a trained model's distribution.
Pass --threads 1 when other jobs share the CPUs: OpenMP barriers make 2-thread timings erratic.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from common.sampling_params import SamplingParams
from worker.sampler import Sampler, SamplingRow


def time_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: buffers allocated, code paths loaded
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def naive(logits: torch.Tensor, p: SamplingParams, rows: list[SamplingRow]) -> torch.Tensor:
    """The textbook way: penalties row by row (HF's gather / scatter), sort-based top_k / top_p
    on the full row, softmax, multinomial."""
    if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty:
        logits = logits.clone()
        for i, r in enumerate(rows):
            seen = torch.tensor(list(r.prompt_token_ids) + list(r.output_token_ids))
            score = logits[i].gather(0, seen)
            pen = p.repetition_penalty
            logits[i].scatter_(0, seen, torch.where(score > 0, score / pen, score * pen))
            counts = torch.bincount(torch.tensor(list(r.output_token_ids)), minlength=logits.shape[1])
            logits[i] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
    if p.temperature == 0:
        return logits.argmax(-1)
    x = logits / p.temperature
    if p.top_k > 0 or p.top_p < 1:
        vals, idx = x.sort(-1, descending=True)
        if p.top_k > 0:
            vals[:, p.top_k:] = float("-inf")
        probs = vals.softmax(-1)
        vals[probs.cumsum(-1) - probs >= p.top_p] = float("-inf")
        return idx.gather(1, torch.multinomial(vals.softmax(-1), 1)).squeeze(1)
    return torch.multinomial(x.softmax(-1), 1).squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    S, V = args.rows, args.vocab
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(S, V, generator=g)
    peaked = flat * 4
    prompt = torch.randint(0, V, (args.prompt_len,), generator=g).tolist()
    output = torch.randint(0, V, (args.output_len,), generator=g).tolist()
    penalties = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)
    cases: list[tuple[str, torch.Tensor, SamplingParams]] = [
        ("all greedy", peaked, SamplingParams(temperature=0.0)),
        ("greedy + penalties", peaked, SamplingParams(temperature=0.0, **penalties)),
        ("temperature 0.8", peaked, SamplingParams(temperature=0.8)),
        ("temperature 0.8, top_k 50", peaked, SamplingParams(temperature=0.8, top_k=50)),
        ("temperature 0.8, top_p 0.9, top_k 50", peaked,
         SamplingParams(temperature=0.8, top_p=0.9, top_k=50)),
        ("temperature 0.8, top_p 0.9 (peaked)", peaked, SamplingParams(temperature=0.8, top_p=0.9)),
        ("temperature 0.8, top_p 0.9 (flat)", flat,
         SamplingParams(temperature=0.8, top_p=0.9)),
        ("top_p 0.9, top_k 50 + penalties", peaked,
         SamplingParams(temperature=0.8, top_p=0.9, top_k=50, **penalties)),
        ("top_p 0.9, top_k 50, seeded rows", peaked,
         SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)),
    ]
    print(f"{S} rows x {V} vocab, {torch.get_num_threads()} threads; penalties over "
          f"{args.prompt_len} prompt + {args.output_len} output tokens per row")
    print(f"{'case':48s} {'sampler ms':>10s} {'naive ms':>10s} {'ratio':>6s}")
    sampler = Sampler(seed=0)
    for name, logits, params in cases:
        rows = [SamplingRow(params, prompt, output, seed_offset=i, eos_token_ids=(2,))
                for i in range(S)]
        ours = time_ms(lambda: sampler(logits, rows), args.repeat)
        base = time_ms(lambda: naive(logits, params, rows), max(3, args.repeat // 3))
        print(f"{name:48s} {ours:10.2f} {base:10.2f} {base / ours:5.1f}x")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
