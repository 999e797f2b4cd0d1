"""n-gram speculative decoding on real models: the same outputs as without it.

Greedy and seeded outputs are token-identical with and without speculation (random tiny
models offline and through `tessera serve`, and the real SmolLM2), with stop strings, stop
ids, max_tokens, logprobs and n > 1; unseeded sampling keeps its distribution (a chi-square
homogeneity test, with a control that the test does tell two distributions apart); the prefix
cache stays exact after rejected drafts.
"""

from __future__ import annotations

import collections
import json
import math
import signal
import urllib.request

import pytest

from common.sampling_params import SamplingParams
from scheduler.spec_policy import StepCost
from tessera.llm import LLM

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}
P = [11, 300, 42, 7, 99, 150, 3, 77]
PROMPTS = [P + P + P[:5], [5, 6, 7, 8, 9] * 3, list(range(20, 60)), [400, 401, 402] * 5 + P]


@pytest.fixture(scope="module")
def engines(tiny_model):
    """The same tiny model without and with speculation (small blocks: drafts cross them)."""
    model = str(tiny_model("llama"))
    plain = LLM(model, kv_cache_memory_gb=0.01, block_size=4)
    spec = LLM(model, kv_cache_memory_gb=0.01, block_size=4, speculative_config=SPEC)
    # The draft policy weighs a row's price from measured step times, so how many drafts run
    # (and the acceptance counts asserted below) would follow the machine's timing noise.
    # Rows priced at zero make every count a function of the tokens alone; outputs never
    # depend on the price (tests/test_spec_decode_policy.py tests the pricing itself).
    spec.engine.scheduler.proposer.cost = _FreeRows()
    return plain, spec


class _FreeRows(StepCost):
    """A step cost that never fits: every draft row is free (row_cost 0)."""

    def observe(self, tokens: int, seconds: float) -> None:
        return None


def _gen(llm: LLM, prompts, params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _same(a, b, logprobs: bool = False) -> None:
    for x, y in zip(a, b):
        assert len(x.outputs) == len(y.outputs)
        for u, v in zip(x.outputs, y.outputs):
            assert (u.token_ids, u.text, u.finish_reason) == (v.token_ids, v.text, v.finish_reason)
            if logprobs:
                assert [t for t, _, _ in u.logprobs] == u.token_ids
                assert [t for t, _, _ in v.logprobs] == v.token_ids
                for (_, lp1, top1), (_, lp2, top2) in zip(u.logprobs, v.logprobs):
                    assert lp1 == pytest.approx(lp2, abs=1e-4)
                    assert [i for i, _ in top1] == [i for i, _ in top2]


def test_greedy_outputs_are_identical_with_and_without_speculation(engines):
    plain, spec = engines
    stats = spec.engine.scheduler.proposer.stats
    before = stats.num_accepted_tokens
    greedy = SamplingParams(max_tokens=40, temperature=0)
    base = _gen(plain, PROMPTS, greedy)
    _same(base, _gen(spec, PROMPTS, greedy))
    assert stats.num_accepted_tokens - before >= 20 and stats.num_accepted_tokens \
        < stats.num_draft_tokens   # drafts were accepted, and some rejected
    # Logprobs of every emitted token; max_tokens cutting a run short; n > 1.
    for params in (SamplingParams(max_tokens=40, temperature=0, logprobs=3),
                   SamplingParams(max_tokens=7, temperature=0),
                   SamplingParams(max_tokens=20, temperature=0, n=2)):
        _same(_gen(plain, PROMPTS, params), _gen(spec, PROMPTS, params), params.logprobs)
    # A stop token id and a stop string from the middle of the plain output.
    out = base[1].outputs[0]
    stop_id, stop_text = out.token_ids[17], out.text[len(out.text) // 2:][:3]
    for params in (SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(stop_id,)),
                   SamplingParams(max_tokens=40, temperature=0, stop=(stop_text,), logprobs=1)):
        a, b = _gen(plain, PROMPTS, params), _gen(spec, PROMPTS, params)
        _same(a, b, params.logprobs)
        assert a[1].outputs[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_identical_with_speculation(engines):
    plain, spec = engines
    for params in (SamplingParams(max_tokens=32, temperature=0.8, seed=7, n=3),
                   SamplingParams(max_tokens=32, temperature=1.0, top_k=5, top_p=0.9, seed=1,
                                  repetition_penalty=1.2, presence_penalty=0.3, logprobs=2),
                   SamplingParams(max_tokens=32, temperature=0.5, min_tokens=20, seed=3)):
        base = _gen(plain, PROMPTS, params)
        _same(base, _gen(spec, PROMPTS, params), params.logprobs)
        _same(base, _gen(spec, PROMPTS, params), params.logprobs)


def _chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): the regularized upper incomplete gamma, by series."""
    a, z = df / 2, x / 2
    term = total = 1.0 / a
    n = 0
    while term > 1e-15 * total:
        n += 1
        term *= z / (a + n)
        total += term
    return max(0.0, 1.0 - math.exp(-z + a * math.log(z) - math.lgamma(a)) * total)


def _homogeneity_p(a: collections.Counter, b: collections.Counter) -> float:
    """Chi-square test that two samples come from one distribution (rare cells pooled)."""
    na, nb = sum(a.values()), sum(b.values())
    cells = collections.Counter()
    for key in set(a) | set(b):
        cells[key if a[key] + b[key] >= 10 else "rare"] += 0
    rows = [collections.Counter(), collections.Counter()]
    for counter, row in zip((a, b), rows):
        for key, count in counter.items():
            row[key if a[key] + b[key] >= 10 else "rare"] += count
    stat = 0.0
    for key in cells:
        total = rows[0][key] + rows[1][key]
        for row, n in zip(rows, (na, nb)):
            expected = total * n / (na + nb)
            stat += (row[key] - expected) ** 2 / expected
    return _chi2_sf(stat, len(cells) - 1)


def test_unseeded_sampling_keeps_its_distribution(engines):
    """The joint distribution of 5 sampled tokens after a prompt where the drafts are often
    right; the control (another temperature) shows the test can tell distributions apart."""
    plain, spec = engines
    greedy = _gen(plain, [P], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    prompt = P + greedy.token_ids + P   # the lookup proposes the greedy continuation
    stats = spec.engine.scheduler.proposer.stats
    before = stats.num_accepted_tokens

    def sample(llm: LLM, temperature: float) -> collections.Counter:
        # In batches of 16: drafts pay on a small batch (scheduler.spec_policy prices a row
        # by the measured step cost), so the spec engine does verify them.
        params = SamplingParams(max_tokens=5, temperature=temperature, top_k=2)
        return collections.Counter(tuple(r.outputs[0].token_ids) for _ in range(25)
                                   for r in _gen(llm, [prompt] * 16, params))

    base = sample(plain, 1.0)
    assert _homogeneity_p(base, sample(spec, 1.0)) > 1e-3
    assert stats.num_accepted_tokens - before > 50, stats
    assert _homogeneity_p(base, sample(plain, 0.6)) < 1e-3   # the control


def test_the_prefix_cache_stays_exact_after_rejected_drafts(engines):
    """A request that starts with an earlier one's prompt and output reuses that one's cached
    blocks, written while drafts were rejected: its continuation must be the plain engine's."""
    plain, spec = engines
    greedy = SamplingParams(max_tokens=48, temperature=0)
    prompt = PROMPTS[3]
    first = _gen(spec, [prompt], greedy)[0].outputs[0].token_ids
    kv = spec.engine.core.kv
    hits = kv.prefix_hits
    longer = prompt + first[:30]
    again = _gen(spec, [longer], greedy)[0].outputs[0].token_ids
    assert kv.prefix_hits - hits >= len(prompt) + 24   # the blocks of the first output, reused
    assert again == _gen(plain, [longer], greedy)[0].outputs[0].token_ids
    assert again[:18] == first[30:48]


def test_through_tessera_serve_outputs_equal_the_offline_engine_and_metrics_count(
        engines, tiny_model):
    from openai import OpenAI

    from cli_procs import listed, start_serve
    from tessera.procs import free_port

    plain, _ = engines
    http = free_port()
    proc, lines = start_serve(["--model", str(tiny_model("llama")), "--http-port", str(http),
                               "--grpc-port", str(free_port()), "--kv-cache-memory-gb", "0.01",
                               "--block-size", "4", "--scheduler-replicas", "1",
                               "--speculative-config", json.dumps(SPEC)])
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none")
        name = client.models.list().data[0].id
        for params, extra in ((SamplingParams(max_tokens=30, temperature=0), {}),
                              (SamplingParams(max_tokens=24, temperature=0.9, seed=5, n=2,
                                              logprobs=2), {"logprobs": 2})):
            expected = _gen(plain, PROMPTS[:2], params)
            for prompt, want in zip(PROMPTS[:2], expected):
                got = client.completions.create(
                    model=name, prompt=prompt, max_tokens=params.max_tokens,
                    temperature=params.temperature, seed=params.seed, n=params.n, **extra)
                texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
                assert texts == [o.text for o in want.outputs]
        # Streamed, the tokens of a multi-token step arrive as one delta: the same text.
        stream = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=30,
                                           temperature=0, stream=True)
        want = _gen(plain, PROMPTS[:1], SamplingParams(max_tokens=30, temperature=0))
        assert "".join(c.choices[0].text for c in stream) == want[0].outputs[0].text
        metrics_url = next(u.split()[0] for u in listed(lines, "Metrics").split(", ")
                           if "(scheduler)" in u)
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line.startswith("tessera:spec_decode")}
        assert values["tessera:spec_decode_num_draft_tokens_total"] > 0
        assert 0 < values["tessera:spec_decode_num_accepted_tokens_total"] \
            <= values["tessera:spec_decode_num_draft_tokens_total"]
        assert values["tessera:spec_decode_acceptance_length_count"] == \
            values["tessera:spec_decode_num_drafts_total"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_smollm2_greedy_outputs_are_identical_with_speculation(smollm2_gguf):
    """The real model, on a copy-heavy chat (repeat a text): long accepted runs."""
    llm = LLM(str(smollm2_gguf), kv_cache_memory_gb=64 / 1024, speculative_config=SPEC)
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."
    conv = [[{"role": "user", "content": f"Repeat this sentence exactly: {text}"}],
            [{"role": "user", "content": "What is the capital of France?"}]]
    params = SamplingParams(max_tokens=32, temperature=0)
    with_spec = llm.chat(conv, params, use_tqdm=False)
    assert llm.engine.scheduler.proposer.stats.num_accepted_tokens >= 10
    # The same engine with its proposer switched off (one model load, not two): plain decoding.
    llm.engine.scheduler.proposer = None
    _same(llm.chat(conv, params, use_tqdm=False), with_spec)


def test_structured_output_with_speculation_is_identical_and_valid(engines):
    """Constrained rows get drafts too: the worker verifies only the drafts the grammar
    accepts (worker.structured's count_valid), and every verification row is masked by the
    matcher synced to its own tokens. Seeded outputs equal those without speculation, and
    every one parses and validates."""
    jsonschema = pytest.importorskip("jsonschema")
    plain, spec = engines
    schema = {"type": "array", "items": {"enum": ["alpha", "beta"]}, "minItems": 4,
              "maxItems": 8}
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=i,
                             structured_outputs={"json": schema}) for i in range(6)]
    stats = spec.engine.scheduler.proposer.stats
    before = stats.num_draft_tokens
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2] * 3]
    base = plain.generate(prompts, params, use_tqdm=False)
    fast = spec.generate(prompts, params, use_tqdm=False)
    _same(base, fast)
    assert stats.num_draft_tokens > before, "constrained rows were given drafts"
    for o in fast:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
