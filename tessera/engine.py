"""The in-process engine: the engine core (scheduler.engine_core) driving a local worker, plus
text output.

The loop is the service's loop without the network: `plan = core.schedule()` ->
`output = executor.execute(plan)` -> `events = core.update(plan, output)`; the core keeps the
request and n-sequence bookkeeping, this module turns its events into `RequestOutput`s (text,
stop strings included, is produced here from token ids, as the gateway does for the services).
The KV cache is sized as a worker sizes it (`Worker.warmup`: a profiled worst-case step, then
kv_cache_memory_bytes on CPU, the gpu_memory_utilization share on CUDA).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.config import EngineConfig, resolve_max_model_len
from common.detokenize import IncrementalDetokenizer
from common.limits import check_prompt
from common.model_config import ModelConfig
from common.redis_schema import OutputEvent
from common.sampling_params import SamplingParams
from common.step import StepOutput, StepPlan
from common.tokenizer import Tokenizer
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.scheduler import SchedulerConfig
from tessera.outputs import CompletionOutput, RequestOutput
from worker.runner import ModelRunner
from worker.worker import Worker


class _LocalStep:
    """A step of the local worker: it runs when waited for (in the waiting thread)."""

    def __init__(self, executor: "LocalExecutor", plan: StepPlan) -> None:
        self.executor, self.plan = executor, plan

    def result(self) -> StepOutput:
        return self.executor.execute(self.plan)


class LocalExecutor:
    """Runs a step on a worker in this process (the services use a gRPC executor instead)."""

    def __init__(self, worker: Worker, kv_cache_memory_bytes: int = 2 << 30,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 max_num_blocks: int | None = None) -> None:
        self.worker = worker
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.max_num_blocks = max_num_blocks

    def warmup(self, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        return self.worker.warmup(max_num_batched_tokens, max_num_seqs,
                                  self.kv_cache_memory_bytes, self.gpu_memory_utilization,
                                  self.enforce_eager, self.max_num_blocks)[0]

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.worker.execute(plan)

    def execute_async(self, plan: StepPlan) -> _LocalStep:
        return _LocalStep(self, plan)

    def reset(self) -> None:
        self.worker.reset()

    def close(self) -> None:
        pass


@dataclass
class _Sequence:
    """One of the n sequences of a request, as the output side accumulates it."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    detok: IncrementalDetokenizer | None = None


@dataclass
class _Output:
    """What a request's RequestOutput is built from (``EngineRequest.tag``)."""
    prompt: str | None
    seqs: list[_Sequence]
    prompt_logprobs: list | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.max_model_len = resolve_max_model_len(config.max_model_len,
                                                   self.model_config.max_position_embeddings)
        self.worker_group = None
        if config.world_size > 1:
            # A sharded model: worker processes, driven like the services drive them.
            from tessera.worker_group import LocalWorkerGroup

            self.worker_group = LocalWorkerGroup(config)
            self.executor = self.worker_group.executor
            warm = self.worker_group.warmup(config.max_num_batched_tokens, config.max_num_seqs)
            num_kv_blocks = min(config.num_kv_blocks or warm, warm)
        else:
            runner = ModelRunner(self.model_config, config.dtype, 0, config.block_size,
                                 config.device, config.kv_cache_dtype)
            self.executor = LocalExecutor(Worker(runner, seed=config.seed, model_dir=config.model),
                                          config.kv_cache_memory_bytes,
                                          config.gpu_memory_utilization, config.enforce_eager,
                                          config.num_kv_blocks)
            # The worker's own warm-up: the same profiling and sizing as a gRPC worker's.
            num_kv_blocks = self.executor.warmup(config.max_num_batched_tokens,
                                                 config.max_num_seqs)
            if num_kv_blocks == 0:
                raise ValueError("no memory left for a single KV block")
        self.core = EngineCore(SchedulerConfig.from_settings(config, num_kv_blocks,
                                                             self.max_model_len),
                               self.model_config.eos_token_ids)
        self.scheduler = self.core.scheduler

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, priority: int = 0) -> None:
        check_prompt(prompt_token_ids, self.max_model_len, self.model_config.vocab_size)
        out = _Output(prompt, [_Sequence(i) for i in range(params.n)])
        if params.logprobs is not None:
            for s in out.seqs:
                s.logprobs = []
        if params.prompt_logprobs is not None:
            out.prompt_logprobs = [None]   # the first prompt token has no logprob
        if params.stop:
            for s in out.seqs:
                s.detok = IncrementalDetokenizer(
                    self.tokenizer, list(prompt_token_ids),
                    skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output)
        self.core.add_request(EngineRequest(request_id, list(prompt_token_ids), params,
                                            priority=priority, tag=out))

    def abort(self, request_id: str) -> OutputEvent | None:
        """End a request now; the core's final event for it (None if unknown)."""
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.core.requests)

    # ---- the loop -----------------------------------------------------------------------
    def step_events(self) -> list[tuple[EngineRequest, OutputEvent]]:
        """One engine step: the core's per-request events (the service publishes the same)."""
        plan = self.core.schedule()
        if plan.num_sequences == 0:
            if self.core.has_unfinished:
                raise RuntimeError("no request can be scheduled: the KV cache is too small "
                                   "for the waiting request")
            return []
        started = time.perf_counter()
        output = self.executor.execute(plan)
        self.core.step_time(plan, time.perf_counter() - started)   # speculation's cost model
        return self.core.update(plan, output)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it."""
        done = [req for req, ev in self.step_events() if self._apply(req, ev)]
        # Built once the whole step is applied: a stop string may end a request before the
        # step's events of its other sequences are in.
        return [self._output(req) for req in done]

    def _apply(self, req: EngineRequest, ev: OutputEvent) -> bool:
        """Add an event to the request's output; True if it was the request's last."""
        out: _Output = req.tag
        seq = out.seqs[ev.seq_index]
        if ev.prompt_logprobs and ev.seq_index == 0:
            out.prompt_logprobs.extend(ev.prompt_logprobs)
        ids, lps = ev.token_ids, ev.logprobs
        if seq.detok is not None and ids:
            # Nothing past a stop string (an event of several tokens, from speculative
            # decoding or a resume, may go on after it).
            ids = ids[:seq.detok.add_tokens(ids).num_tokens]
            lps = lps[:len(ids)] if lps else lps
        seq.token_ids.extend(ids)
        if seq.logprobs is not None and lps:
            seq.logprobs.extend(lps)
        if seq.detok is not None and seq.detok.stopped is not None and ev.finish_reason is None:
            stop = self.core.finish_sequence(req.request_id, ev.seq_index, "stop")
            return stop is not None and self._apply(req, stop)
        if ev.finish_reason is not None:
            seq.finish_reason = ev.finish_reason
        return ev.final

    def _output(self, req: EngineRequest) -> RequestOutput:
        out: _Output = req.tag
        outs = []
        for s in out.seqs:
            if s.detok is not None:
                s.detok.flush()   # releases text held back for a stop string that never came
                text = s.detok.output_text
            else:
                text = self.tokenizer.decode(s.token_ids, req.params.skip_special_tokens)
            outs.append(CompletionOutput(s.index, text, s.token_ids, s.finish_reason, s.logprobs))
        return RequestOutput(req.request_id, out.prompt, req.prompt_token_ids, outs,
                             prompt_logprobs=out.prompt_logprobs)
