"""Speculation's adaptive draft length (scheduler.spec_policy): a sequence whose drafts are
rejected stops drafting and probes with backoff, comes back once its drafts are right again;
the step-cost fit and the row price it sets; vLLM's disable_by_batch_size; and through the real
engine, drafting stops on a sequence the model never agrees with, outputs unchanged (also
across preemptions, where the adaptation state outlives the KV cache)."""

from __future__ import annotations

import random

import pytest

from common.config import SpeculativeConfig
from common.sampling_params import SamplingParams
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.request import Request
from scheduler.scheduler import SchedulerConfig
from scheduler.spec_decode import NgramIndex, NgramProposer
from scheduler.spec_policy import PROBE_FIRST, PROBE_MAX, Acceptance, StepCost
from tests.test_spec_decode import _out

K = 4
CONFIG = SpeculativeConfig("ngram", K, 3, 1)


def _request(prompt: list[int]) -> Request:
    return Request("a", list(prompt), SamplingParams(max_tokens=10_000))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _copy_the_prompt(proposer: NgramProposer, req: Request, steps: int) -> list[int]:
    """`steps` decode steps of a 'model' that copies the prompt (tokens 10..59) in a loop,
    so the lookup's drafts are right; the draft length of each step."""
    lengths = []
    for _ in range(steps):
        drafts = proposer.propose(req, 64, 100_000)
        lengths.append(len(drafts))
        last = req.all_token_ids[-1]
        truth = [10 + (last - 10 + i) % 50 for i in range(1, len(drafts) + 2)]
        accepted = _common_prefix(drafts, truth)
        if drafts:
            proposer.observe(req, len(drafts), accepted)
        for t in truth[:accepted + 1]:
            req.append_token(t)
    return lengths


def test_rejected_drafts_stop_then_probe_with_backoff_and_come_back_when_right():
    """Prompt lookup over a real sequence: while the 'model' never follows the drafts their
    length falls to 0 within a few steps, then one-token probes come at doubling intervals;
    once it copies the prompt cyclically, the probes are accepted and drafts return to K."""
    rng = random.Random(0)
    prompt = list(range(10, 60))
    proposer, req = NgramProposer(CONFIG), _request(prompt + prompt[:1])
    lengths = []
    for _ in range(150):   # a model that never emits the lookup's first token, sent or not
        drafts = proposer.propose(req, 64, 100_000)
        lengths.append(len(drafts))
        lookup = req.ngram_index.propose(req.all_token_ids, 1)
        token = rng.choice([t for t in prompt if not lookup or t != lookup[0]])
        if drafts:
            proposer.observe(req, len(drafts), 0)
        req.append_token(token)
    assert lengths[0] == K                       # a new sequence drafts at once
    stop = lengths.index(0)
    assert stop <= 8 and lengths[:stop] == sorted(lengths[:stop], reverse=True)
    probes = [i for i in range(stop, len(lengths)) if lengths[i]]
    assert all(lengths[i] == 1 for i in probes)
    gaps = [b - a for a, b in zip([stop - 1] + probes, probes)]
    expected = [PROBE_FIRST]
    while len(expected) < len(gaps):
        expected.append(min(2 * expected[-1], PROBE_MAX))
    assert gaps == expected and gaps[-1] == PROBE_MAX   # 4, 8, 16, 32, 32, ...
    assert proposer.stats.num_accepted_tokens == 0
    # Now the model copies the prompt in a loop: the lookup's drafts become right.
    lengths = _copy_the_prompt(proposer, req, 150)
    assert lengths[-20:] == [K] * 20
    assert lengths.index(K) < PROBE_MAX + 8     # within one probe interval and a few steps


def test_the_draft_length_weighs_each_positions_acceptance_against_the_row_price():
    # All-or-nothing acceptance (a copy that is right 80% of the time): once the first draft
    # is right the rest are too, so the whole run pays even at a high row price.
    bursty = Acceptance(K)
    for i in range(40):
        bursty.observe(K, 0 if i % 5 == 4 else K)
    assert bursty.draft_length(K, 0.0) == K and bursty.draft_length(K, 0.6) == K
    assert bursty.draft_length(K, 0.9) == 0      # the first draft alone is below the price
    assert bursty.draft_length(2, 0.0) == 2      # never past the room given
    # The first draft always right, the second always wrong: exactly one pays.
    first_only = Acceptance(K)
    for _ in range(40):
        first_only.observe(K, 1)
    assert first_only.draft_length(K, 0.0) == 1 and first_only.draft_length(K, 0.5) == 1
    # A fresh sequence follows its prior: all K while rows are cheap, none when a row costs
    # about a whole output token (a compute-bound step).
    assert Acceptance(K).draft_length(K, 0.0) == K
    assert Acceptance(K).draft_length(K, 0.95) == 0


def test_the_step_cost_fit_and_the_row_price_it_sets():
    cost = StepCost()
    for i in range(StepCost.MIN_STEPS - 1):
        cost.observe(16 + 8 * (i % 9), 0.002 + 0.001 * (16 + 8 * (i % 9)))
    assert cost.row_cost(16, 16) == 0.0          # too few steps: drafts priced by acceptance
    for i in range(200):
        n = 16 + 8 * (i % 9)
        cost.observe(n, 0.002 + 0.001 * n)
    c0, c1 = cost.fit
    assert c0 == pytest.approx(0.002, rel=1e-6) and c1 == pytest.approx(0.001, rel=1e-6)
    # One more row of a 16-row decode step: 1 ms against 16 tokens per 18 ms.
    assert cost.row_cost(16, 16) == pytest.approx(16 / 18)
    assert cost.row_cost(1, 1) == pytest.approx(1 / 3)   # a lone decode: mostly fixed cost
    flat = StepCost()                            # no spread in the token counts: no slope
    for _ in range(50):
        flat.observe(16, 0.02)
    assert flat.fit is None and flat.row_cost(16, 16) == 0.0


def _decoding_core(num_requests: int, spec: SpeculativeConfig = CONFIG) -> EngineCore:
    core = EngineCore(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=64,
                                      max_model_len=128, speculative=spec))
    for i in range(num_requests):
        core.add_request(EngineRequest(f"r{i}", [1, 2, 3, 1, 2], SamplingParams(max_tokens=50)))
    plan = core.schedule()
    core.update(plan, _out(plan, {s.seq_id: [3] for s in plan.new}))   # 1 2 3 1 2 3
    return core


def test_the_measured_step_cost_prices_the_drafts_of_the_next_plans():
    # Only decode steps teach the fit: a prompt step's tokens cost differently.
    core = _decoding_core(1)
    cost = core.scheduler.proposer.cost
    core.add_request(EngineRequest("p", [5, 6, 7], SamplingParams(max_tokens=5)))
    plan = core.schedule()
    assert plan.new and plan.running
    core.step_time(plan, 0.5)
    assert cost.steps == 0
    core.update(plan, _out(plan, {"r0": [1], "p": [9]}))
    plan = core.schedule()
    assert not plan.new and any(r.draft_token_ids for r in plan.running)
    core.step_time(plan, 0.5)
    assert cost.steps == 1
    # Compute-bound steps (no fixed cost): a row costs a whole token, a fresh sequence's
    # drafts (prior 0.7) do not pay. Mostly fixed cost: they do.
    for fit, drafts in (((0.0, 0.01), 0), ((1.0, 0.0001), 3)):
        core = _decoding_core(2)
        core.scheduler.proposer.cost.fit = fit
        plan = core.schedule()
        assert [len(r.draft_token_ids) for r in plan.running] == [drafts, drafts]


def test_disable_by_batch_size_turns_drafts_off_for_large_batches():
    spec = SpeculativeConfig("ngram", K, 3, 1, disable_by_batch_size=2)
    assert [len(r.draft_token_ids) for r in _decoding_core(2, spec).schedule().running] == [0, 0]
    assert [len(r.draft_token_ids) for r in _decoding_core(1, spec).schedule().running] == [3]
    for bad in (1, 0, True, "8", 1.5, 1 << 21):
        with pytest.raises(ValueError, match="disable_by_batch_size"):
            SpeculativeConfig.parse({"method": "ngram", "disable_by_batch_size": bad})
    parsed = SpeculativeConfig.parse(str(spec))   # the flag's text round-trips (child argv)
    assert parsed == spec and SpeculativeConfig.parse(str(CONFIG)).disable_by_batch_size is None


# --- the real engine --------------------------------------------------------------------------

SPEC = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}


def test_through_the_engine_drafting_stops_on_a_sequence_whose_drafts_are_rejected(tiny_model):
    """The prompt holds every token once, so after any sampled token the lookup proposes the
    ones that followed it in the prompt, which a random model at temperature 1 almost never
    samples: the proposer soon stops (probes aside). Outputs equal the plain engine's."""
    from tessera.llm import LLM

    model = str(tiny_model("llama"))
    prompt = list(range(3, 500))
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=5, ignore_eos=True)
    plain = LLM(model, kv_cache_memory_gb=0.02, block_size=4)
    spec = LLM(model, kv_cache_memory_gb=0.02, block_size=4, speculative_config=SPEC)
    try:
        base = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        out = spec.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    finally:
        plain.close()
        spec.close()
    tokens = out[0].outputs[0].token_ids
    assert tokens == base[0].outputs[0].token_ids and len(tokens) == 80
    # How many of its decode steps had a match, i.e. would have drafted without adaptation.
    index, seq, matched = NgramIndex(1, 3), list(prompt), 0
    for t in tokens[:-1]:
        seq.append(t)
        matched += bool(index.propose(seq, K))
    stats = spec.engine.scheduler.proposer.stats
    assert matched >= 60
    # Fixed K would verify K drafts on each of those steps. Adapted: a few shrinking drafts,
    # probes, and short runs after a chance match of the (unsent) lookup: a small fraction,
    # mostly rejected.
    assert stats.num_draft_tokens <= matched * K // 4, stats
    assert stats.num_accepted_tokens <= max(2, stats.num_draft_tokens // 4), stats


def test_outputs_are_unchanged_when_the_adaptation_outlives_a_preemption(tiny_model):
    """Too few KV blocks for every sequence: some are preempted and recomputed, keeping their
    acceptance state (it only sets how many drafts are verified, never the tokens)."""
    from tessera.llm import LLM

    model = str(tiny_model("llama"))
    p = [11, 300, 42, 7, 99, 150, 3, 77]
    prompts = [p * 3, [5, 6, 7, 8, 9] * 3, list(range(20, 50)), [400, 401, 402] * 4 + p]
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=11)
    plain = LLM(model, num_kv_blocks=24, block_size=4)
    spec = LLM(model, num_kv_blocks=24, block_size=4, speculative_config=SPEC)
    try:
        base = plain.generate([{"prompt_token_ids": q} for q in prompts], params,
                              use_tqdm=False)
        out = spec.generate([{"prompt_token_ids": q} for q in prompts], params, use_tqdm=False)
        assert spec.engine.scheduler.num_preemptions > 0
        assert spec.engine.scheduler.proposer.stats.num_accepted_tokens > 0
    finally:
        plain.close()
        spec.close()
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in base]


def test_a_stopped_sequence_comes_back_on_unsent_lookups_before_its_next_probe():
    """Once drafting stopped, the lookup still runs (unsent) and is scored against the token
    the step sampled: when the model starts to follow it, drafting returns within a few
    steps, long before the probe interval (PROBE_MAX) would bring it back."""
    rng = random.Random(1)
    prompt = list(range(10, 60))
    proposer, req = NgramProposer(CONFIG), _request(prompt + prompt[:1])
    for _ in range(120):   # stop drafting, and let the probe interval grow to its cap
        drafts = proposer.propose(req, 64, 100_000)
        lookup = req.ngram_index.propose(req.all_token_ids, 1)
        if drafts:
            proposer.observe(req, len(drafts), 0)
        req.append_token(rng.choice([t for t in prompt if not lookup or t != lookup[0]]))
    assert req.spec_acceptance.probe_every == PROBE_MAX
    lengths = _copy_the_prompt(proposer, req, 12)   # the model now follows the lookup
    first = next(i for i, n in enumerate(lengths) if n)
    assert first <= 3 < PROBE_MAX, lengths
    assert lengths[-1] == K, lengths
