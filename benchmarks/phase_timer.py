"""Where an offline engine run's wall time goes: prefill linear, decode linear, LM head,
attention, norm/act/rope, sampling, scheduling, other.

Wraps (for the duration of a `with PhaseTimer(llm):` block, then restores) the linear-layer
function the model layers call, the LM head, the attention layer's forward, the norms, the
activation and rotary embedding, the worker's sampler and the engine core's schedule/update
with perf_counter timers. A step's layer-linear time is split between prefill and decode by
its share of prompt tokens vs decode tokens; a sequence counts as decoding when everything it
computes lies past its prompt (a one-token prompt chunk is still prefill, which the old
"one scheduled token = decode" rule got wrong). The LM head runs for the sampled rows only,
one per finishing sequence, so its time is its own phase rather than spread by token share
(which charged most of it to prefill steps). "other" is the rest of the wall time: embedding,
KV writes outside attention, runner bookkeeping, Python glue, output processing.
"""

from __future__ import annotations

import time

import worker.layers.linear as linear_mod
import worker.models.llama as llama_mod
from worker.layers.attention import Attention
from worker.layers.embed import ParallelLMHead
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding

PHASES = ("prefill linear", "decode linear", "lm head", "attention", "norm/act/rope",
          "sampling", "scheduling", "other")


class PhaseTimer:
    """Accumulates seconds per phase of an in-process `LLM` while active."""

    def __init__(self, llm) -> None:
        self.engine = llm.engine
        self.worker = llm.engine.executor.worker
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._step_linear = 0.0
        self._saved: list[tuple[object, str, object]] = []

    def _patch(self, owner, name: str, wrapper) -> None:
        # a method found on an instance's class is shadowed by an instance attribute, then
        # deleted again; anything else gets its own value back
        self._saved.append((owner, name, owner.__dict__.get(name, None)))
        setattr(owner, name, wrapper)

    def _timed(self, fn, phase: str | None):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                if phase is None:
                    self._step_linear += dt
                else:
                    self.seconds[phase] += dt
        return wrapper

    def _decode_tokens(self, plan) -> tuple[int, int]:
        """(prefill tokens, decode tokens) of a plan, read before the worker applies it."""
        prefill = decode = 0
        for s in plan.new:   # new (or recomputed) sequences: their whole chunk is prefill
            prefill += s.num_scheduled_tokens
        for s in plan.running:
            state = self.worker.states.get(s.seq_id)
            if state is not None and s.num_computed_tokens >= state.num_prompt_tokens:
                decode += s.num_scheduled_tokens
            else:
                prefill += s.num_scheduled_tokens
        return prefill, decode

    def __enter__(self) -> "PhaseTimer":
        self._patch(linear_mod, "linear", self._timed(linear_mod.linear, None))
        self._patch(ParallelLMHead, "forward", self._timed(ParallelLMHead.forward, "lm head"))
        self._patch(Attention, "forward", self._timed(Attention.forward, "attention"))
        self._patch(RMSNorm, "forward", self._timed(RMSNorm.forward, "norm/act/rope"))
        self._patch(RotaryEmbedding, "forward",
                    self._timed(RotaryEmbedding.forward, "norm/act/rope"))
        self._patch(llama_mod, "silu_and_mul", self._timed(llama_mod.silu_and_mul, "norm/act/rope"))
        core = self.engine.core   # schedule() and update(): the engine core's (scheduler.engine_core)
        self._patch(core, "schedule", self._timed(core.schedule, "scheduling"))
        self._patch(core, "update", self._timed(core.update, "scheduling"))
        sampler = self.worker.sampler
        timed_sampler = self._timed(sampler.__call__, "sampling")
        self._patch(self.worker, "sampler", type("TimedSampler", (), {
            "__call__": lambda _, *a, **k: timed_sampler(*a, **k),
            "__getattr__": lambda _, n: getattr(sampler, n)})())
        execute = self.engine.executor.execute

        def step(plan):
            self._step_linear = 0.0
            prefill, decode = self._decode_tokens(plan)   # before the worker consumes the plan
            try:
                return execute(plan)
            finally:
                total = prefill + decode or 1
                self.seconds["prefill linear"] += self._step_linear * prefill / total
                self.seconds["decode linear"] += self._step_linear * decode / total
        self._patch(self.engine.executor, "execute", step)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        for owner, name, original in reversed(self._saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self.seconds["other"] = wall - sum(v for k, v in self.seconds.items() if k != "other")
        self.wall = wall
