"""A structured sequence whose grammar still compiles at its first sampling holds up no other:
the worker leaves it unsampled (StepOutput.deferred), the scheduler runs its last known token
again, and once the compile lands it samples what it would have without the wait. Real
xgrammar, the tiny model, the engine core driving a worker in this process; the compile is
made slow by keeping the worker's own grammar thread busy until the test lets it go."""

from __future__ import annotations

import threading
import time

import pytest

from common.convert import (step_output_from_proto, step_output_to_proto, step_plan_from_proto,
                            step_plan_to_proto)
from common.model_config import ModelConfig
from common.sampling_params import SamplingParams
from common.step import StepOutput
from common.structured_outputs import StructuredOutputs
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.scheduler import SchedulerConfig
from tessera.engine import LocalExecutor
from worker.runner import ModelRunner
from worker.worker import Worker

CHOICES = ("alpha", "beta gamma", "delta")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
CHOICE = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1,
                        structured_outputs=StructuredOutputs(choice=CHOICES))
PROMPT_A = list(range(40, 75))
PROMPT_B = list(range(90, 110))


def _engine(model_dir: str) -> tuple[EngineCore, LocalExecutor, Worker]:
    runner = ModelRunner(ModelConfig.from_dir(model_dir), "float32", 0, 16)
    worker = Worker(runner, model_dir=model_dir)
    worker.grammars.prewarm().result(timeout=120)   # only the spec's own compile is left
    executor = LocalExecutor(worker, max_num_blocks=48)
    blocks = executor.warmup(64, 8)
    core = EngineCore(SchedulerConfig(num_blocks=blocks, block_size=16,
                                      max_num_batched_tokens=64, max_model_len=512))
    return core, executor, worker


def _follower(model_dir: str) -> Worker:
    """A rank that does not sample (a tensor-parallel peer or an earlier pipeline stage): it
    applies every plan, runs the forward and returns nothing, as serve's other ranks do."""
    runner = ModelRunner(ModelConfig.from_dir(model_dir), "float32", 0, 16)
    follower = Worker(runner, is_driver=False, model_dir=model_dir)
    LocalExecutor(follower, max_num_blocks=48).warmup(64, 8)
    return follower


def _run(model_dir: str, hold_until_a_has: int | None, follower: Worker | None = None) -> dict:
    core, executor, worker = _engine(model_dir)
    gate = threading.Event()
    if hold_until_a_has is not None:
        worker.grammars._pool.submit(gate.wait)   # b's compile queues behind this
        fallback = threading.Timer(20, gate.set)   # a worker that waits fails, not hangs
        fallback.daemon = True
        fallback.start()
    else:
        gate.set()
    core.add_request(EngineRequest("a", PROMPT_A, GREEDY))
    core.add_request(EngineRequest("b", PROMPT_B, CHOICE))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    prompt_lps: list = []
    deferred_steps, b_at_release = 0, None
    while core.has_unfinished:
        plan = core.schedule()
        wire = step_plan_to_proto(plan)   # what every rank is sent
        out = executor.execute(plan)
        if follower is not None:   # raises StepMismatchError if the plan disagrees with it
            assert follower.execute(step_plan_from_proto(wire)).sampled == {}
            for seq_id, st in follower.states.items():
                ours = worker.states[seq_id]
                assert (st.token_ids, st.num_computed_tokens) == \
                    (ours.token_ids, ours.num_computed_tokens)
        deferred_steps += "b" in out.deferred
        for req, ev in core.update(plan, out):
            tokens[req.request_id] += ev.token_ids
            if req.request_id == "b" and ev.prompt_logprobs:
                prompt_lps += ev.prompt_logprobs
        if not gate.is_set() and len(tokens["a"]) >= hold_until_a_has:
            b_at_release = len(tokens["b"])
            gate.set()
    assert core.kv.num_blocks_in_use == 0
    return {"tokens": tokens, "deferred_steps": deferred_steps, "b_at_release": b_at_release,
            "prompt_logprobs": prompt_lps}


def test_a_compiling_grammar_defers_its_sequence_and_no_other(tiny_model) -> None:
    model_dir = str(tiny_model("llama"))
    free = _run(model_dir, None)
    held = _run(model_dir, 6)
    assert free["deferred_steps"] == 0
    # While b's grammar could not compile, a went on (6 tokens) and b was never sampled.
    assert held["b_at_release"] == 0 and held["deferred_steps"] >= 6
    # Then b sampled exactly what it samples without the wait, a likewise; b's prompt
    # logprobs came once per position.
    assert held["tokens"] == free["tokens"]
    assert held["prompt_logprobs"] == free["prompt_logprobs"]
    assert len(free["prompt_logprobs"]) == len(PROMPT_B) - 1
    from common.tokenizer import Tokenizer

    text = Tokenizer.from_dir(model_dir).decode(free["tokens"]["b"])
    assert text in CHOICES


def test_a_rank_that_does_not_sample_follows_the_deferral(tiny_model) -> None:
    # Only the driver rank holds grammars and defers; the other ranks learn of it from the
    # next plan (the sequence's count one behind theirs) and must keep the driver's state.
    model_dir = str(tiny_model("llama"))
    free = _run(model_dir, None)
    held = _run(model_dir, 6, follower=_follower(model_dir))
    assert held["deferred_steps"] >= 6
    assert held["tokens"] == free["tokens"]


def test_a_step_of_only_compiling_sequences_waits_for_the_compile(tiny_model) -> None:
    core, executor, worker = _engine(str(tiny_model("llama")))
    gate = threading.Event()
    worker.grammars._pool.submit(gate.wait)
    core.add_request(EngineRequest("b", PROMPT_B, CHOICE))
    plan = core.schedule()
    threading.Timer(0.3, gate.set).start()
    t = time.monotonic()
    out = executor.execute(plan)
    assert time.monotonic() - t >= 0.25   # it waited for the grammar thread...
    assert out.deferred == [] and "b" in out.sampled   # ...and sampled: nothing to repeat


@pytest.mark.parametrize("deferred", [[], ["s1", "s2"]])
def test_deferred_crosses_the_wire(deferred: list[str]) -> None:
    out = StepOutput(7, deferred=deferred)
    assert step_output_from_proto(step_output_to_proto(out)).deferred == deferred
