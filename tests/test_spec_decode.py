"""n-gram speculative decoding without a model: the setting (parsed and checked once, reaching
every process), the proposer's prompt lookup, and scheduler narratives (drafts in the token
budget, KV slots for them, the rollback of rejected ones, prefix-cache hashes of verified
tokens only, never a preemption for a guess)."""

from __future__ import annotations

import argparse
import logging
import random

import pytest

from common import settings
from common.config import (EngineConfig, SchedulerServiceConfig, ServeConfig,
                           SpeculativeConfig)
from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.scheduler import SchedulerConfig
from scheduler.spec_decode import NgramIndex

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}


# --- the setting ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ('["ngram"]', "must be a JSON object"),
    ('{"num_speculative_tokens": 2}', 'needs a "method"'),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be 'ngram'"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be"),
    ('{"method": "ngram", "num_speculative_tokens": 33}', "num_speculative_tokens must be"),
    ('{"method": "ngram", "num_speculative_tokens": "4"}', "num_speculative_tokens must be"),
    ('{"method": "ngram", "prompt_lookup_max": 0}', "prompt_lookup_max must be"),
    ('{"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "exceeds"),
    ('{"method": "ngram", "num_speculative_token": 4}', "unknown key(s) num_speculative_token"),
])
def test_a_bad_speculative_config_stops_the_command_line_with_its_reason(text, message, capsys):
    for cls in (ServeConfig, SchedulerServiceConfig, EngineConfig):
        parser = argparse.ArgumentParser(prog="tessera")
        settings.add_arguments(parser, cls)
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--workers", "w", "--speculative-config", text]
                              if cls is SchedulerServiceConfig else
                              ["--model", "m", "--speculative-config", text])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="speculative-config"):
        EngineConfig(model="m", speculative_config=text)


def test_the_setting_reaches_the_scheduler_process_and_the_offline_engine():
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, ServeConfig)
    serve = settings.from_args(ServeConfig, parser.parse_args(
        ["--model", "m", "--speculative-config",
         '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 6}']))
    assert serve.speculative_config == SpeculativeConfig("ngram", 5, 6, 2)
    child = settings.pick(SchedulerServiceConfig, serve, workers=("w:1",))
    argv = settings.to_argv(child, SchedulerServiceConfig)
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, SchedulerServiceConfig)
    back = settings.from_args(SchedulerServiceConfig, parser.parse_args(argv))
    assert back.speculative_config == serve.speculative_config
    assert SchedulerConfig.from_settings(back, 8, 64).speculative == serve.speculative_config
    # LLM(speculative_config={...}) takes the dict and checks it as the flag does.
    engine = EngineConfig(model="m", speculative_config=SPEC)
    assert engine.speculative_config == SpeculativeConfig("ngram", 3, 3, 1)
    assert EngineConfig(model="m").speculative_config is None


def test_pipeline_parallelism_falls_back_to_plain_decoding_with_a_log_line(caplog):
    config = EngineConfig(model="m", pipeline_parallel_size=2, speculative_config=SPEC)
    with caplog.at_level(logging.WARNING):
        assert SchedulerConfig.from_settings(config, 8, 64).speculative is None
    assert "speculative decoding is off: pipeline parallelism" in caplog.text


# --- the proposer -----------------------------------------------------------------------------

def _naive(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The definition: the longest suffix n-gram (hi..lo) found earlier, latest occurrence."""
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        for e in range(len(tokens) - 1, n - 1, -1):
            if tokens[e - n:e] == suffix:
                return tokens[e:e + k]
    return []


def test_prompt_lookup_proposes_what_followed_the_longest_latest_match():
    index = NgramIndex(1, 3)
    # ... 7 8 9 | 1 2 ... 7 8 9 | 4 5 ... 7 8 9: the latest "7 8 9" is followed by 4 5 6.
    tokens = [7, 8, 9, 1, 2, 3, 0, 7, 8, 9, 4, 5, 6, 0, 7, 8, 9]
    assert index.propose(tokens, 4) == [4, 5, 6, 0]
    tokens += [4, 5]
    assert index.propose(tokens, 2) == [6, 0]        # "7 8 9 4 5" -> 3-gram "9 4 5"
    assert NgramIndex(2, 3).propose([1, 2, 3, 4], 3) == []   # no repeat: no draft
    assert NgramIndex(1, 1).propose([5, 5], 3) == [5]        # the match may run into the end


def test_the_incremental_index_equals_a_full_rescan_at_every_step():
    rng = random.Random(0)
    for lo, hi in ((1, 1), (1, 3), (2, 4), (3, 3)):
        index, tokens = NgramIndex(lo, hi), [rng.randrange(6) for _ in range(5)]
        for _ in range(150):
            assert index.propose(tokens, 4) == _naive(tokens, lo, hi, 4)
            tokens += [rng.randrange(6) for _ in range(rng.choice((1, 1, 2, 4)))]


# --- scheduler narratives ---------------------------------------------------------------------

def _core(num_blocks: int = 16, budget: int = 64, spec: dict | None = SPEC) -> EngineCore:
    return EngineCore(SchedulerConfig(
        num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_model_len=64,
        speculative=SpeculativeConfig.parse(spec)))


def _out(plan, tokens: dict[str, list[int]]) -> StepOutput:
    out = StepOutput(plan.step_id)
    for seq_id, ids in tokens.items():
        out.sampled[seq_id] = SampledToken(ids[0])
        if ids[1:]:
            out.extra_sampled[seq_id] = [SampledToken(t) for t in ids[1:]]
    return out


def test_drafts_are_scheduled_verified_and_the_rejected_ones_rolled_back():
    core = _core()
    core.add_request(EngineRequest("a", [1, 2, 3, 1, 2], SamplingParams(max_tokens=20)))
    plan = core.schedule()                        # the prompt: no drafts before a first token
    assert [s.num_scheduled_tokens for s in plan.new] == [5]
    core.update(plan, _out(plan, {"a": [3]}))    # tokens 1 2 3 1 2 3
    seq = core.scheduler.requests["a"]
    plan = core.schedule()
    (row,) = plan.running
    # Suffix "1 2 3" matched at the start: the drafts are what followed it, counted in the budget.
    assert row.draft_token_ids == [1, 2, 3]
    assert row.num_scheduled_tokens == 4 and row.num_computed_tokens == 5
    assert row.new_token_ids == [3] and row.new_block_ids == [core.kv.get_block_ids("a")[2]]
    assert seq.num_slots == 12                   # blocks for position 5 + 3 drafts (9 tokens)
    # The workers accepted "1" and rejected "2": they emitted 1 and then their own 7.
    events = core.update(plan, _out(plan, {"a": [1, 7]}))
    assert [ev.token_ids for _, ev in events] == [[1, 7]]
    assert seq.all_token_ids == [1, 2, 3, 1, 2, 3, 1, 7]
    assert seq.num_computed_tokens == 7          # 5 + the certain token + 1 accepted draft
    # Only verified tokens are hashed: block 0 = 1 2 3 1 (full and computed), block 1 = 2 3 1 7
    # is not full of computed tokens yet, so it is not cached.
    blocks = core.kv._reqs["a"]
    assert [key[1] for key in blocks.keys] == [(1, 2, 3, 1)]
    stats = core.scheduler.proposer.stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 1)
    plan = core.schedule()
    (row,) = plan.running
    assert row.num_computed_tokens == 7 and row.new_token_ids == [1, 7]
    assert row.new_block_ids == []               # the block taken for the drafts is still there
    core.update(plan, _out(plan, {"a": [2] + [3, 1][:len(row.draft_token_ids)]}))
    assert [key[1] for key in core.kv._reqs["a"].keys] == [(1, 2, 3, 1), (2, 3, 1, 7)]


def test_a_stop_token_inside_an_accepted_run_ends_the_sequence_there():
    core = _core()
    core.add_request(EngineRequest("a", [4, 5, 6, 4, 5], SamplingParams(max_tokens=20,
                                                                        stop_token_ids=(5,))))
    plan = core.schedule()
    core.update(plan, _out(plan, {"a": [6]}))
    plan = core.schedule()
    assert plan.running[0].draft_token_ids == [4, 5, 6]
    (_, ev), = core.update(plan, _out(plan, {"a": [4, 5, 6]}))   # 5 is a stop token
    assert ev.token_ids == [4, 5] and ev.finish_reason == "stop" and ev.final
    assert core.kv.num_blocks_in_use == 0 and not core.has_unfinished


def _first_decode(core: EngineCore, prompt: list[int], params: SamplingParams):
    core.add_request(EngineRequest("a", prompt, params))
    while True:   # the prompt, in chunks of the budget
        plan = core.schedule()
        s = plan.new[0] if plan.new else plan.running[0]
        done = s.num_computed_tokens + s.num_scheduled_tokens == len(prompt)
        core.update(plan, _out(plan, {"a": [prompt[-2]]} if done else {}))
        if done:
            return core.schedule().running[0]


def test_drafts_never_exceed_the_budget_max_tokens_or_the_context():
    repeat = [1, 2] * 40                  # every suffix matches: K drafts unless capped
    row = _first_decode(_core(budget=3), repeat[:9], SamplingParams(max_tokens=30))
    assert len(row.draft_token_ids) == 2 and row.num_scheduled_tokens == 3   # the budget
    row = _first_decode(_core(), repeat[:9], SamplingParams(max_tokens=3))
    assert len(row.draft_token_ids) == 1   # 1 token out, 2 to go: 1 draft + the sampled one
    row = _first_decode(_core(), repeat[:61], SamplingParams(max_tokens=30))
    assert len(row.draft_token_ids) == 1   # 62 tokens of max_model_len 64


def _samples(core: EngineCore, plan) -> dict[str, list[int]]:
    """A token for every row that reaches the end of its known tokens (drafts aside)."""
    seqs = core.scheduler.requests
    return {s.seq_id: [2] for s in (*plan.new, *plan.running)
            if s.num_computed_tokens + s.num_scheduled_tokens
            - len(getattr(s, "draft_token_ids", ())) == seqs[s.seq_id].num_tokens}


def test_drafts_take_only_the_budget_that_decodes_and_prefills_leave():
    core = _core(budget=4)
    for rid in ("a", "b"):
        core.add_request(EngineRequest(rid, [1, 2, 1], SamplingParams(max_tokens=30)))
    for _ in range(2):   # a's prompt and 1 of b's, then b's last 2
        plan = core.schedule()
        core.update(plan, _out(plan, _samples(core, plan)))
    core.add_request(EngineRequest("c", [7, 8, 9], SamplingParams(max_tokens=30)))
    plan = core.schedule()
    # a and b decode (2 tokens), c's prompt takes the other 2: nothing left for drafts.
    assert [(r.seq_id, r.draft_token_ids) for r in plan.running] == [("a", []), ("b", [])]
    assert [(s.seq_id, s.num_scheduled_tokens) for s in plan.new] == [("c", 2)]
    core.update(plan, _out(plan, _samples(core, plan)))
    plan = core.schedule()
    # c's last prompt token and two decodes: the one token left is a's draft.
    assert [len(r.draft_token_ids) for r in plan.running] == [1, 0, 0]
    assert plan.total_tokens == 4


def test_no_room_for_the_drafts_means_a_plain_decode_never_a_preemption():
    core = _core(num_blocks=3)        # 12 slots: a (8 tokens) and b (3) fill 3 blocks
    core.add_request(EngineRequest("a", [1, 2, 3, 1, 2, 3, 1], SamplingParams(max_tokens=9)))
    core.add_request(EngineRequest("b", [9, 8], SamplingParams(max_tokens=9)))
    plan = core.schedule()
    core.update(plan, _out(plan, {"a": [2], "b": [7]}))
    plan = core.schedule()
    rows = {r.seq_id: r for r in plan.running}
    # a's drafts (3 1 2 ...) would need a fourth block: it decodes one token instead.
    assert rows["a"].draft_token_ids == [] and rows["a"].num_scheduled_tokens == 1
    assert plan.preempted_ids == [] and core.num_preemptions == 0


def test_speculation_off_plans_exactly_as_before():
    for spec in (None, SPEC):
        core = _core(spec=spec)
        core.add_request(EngineRequest("a", [1, 2, 3, 4], SamplingParams(max_tokens=5)))
        plan = core.schedule()
        core.update(plan, _out(plan, {"a": [9]}))
        plan = core.schedule()
        assert plan.running[0].draft_token_ids == []   # nothing repeats: nothing to draft
        assert plan.running[0].num_scheduled_tokens == 1
