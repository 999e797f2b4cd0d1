"""The in-process engine: the scheduler core driving a local worker, plus text output.

The loop is the service's loop without the network: `plan = scheduler.schedule()` ->
`output = executor.execute(plan)` -> `events = scheduler.update(plan, output)`. Text (stop
strings included) is produced here from token ids, as the gateway does for the services.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.detokenize import IncrementalDetokenizer
from common.model_config import ModelConfig
from common.sampling_params import SamplingParams
from common.step import StepOutput, StepPlan
from common.tokenizer import Tokenizer
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerConfig
from tessera.outputs import CompletionOutput, RequestOutput
from worker.kv_cache import kv_cache_bytes_per_block, resolve_kv_cache_dtype
from worker.loader import parse_dtype
from worker.runner import ModelRunner, compute_dtype
from worker.worker import Worker


class LocalExecutor:
    """Runs a step on a worker in this process (the services use a gRPC executor instead)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.worker.execute(plan)


@dataclass
class _Sequence:
    """One of the n sequences of a request, as the output side tracks it."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    detok: IncrementalDetokenizer | None = None


@dataclass
class _Tracked:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    seqs: list[_Sequence]
    prompt_logprobs: list | None = None
    children_added: int = 1

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class LLMEngine:
    def __init__(self, model: str, dtype: str = "float32", block_size: int = 16,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, seed: int = 0,
                 kv_cache_memory_bytes: int = 2 << 30, device: str = "cpu",
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 enforce_eager: bool = False, kv_cache_dtype: str = "auto") -> None:
        self.model_config = ModelConfig.from_dir(model)
        self.tokenizer = Tokenizer.from_dir(model)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = min(max_model_len or limit, limit)
        self.worker_group = None
        if tensor_parallel_size * pipeline_parallel_size > 1:
            # A sharded model: worker processes, driven like the services drive them.
            from tessera.worker_group import LocalWorkerGroup

            self.worker_group = LocalWorkerGroup(
                model, tensor_parallel_size, pipeline_parallel_size, dtype, block_size, device,
                kv_cache_memory_bytes, seed)
            warm = self.worker_group.warmup(max_num_batched_tokens, max_num_seqs)
            num_kv_blocks = min(num_kv_blocks or warm, warm)
        elif num_kv_blocks is None:
            kv_dtype = resolve_kv_cache_dtype(
                kv_cache_dtype, compute_dtype(parse_dtype(dtype), torch.device(device)))
            per_block = kv_cache_bytes_per_block(self.model_config, block_size, kv_dtype)
            num_kv_blocks = max(kv_cache_memory_bytes // per_block, 1)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_kv_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=enable_prefix_caching))
        if self.worker_group is not None:
            self.executor = self.worker_group.executor
        else:
            runner = ModelRunner(self.model_config, dtype, num_kv_blocks, block_size, device,
                                 kv_cache_dtype)
            if runner.device.type == "cuda" and not enforce_eager:
                runner.capture_decode_graphs(max_num_seqs)   # decode steps replay CUDA graphs
            self.executor = LocalExecutor(Worker(runner, seed=seed))
        self.tracked: dict[str, _Tracked] = {}
        self._child_of: dict[str, tuple[_Tracked, _Sequence]] = {}

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, priority: int = 0) -> None:
        if request_id in self.tracked:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens is too long: "
                             f"max_model_len is {self.max_model_len}")
        seqs = [_Sequence(i) for i in range(params.n)]
        t = _Tracked(request_id, prompt, list(prompt_token_ids), params, priority, seqs)
        if params.logprobs is not None:
            for s in seqs:
                s.logprobs = []
        if params.prompt_logprobs is not None:
            t.prompt_logprobs = [None]   # the first prompt token has no logprob
        self.tracked[request_id] = t
        # The n sequences share the prompt's KV blocks through the prefix cache: the others
        # are admitted once the first has computed (and cached) the prompt.
        self._add_child(t, 0)

    def _add_child(self, t: _Tracked, index: int) -> None:
        seq = t.seqs[index]
        if t.params.stop:
            seq.detok = IncrementalDetokenizer(
                self.tokenizer, t.prompt_token_ids, skip_special_tokens=t.params.skip_special_tokens,
                stop=t.params.stop, include_stop_str_in_output=t.params.include_stop_str_in_output)
        child_id = t.request_id if t.params.n == 1 else f"{t.request_id}#{index}"
        self._child_of[child_id] = (t, seq)
        self.scheduler.add_request(Request(
            child_id, t.prompt_token_ids, t.params, priority=t.priority,
            eos_token_ids=self.model_config.eos_token_ids, seed_offset=index))

    def abort(self, request_id: str) -> None:
        t = self.tracked.pop(request_id, None)
        if t is None:
            return
        for child_id, (owner, seq) in list(self._child_of.items()):
            if owner is t:
                self.scheduler.abort(child_id)
                del self._child_of[child_id]

    def has_unfinished(self) -> bool:
        return bool(self.tracked)

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it."""
        plan = self.scheduler.schedule()
        if plan.num_sequences == 0:
            if self.scheduler.has_unfinished:
                raise RuntimeError("no request can be scheduled: the KV cache is too small "
                                   "for the waiting request")
            return []
        output = self.executor.execute(plan)
        finished = []
        for ev in self.scheduler.update(plan, output):
            t, seq = self._child_of[ev.request_id]
            if ev.prompt_logprobs and seq.index == 0:
                t.prompt_logprobs.extend(ev.prompt_logprobs)
            if not ev.new_token_ids:
                continue
            if seq.index == 0 and t.children_added < t.params.n:
                for k in range(1, t.params.n):
                    self._add_child(t, k)
                t.children_added = t.params.n
            seq.token_ids.extend(ev.new_token_ids)
            if seq.logprobs is not None and ev.logprobs:
                seq.logprobs.extend(ev.logprobs)
            reason = ev.finish_reason
            if seq.detok is not None and reason != "abort":
                seq.detok.add_tokens(ev.new_token_ids)
                if seq.detok.stopped is not None and reason is None:
                    self.scheduler.abort(ev.request_id)
                    reason = "stop"
            if reason is not None:
                seq.finish_reason = reason
                del self._child_of[ev.request_id]
                if t.finished:
                    finished.append(self._output(self.tracked.pop(t.request_id)))
        return finished

    def _output(self, t: _Tracked) -> RequestOutput:
        outs = []
        for s in t.seqs:
            if s.detok is not None:
                s.detok.flush()   # releases text held back for a stop string that never came
                text = s.detok.output_text
            else:
                text = self.tokenizer.decode(s.token_ids, t.params.skip_special_tokens)
            outs.append(CompletionOutput(s.index, text, s.token_ids, s.finish_reason, s.logprobs))
        return RequestOutput(t.request_id, t.prompt, t.prompt_token_ids, outs,
                             prompt_logprobs=t.prompt_logprobs)
