"""Scheduler narratives: exact plans, block ids, chunk progression and preemption, step by step,
through the engine core with n = 1 requests (a request id is its sequence id).

No model: a stand-in for the workers samples a fixed token for every sequence that reaches
the end of its known tokens, which is exactly the rule the real worker follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.request import RequestStatus
from scheduler.scheduler import SchedulerConfig

EOS = 99


@dataclass
class Ev:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None


def make(num_blocks=16, block_size=4, budget=8, max_seqs=8, max_len=256, caching=True):
    return EngineCore(SchedulerConfig(num_blocks=num_blocks, block_size=block_size,
                                      max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                      max_model_len=max_len, enable_prefix_caching=caching,
                                      hash_seed=0), eos_token_ids=(EOS,))


def req(rid, n_prompt, max_tokens=8, first=0, priority=0, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return EngineRequest(rid, list(range(first, first + n_prompt)), params, priority=priority)


def step(s: EngineCore, token=7):
    plan = s.schedule()
    out = StepOutput(plan.step_id)
    for seq in (*plan.new, *plan.running):
        r = s.scheduler.requests[seq.seq_id]
        if r.num_computed_tokens + seq.num_scheduled_tokens == r.num_tokens:
            out.sampled[seq.seq_id] = SampledToken(token)
    return plan, [Ev(r.request_id, ev.token_ids, ev.finish_reason) for r, ev in s.update(plan, out)]


def test_chunked_prefill_then_decode_exact_blocks():
    s = make(budget=8)
    s.add_request(req("A", 20))
    plan, events = step(s)
    assert [(n.seq_id, n.num_computed_tokens, n.num_scheduled_tokens, n.block_ids) for n in plan.new] \
        == [("A", 0, 8, [0, 1])]
    assert events == []
    plan, _ = step(s)
    assert [(r.num_computed_tokens, r.num_scheduled_tokens, r.new_block_ids) for r in plan.running] \
        == [(8, 8, [2, 3])]
    plan, events = step(s)   # last 4 prompt tokens fill block 4, then the first token is sampled
    assert [(r.num_computed_tokens, r.num_scheduled_tokens, r.new_block_ids) for r in plan.running] \
        == [(16, 4, [4])]
    assert [(e.request_id, e.new_token_ids) for e in events] == [("A", [7])]
    plan, _ = step(s)        # decode at position 20 opens block 5
    assert [(r.num_computed_tokens, r.num_scheduled_tokens, r.new_block_ids) for r in plan.running] \
        == [(20, 1, [5])]
    plan, _ = step(s)
    assert plan.running[0].new_block_ids == []


def test_running_first_then_waiting_by_priority_and_arrival():
    s = make(budget=10, max_seqs=3)
    s.add_request(req("low", 3, priority=5))
    s.add_request(req("high", 3, priority=0))
    s.add_request(req("high2", 3, priority=0))
    s.add_request(req("late", 3, priority=0))
    plan, _ = step(s)
    assert [n.seq_id for n in plan.new] == ["high", "high2", "late"]   # max_num_seqs = 3
    plan, _ = step(s)
    assert [r.seq_id for r in plan.running] == ["high", "high2", "late"] and plan.new == []
    assert s.num_waiting == 1


def test_budget_splits_a_new_prompt_after_running_decodes():
    s = make(budget=6)
    s.add_request(req("A", 3))
    step(s)
    s.add_request(req("B", 12))
    plan, _ = step(s)
    assert [(r.seq_id, r.num_scheduled_tokens) for r in plan.running] == [("A", 1)]
    assert [(n.seq_id, n.num_scheduled_tokens) for n in plan.new] == [("B", 5)]


def test_preemption_frees_the_latest_arrival_and_recomputes_it():
    s = make(num_blocks=4, block_size=4, budget=16)
    s.add_request(req("A", 7, max_tokens=20))
    s.add_request(req("B", 7, max_tokens=20, first=50))
    plan, _ = step(s)
    assert [(n.seq_id, n.block_ids) for n in plan.new] == [("A", [0, 1]), ("B", [2, 3])]
    plan, _ = step(s)       # both decode within their second block (positions 7)
    assert plan.preempted_ids == []
    plan, _ = step(s)       # position 8: A needs a third block, none free -> B is preempted
    assert plan.preempted_ids == ["B"] and plan.finished_ids == ["B"]
    assert [(r.seq_id, r.new_block_ids) for r in plan.running] == [("A", [3])]
    b = s.scheduler.requests["B"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]
    s.abort("A")
    plan, _ = step(s)       # B comes back in full: prompt + its 2 tokens, recomputed
    assert plan.finished_ids == ["A"]
    # B's blocks were freed tail first (3, then 2): A took block 3, so only B's first block
    # (tokens 0-3, still cached in block 2) is a prefix hit; the other 5 tokens are recomputed.
    new_b = plan.new[0]
    assert (new_b.seq_id, new_b.token_ids[-2:]) == ("B", [7, 7])
    assert (new_b.num_computed_tokens, new_b.num_scheduled_tokens, new_b.block_ids[0]) == (4, 5, 2)
    assert s.num_preemptions == 1


def test_prefix_hit_shares_blocks_and_counts():
    s = make(budget=32)
    s.add_request(req("A", 10, first=100))
    step(s)                            # A computes 10 tokens: blocks 0, 1 full and cached
    s.add_request(req("B", 11, first=100))
    plan, _ = step(s)
    new_b = plan.new[0]
    assert (new_b.num_computed_tokens, new_b.num_scheduled_tokens) == (8, 3)
    assert new_b.block_ids[:2] == s.kv.get_block_ids("A")[:2]
    assert s.kv.prefix_hits == 8
    assert s.scheduler.requests["B"].num_cached_tokens == 8


def test_abort_frees_at_once_and_tells_workers_next_step():
    s = make()
    s.add_request(req("A", 6))
    s.add_request(req("W", 6))
    step(s)                 # budget 8: A's whole prompt (2 blocks), W's first 2 tokens (1 block)
    assert s.kv.num_blocks_in_use == 3
    assert s.abort("A") and s.abort("W") and not s.abort("nope")
    assert s.kv.num_blocks_in_use == 0
    plan = s.schedule()
    assert sorted(plan.finished_ids) == ["A", "W"] and plan.num_sequences == 0


def test_stop_conditions():
    s = make(budget=64)
    s.add_request(req("eos", 3, max_tokens=5))
    s.add_request(req("ignore", 3, max_tokens=2, ignore_eos=True))
    s.add_request(req("stopid", 3, max_tokens=5, stop_token_ids=[EOS]))
    _, events = step(s, token=EOS)
    reasons = {e.request_id: e.finish_reason for e in events}
    assert reasons == {"eos": "stop", "ignore": None, "stopid": "stop"}
    _, events = step(s, token=EOS)
    assert [(e.request_id, e.finish_reason) for e in events] == [("ignore", "length")]
    assert not s.has_unfinished and s.kv.num_blocks_in_use == 0


def test_min_tokens_defers_eos():
    s = make(budget=64)
    s.add_request(req("m", 3, max_tokens=5, min_tokens=2))
    _, events = step(s, token=EOS)     # the sampler bans EOS below min_tokens; if it came anyway
    assert events[0].finish_reason is None   # the request is not cut short
    _, events = step(s, token=EOS)
    assert events[0].finish_reason == "stop"


def _sample_all(s: EngineCore, plan, token: int) -> StepOutput:
    out = StepOutput(plan.step_id)
    for seq in (*plan.new, *plan.running):
        r = s.scheduler.requests[seq.seq_id]
        if r.num_computed_tokens + seq.num_scheduled_tokens == r.num_tokens:
            out.sampled[seq.seq_id] = SampledToken(token)
    return out


def test_pipelined_steps_hold_disjoint_requests_and_carry_sampled_tokens():
    s = make(num_blocks=16, block_size=4, budget=8)
    for i, rid in enumerate("ABCD"):
        s.add_request(req(rid, 4, first=10 * i))
    p1 = s.schedule()
    s.mark_in_flight(p1)
    p2 = s.schedule()
    s.mark_in_flight(p2)
    assert [n.seq_id for n in p1.new] == ["A", "B"] and [n.seq_id for n in p2.new] == ["C", "D"]
    p3 = s.schedule()          # everything is in flight: no step, and no step id spent
    assert p3.num_sequences == 0
    s.update(p1, _sample_all(s, p1, 5))
    p3 = s.schedule()
    assert p3.step_id == 3 and [r.seq_id for r in p3.running] == ["A", "B"]
    assert [r.new_token_ids for r in p3.running] == [[5], [5]]   # the token the last stage sampled
    s.mark_in_flight(p3)
    s.update(p2, _sample_all(s, p2, 6))
    p4 = s.schedule()
    assert [r.seq_id for r in p4.running] == ["C", "D"]
    assert [r.new_token_ids for r in p4.running] == [[6], [6]]


def test_an_in_flight_request_is_never_preempted():
    s = make(num_blocks=4, block_size=4, budget=16)
    s.add_request(req("A", 7, max_tokens=20))
    s.add_request(req("B", 7, max_tokens=20, first=50))
    for _ in range(2):
        step(s)                # both at 8 tokens, each holding 2 of the 4 blocks
    # Without pipelining A's next block would come from preempting B (the newest); with
    # B's step still in the pipeline, A waits instead of evicting it.
    s.scheduler.in_flight.add("B")
    plan = s.schedule()
    assert plan.preempted_ids == [] and plan.num_sequences == 0
    assert s.scheduler.requests["B"].status == RequestStatus.RUNNING
    s.scheduler.in_flight.clear()
    plan = s.schedule()
    assert plan.preempted_ids == ["B"]
