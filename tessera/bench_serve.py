"""`tessera bench serve`: a load generator over the OpenAI streaming completions endpoint.

Metrics follow vLLM's serving benchmark: TTFT (request sent -> first content chunk), TPOT
(time per output token after the first: (e2e - ttft) / (output tokens - 1)), ITL (the gaps
between consecutive content chunks), e2e latency; request and output-token throughput over
the whole run. Every interval comes from this process's monotonic clock.

`--chat` sends real questions to /v1/chat/completions instead and lets each answer stop at the
model's own EOS, so a real model (SmolLM2) shows real output lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm.auto import tqdm

from tessera.sse import DONE, SseReader


# Varied questions for --chat (and benchmarks/offline_throughput.py --chat), cycled.
CHAT_QUESTIONS = (
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
    "What is 2 + 2?", "Explain photosynthesis in one sentence.", "Who wrote Romeo and Juliet?",
    "Give me a tip for learning Python.", "What is the boiling point of water?",
    "Tell me a short joke.", "What does a CPU do?", "List three fruits.",
    "How many days are in a leap year?", "Describe the color blue to a child.",
    "What is the largest planet in the solar system?", "Suggest a name for a cat.",
    "Why is the sky blue?",
)


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


async def sse_chunks(resp: httpx.Response):
    """The JSON chunks of an OpenAI server-sent-event stream, up to `data: [DONE]`."""
    reader = SseReader()
    async for line in resp.aiter_lines():
        event = reader.feed(line)
        if event is None:
            continue
        if event[1] == DONE:
            return
        yield event[1]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    last = None
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for chunk in sse_chunks(resp):
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if any(c.get("text") or (c.get("delta") or {}).get("content")
                       for c in chunk.get("choices", [])):
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = last is not None
        if not res.ok:
            res.error = "no content received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]}


async def run_benchmark(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.vocab_size) for _ in range(args.random_input_len)]
               for _ in range(args.num_prompts)]
    if args.chat:
        prompts = [CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)] for i in range(args.num_prompts)]
    url = args.base_url.rstrip("/") + ("/v1/chat/completions" if args.chat else "/v1/completions")
    limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
    bar = tqdm(total=args.num_prompts, desc="bench serve", disable=args.no_progress)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max(args.max_concurrency or args.num_prompts, 1))

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def send(prompt: list[int] | str) -> RequestResult:
            async with limit:
                body = {"model": args.model, "prompt": prompt, "max_tokens": args.random_output_len,
                        "temperature": 0.0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                if args.chat:   # a real question; the answer ends at the model's EOS
                    del body["prompt"], body["ignore_eos"]
                    body["messages"] = [{"role": "user", "content": prompt}]
                r = await _one(client, url, body)
                bar.update(1)
                return r

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(send(prompt)))
            if args.request_rate and args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))   # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "ttft_s": _stats([r.ttft for r in ok]), "tpot_s": _stats(tpot),
        "itl_s": _stats([x for r in ok for x in r.itl]), "e2e_s": _stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    return {"summary": summary, "requests": [asdict(r) for r in results]}


def print_summary(s: dict) -> None:
    print(f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.2f} s")
    print(f"request throughput     {s['request_throughput']:.2f} req/s")
    print(f"output token throughput {s['output_token_throughput']:.1f} tok/s")
    print(f"{'ms':8s} {'mean':>9s} {'median':>9s} {'p99':>9s}")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        st = s[name]
        print(f"{name[:-2].upper():8s} {st['mean'] * 1e3:9.2f} {st['median'] * 1e3:9.2f} "
              f"{st['p99'] * 1e3:9.2f}")
    for e in s["errors"]:
        print(f"error: {e}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=256,
                   help="prompt token ids are drawn from [0, this) (default 256)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals per second (default: all at once)")
    rate.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="send real questions to /v1/chat/completions, each answer stopping at "
                   "the model's EOS (--random-output-len is then the cap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    result = asyncio.run(run_benchmark(args))
    print_summary(result["summary"])
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["summary"]["failed"] == 0 else 1
