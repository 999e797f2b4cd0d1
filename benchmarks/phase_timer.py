"""Where an offline engine run's wall time goes: prefill linear, decode linear, attention,
sampling, scheduling, other.

Wraps (for the duration of a `with PhaseTimer(llm):` block, then restores) the linear-layer
function the model layers call, the attention layer's forward, the worker's sampler and the
scheduler's schedule/update with perf_counter timers. A step's linear time is split between
prefill and decode by its share of prompt tokens vs one-token decodes. "other" is the rest of
the wall time: embedding, norms, activations, runner bookkeeping, Python glue.
"""

from __future__ import annotations

import time

import worker.layers.embed as embed_mod
import worker.layers.linear as linear_mod
from worker.layers.attention import Attention

PHASES = ("prefill linear", "decode linear", "attention", "sampling", "scheduling", "other")


class PhaseTimer:
    """Accumulates seconds per phase of an in-process `LLM` while active."""

    def __init__(self, llm) -> None:
        self.engine = llm.engine
        self.worker = llm.engine.executor.worker
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._step_linear = 0.0
        self._saved: list[tuple[object, str, object]] = []

    def _patch(self, owner, name: str, wrapper) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
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

    def __enter__(self) -> "PhaseTimer":
        lin = linear_mod.linear
        self._patch(linear_mod, "linear", self._timed(lin, None))
        self._patch(embed_mod, "linear", self._timed(lin, None))
        self._patch(Attention, "forward", self._timed(Attention.forward, "attention"))
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
            # counted before the step runs: the worker may consume the plan
            counts = [s.num_scheduled_tokens for s in (*plan.new, *plan.running)]
            try:
                return execute(plan)
            finally:
                total = sum(counts) or 1
                prefill = sum(c for c in counts if c > 1)
                self.seconds["prefill linear"] += self._step_linear * prefill / total
                self.seconds["decode linear"] += self._step_linear * (total - prefill) / total
        self._patch(self.engine.executor, "execute", step)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)   # bound methods come back as instance attributes
        self.seconds["other"] = wall - sum(v for k, v in self.seconds.items() if k != "other")
        self.wall = wall
