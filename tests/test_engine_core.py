"""The engine core's per-request events, exactly, through n > 1, a stop id, an abort mid-prefill
and a preemption; then the same script through the offline `LLM` and through the scheduler
service (real Redis, real worker and scheduler processes) gives the same events.

The scripted executor stands in for the workers: every sequence that reaches the end of its
known tokens this step samples the next token of its script (the rule the real worker follows),
so the events below follow from the scheduler's rules alone.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from common.redis_schema import OutputEvent
from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput, StepPlan
from scheduler.engine_core import EngineCore, EngineRequest, sequence_id
from scheduler.scheduler import SchedulerConfig

BLOCK, NUM_BLOCKS, BUDGET = 4, 6, 16
STOP = 77
PROMPTS = {"a": list(range(1, 7)), "b": list(range(20, 25)), "c": list(range(40, 70)),
           "d": list(range(80, 84))}


def scenario_params(stop_id: int = STOP) -> dict[str, SamplingParams]:
    return {
        "a": SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True),
        "b": SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id],
                            ignore_eos=True),
        "c": SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        "d": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
    }


class ScriptedExecutor:
    """Sequence k of request r samples SCRIPT[r][k][i] as its i-th token (then 5, 6, ...)."""

    SCRIPT = {"a": [[10, 11, 12], [13, 14, 15]], "b": [[30, 31, STOP]]}

    def __init__(self, core: EngineCore) -> None:
        self.seqs = core.scheduler.requests
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        out = StepOutput(plan.step_id)
        for s in (*plan.new, *plan.running):
            seq = self.seqs[s.seq_id]
            if seq.num_computed_tokens + s.num_scheduled_tokens == seq.num_tokens:
                i = len(seq.output_token_ids)
                script = self.SCRIPT.get(seq.owner.request_id, [[]] * 2)[seq.seed_offset]
                out.sampled[s.seq_id] = SampledToken(script[i] if i < len(script) else 5 + i)
        return out


def drive(step, add, abort, rids: str = "abcd") -> dict[str, list[OutputEvent]]:
    """The script: a, b, c, d arrive together; c is aborted after the first step (mid-prefill:
    its 30 tokens take several 16-token steps); run to the end. ``step()`` returns one step's
    (request id, event) pairs."""
    params = scenario_params()
    for rid in rids:
        add(rid, PROMPTS[rid], params[rid])
    events: dict[str, list[OutputEvent]] = {rid: [] for rid in rids}
    first = "c" in rids
    while True:
        got = step()
        if got is None:
            break
        for rid, ev in got:
            events[rid].append(ev)
        if first:
            first = False
            events["c"].append(abort("c"))
    return events


def shape(events: list[OutputEvent]) -> list[tuple]:
    return [(e.index, e.seq_index, len(e.token_ids), e.finish_reason, e.final) for e in events]


def run_core(rids: str = "abcd", num_blocks: int = NUM_BLOCKS
             ) -> tuple[EngineCore, ScriptedExecutor, dict[str, list[OutputEvent]]]:
    core = EngineCore(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK,
                                      max_num_batched_tokens=BUDGET, max_model_len=256))
    ex = ScriptedExecutor(core)

    def step():
        plan = core.schedule()
        if plan.num_sequences == 0:
            return None
        return [(r.request_id, ev) for r, ev in core.update(plan, ex.execute(plan))]

    events = drive(step, lambda rid, p, sp: core.add_request(EngineRequest(rid, p, sp)),
                   core.abort, rids)
    return core, ex, events


def E(index, tokens, seq=0, reason=None, final=False):
    return OutputEvent(index, tokens, seq, reason, final)


def test_core_events_exactly():
    core, ex, events = run_core()
    # Step 1: a's first sequence, b, and c's first 5 prompt tokens fill the 16-token budget.
    # Step 2: c is gone; d arrives; a's second sequence joins after the first one's token,
    # hitting its cached prompt block (4 of 6 tokens). New sequences come first in a plan.
    # Step 3: the 6 blocks run out: a's second sequence (the latest arrival) is preempted...
    # Step 4: ...and recomputed from its prompt and its token 13, then goes on.
    assert events["a"] == [
        E(0, [10]), E(1, [13], 1), E(2, [11]), E(3, [12], 0, "length"), E(4, [14], 1),
        E(5, [15], 1, "length", True)]
    assert events["b"] == [E(0, [30]), E(1, [31]), E(2, [STOP], 0, "stop", True)]
    assert events["c"] == [E(0, [], 0, "abort", True)]   # aborted mid-prefill: nothing came out
    assert events["d"] == [E(i, [5 + i]) for i in range(13)] + [E(13, [18], 0, "length", True)]
    a1 = sequence_id("a", 1, 2)
    assert [(p.step_id, p.preempted_ids) for p in ex.plans if p.preempted_ids] == [(3, [a1])]
    assert [(s.num_computed_tokens, s.num_scheduled_tokens, s.token_ids[-1])
            for p in ex.plans for s in p.new if s.seq_id == a1] == [(4, 2, 6), (4, 3, 13)]
    assert [s.num_scheduled_tokens for p in ex.plans for s in p.new if s.seq_id == "c"] == [5]
    assert ex.plans[1].finished_ids == ["c"]   # the workers forget it at the next step
    assert core.num_preemptions == 1 and core.requests == {} and not core.has_unfinished
    assert core.kv.num_blocks_in_use == 0


# ---- the same script through the offline LLM and through the service ------------------------
BLOCK_BYTES = 2048   # a block of 4 tokens of the tiny llama


def kv_bytes(num_blocks: int) -> int:
    return int((num_blocks + 0.5) * BLOCK_BYTES)


def _stop_id(model_dir: str) -> int:
    """b's third greedy token: b then stops where the scripted b stops."""
    from tessera import LLM

    free = LLM(model_dir, block_size=BLOCK, num_kv_blocks=64).generate(
        {"prompt_token_ids": PROMPTS["b"]},
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    assert ids[2] not in ids[:2]
    return ids[2]


def run_llm(model_dir: str, rids: str, stop_id: int, num_blocks: int = NUM_BLOCKS):
    from tessera import LLM

    llm = LLM(model_dir, block_size=BLOCK, kv_cache_memory_gb=kv_bytes(num_blocks) / 2**30,
              max_num_batched_tokens=BUDGET)
    engine = llm.engine
    # sized by the worker's own warm-up, from the byte budget
    assert engine.scheduler.config.num_blocks == num_blocks
    params = scenario_params(stop_id)
    for rid in rids:
        engine.add_request(rid, PROMPTS[rid], params[rid])
    events: dict[str, list[OutputEvent]] = {rid: [] for rid in rids}
    first = True
    while engine.has_unfinished():
        for req, ev in engine.step_events():
            events[req.request_id].append(ev)
        if first and "c" in rids:
            first = False
            events["c"].append(engine.abort("c"))
    return engine, events


def test_llm_gives_the_scripted_events(tiny_model):
    model_dir = str(tiny_model("llama"))
    _, _, scripted = run_core()
    engine, events = run_llm(model_dir, "abcd", _stop_id(model_dir))
    assert {rid: shape(evs) for rid, evs in events.items()} == \
        {rid: shape(evs) for rid, evs in scripted.items()}
    assert engine.scheduler.num_preemptions == 1 and engine.scheduler.kv.num_blocks_in_use == 0



def test_the_service_gives_the_llm_events(tiny_model, redis_url):
    """a (n = 2), b (stop id) and d, with a preemption, through worker and scheduler processes
    and Redis: every event equals the offline engine's. The requests are queued before the
    scheduler starts, so its first intake reads them all at once, as the LLM takes them.

    NOTE: an abort mid-prefill cannot be timed from outside the service (a cancel reaches the
    scheduler between some two steps), so c is cancelled while queued here; its one event is
    the same final abort event the core and the LLM give for c aborted mid-prefill."""
    import redis.asyncio as aioredis

    from cli_procs import start_cli
    from common.redis_schema import QueuedRequest
    from gateway.queue import RequestSubmitter
    from tessera.procs import free_port

    model_dir = str(tiny_model("llama"))
    stop_id = _stop_id(model_dir)
    # Without c, 5 blocks make the preemption (of d, at step 2).
    engine, expected = run_llm(model_dir, "abd", stop_id, num_blocks=5)
    _, _, scripted = run_core("abd", num_blocks=5)
    assert {rid: shape(evs) for rid, evs in expected.items()} == \
        {rid: shape(evs) for rid, evs in scripted.items()}
    assert engine.scheduler.num_preemptions == 1

    name, port = f"core-{uuid.uuid4().hex[:8]}", free_port()
    worker = start_cli(["worker", "--model", model_dir, "--port", str(port),
                        "--block-size", str(BLOCK), "--kv-cache-memory-gb", repr(kv_bytes(5) / 2**30),
                        "--redis-url", redis_url, "--served-model-name", name,
                        "--worker-id", "w0", "--metrics-port", "0"], "worker ready")
    procs = [worker]
    params = scenario_params(stop_id)
    ids = {rid: f"{rid}-{uuid.uuid4().hex}" for rid in "abcd"}

    async def submit(client):
        sub = RequestSubmitter(client)
        for rid in "abcd":
            await sub.submit(QueuedRequest(ids[rid], name, PROMPTS[rid], params[rid]))
        await sub.cancel(ids["c"])
        return sub

    async def collect(sub):
        async def one(rid):
            return [ev async for ev in sub.events(ids[rid], block_ms=200)]
        got = await asyncio.wait_for(asyncio.gather(*(one(r) for r in "abcd")), 120)
        return dict(zip("abcd", got))

    async def main():
        client = aioredis.from_url(redis_url)
        try:
            sub = await submit(client)
            procs.append(start_cli([
                "scheduler", "--model", model_dir, "--workers", f"127.0.0.1:{port}",
                "--redis-url", redis_url, "--served-model-name", name,
                "--block-size", str(BLOCK), "--max-num-batched-tokens", str(BUDGET),
                "--metrics-port", "0"], "scheduler ready"))
            return await collect(sub)
        finally:
            await client.aclose()

    try:
        served = asyncio.run(main())
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
    assert {rid: served[rid] for rid in "abd"} == expected
    assert served["c"] == run_core()[2]["c"] == [E(0, [], 0, "abort", True)]


# ---- the recovery hooks (DESIGN.md §4) -------------------------------------------------------
def _core(num_blocks: int = 16) -> tuple[EngineCore, ScriptedExecutor]:
    core = EngineCore(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK,
                                      max_num_batched_tokens=BUDGET, max_model_len=256))
    return core, ScriptedExecutor(core)


def _step(core: EngineCore, ex: ScriptedExecutor):
    plan = core.schedule()
    return plan, [ev for _, ev in core.update(plan, ex.execute(plan))]


def test_a_resumed_request_recomputes_its_emitted_tokens_and_continues_the_indices():
    core, ex = _core()
    a0, a1 = sequence_id("a", 0, 2), sequence_id("a", 1, 2)
    # a standby took a over after 4 events: sequence 0 had emitted 10, 11, sequence 1 13
    core.add_request(EngineRequest("a", PROMPTS["a"], scenario_params()["a"],
                                   emitted=[[10, 11], [13]], next_index=4))
    plan, events = _step(core, ex)
    assert [(s.seq_id, s.token_ids[6:], s.num_scheduled_tokens) for s in plan.new] == \
        [(a0, [10, 11], 8), (a1, [13], 7)]
    assert events == [E(4, [12], 0, "length"), E(5, [14], 1)]
    _, events = _step(core, ex)
    assert events == [E(6, [15], 1, "length", True)] and not core.has_unfinished
    # resumed with every sequence done already: nothing to run
    done = EngineRequest("x", PROMPTS["a"], scenario_params()["a"],
                         emitted=[[1, 2, 3], [4, 5, 6]], next_index=6)
    with pytest.raises(ValueError, match="finished already"):
        core.add_request(done)
    assert core.requests == {}


def test_requeue_running_recomputes_everything_and_events_go_on():
    core, ex = _core()
    core.add_request(EngineRequest("d", PROMPTS["d"], scenario_params()["d"]))
    _, events = _step(core, ex)
    assert events == [E(0, [5])]
    core.requeue_running()   # the workers lost their state
    plan, events = _step(core, ex)
    # sent again in full (prompt + its token), the full prompt block a prefix-cache hit
    assert [(s.seq_id, s.token_ids, s.num_computed_tokens, s.num_scheduled_tokens)
            for s in plan.new] == [("d", PROMPTS["d"] + [5], 4, 1)]
    assert plan.step_id == 1 and events == [E(1, [6])]
    assert core.num_preemptions == 1
