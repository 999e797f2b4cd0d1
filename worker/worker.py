"""The worker's step: apply the scheduler's diff to per-sequence rows, run the model, sample.

Everything a worker holds about a sequence (its tokens, blocks, params) came from the
scheduler and is sent again in full after a reset or preemption, so losing a worker loses
no request state. The gRPC worker service and the in-process executor both call `warmup`
(profile a worst-case step, size the KV cache) and `execute`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.sampling_params import SamplingParams
from common.step import NewSequence, SampledToken, StepOutput, StepPlan
from worker.kv_cache import kv_cache_bytes_per_block
from worker.runner import ModelRunner, SequenceInput
from worker.sampler import Sampler, SamplingRow, compute_prompt_logprobs
from worker.structured import GrammarBackend
from worker.warmup import cuda_kv_budget, warm_up


def verification_rows(row: SamplingRow, drafts: list[int]) -> list[SamplingRow]:
    """The sampler rows that verify a sequence's drafts: position j sees the drafts before it
    as already generated (penalties, min_tokens, and the seeded draw's token index are those
    of the same token without speculation).

    NOTE: an n-gram draft is a point mass q = 1[d]. The rejection rule (accept d with
    probability min(1, p(d) / q(d)) = p(d), else sample the residual norm(max(0, p - q)),
    which is p without d) is then exactly: sample each position from p as usual, keep the
    drafts while the sampled token equals them, emit the first differing sampled token and
    stop. Greedy rows and seeded rows thus emit the very tokens they would without
    speculation, and the distribution of every other row is unchanged."""
    out = row.output_token_ids
    return [row] + [SamplingRow(row.params, row.prompt_token_ids, [*out, *drafts[:j]],
                                row.seed_offset, row.eos_token_ids, row.grammar)
                    for j in range(1, len(drafts) + 1)]


def _token(sampled, j: int) -> SampledToken:
    return SampledToken(sampled.token_ids[j],
                        None if sampled.logprobs is None else sampled.logprobs[j],
                        sampled.top_logprobs[j])


class StepMismatchError(RuntimeError):
    """The scheduler's view and ours disagree (lost step, restarted worker): reset and resend."""


@dataclass
class SequenceState:
    token_ids: list[int]             # prompt + output: what the model computes
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    params: SamplingParams
    seed_offset: int
    row: SamplingRow                 # the sampler's view, kept so a step copies no token list
    # Speculative decoding: after a step with k drafts the worker counts only the certain
    # token as computed and lets the scheduler's next count be up to k more (the accepted
    # drafts): every rank applies that, including those that did not sample.
    spec_pending: int = 0

    @classmethod
    def from_new(cls, seq: NewSequence, eos_token_ids: tuple[int, ...]) -> "SequenceState":
        n = seq.num_prompt_tokens
        row = SamplingRow(seq.params, list(seq.token_ids[:n]), list(seq.token_ids[n:]),
                          seq.seed_offset, eos_token_ids)
        return cls(list(seq.token_ids), n, seq.num_computed_tokens, list(seq.block_ids),
                   seq.params, seq.seed_offset, row)

    def extend(self, token_ids: list[int]) -> None:
        self.token_ids.extend(token_ids)
        self.row.output_token_ids.extend(token_ids)


class Worker:
    """One rank of a worker group. Every rank applies every plan (so all hold the same
    sequence state and enter the same collectives); only the driver rank (last pipeline
    stage, tensor-parallel rank 0) samples and returns tokens. A sampled token reaches the
    other ranks, and the driver's own state, in the next plan's delta."""

    def __init__(self, runner: ModelRunner, seed: int = 0, is_driver: bool = True,
                 model_dir: str | None = None) -> None:
        self.runner = runner
        self.is_driver = is_driver
        self.sampler = Sampler(seed=seed)
        self.eos_token_ids = tuple(runner.config.eos_token_ids)
        # Structured output: grammars compile for the model's tokenizer (from model_dir).
        self.grammars = GrammarBackend(model_dir, runner.config.vocab_size, self.eos_token_ids)
        self.states: dict[str, SequenceState] = {}
        self.structured: set[str] = set()   # the sequences with a grammar (driver only)
        self.last_step_id = 0

    def warmup(self, max_num_batched_tokens: int, max_num_seqs: int,
               kv_cache_memory_bytes: int = 2 << 30, gpu_memory_utilization: float = 0.9,
               enforce_eager: bool = False, max_num_blocks: int | None = None
               ) -> tuple[int, int]:
        """Profile a worst-case step, then give the KV cache its budget: on CUDA what the
        step's activations left of this process's share of the GPU (gpu_memory_utilization
        of the total, less what others use), on CPU kv_cache_memory_bytes; at most
        max_num_blocks when given. The gRPC worker and the offline engine both size their
        cache here. Returns (blocks, bytes per block)."""
        runner = self.runner
        if runner.device.type == "cuda":
            def budget() -> int:
                return cuda_kv_budget(runner.device, gpu_memory_utilization)
        else:
            def budget() -> int:
                return kv_cache_memory_bytes
        if max_num_blocks is not None:
            per_block = kv_cache_bytes_per_block(runner.config, runner.block_size,
                                         runner.kv_cache_dtype)
            uncapped = budget

            def budget() -> int:
                return min(uncapped(), max_num_blocks * per_block)
        warm = warm_up(runner, max_num_batched_tokens, max_num_seqs, budget,
                       decode_graphs=runner.device.type == "cuda" and not enforce_eager)
        self.reset()
        return warm

    def reset(self) -> None:
        self.states.clear()
        self.structured.clear()
        self.last_step_id = 0

    def _apply(self, plan: StepPlan) -> list[tuple[str, SequenceState, int]]:
        if plan.step_id <= self.last_step_id:
            raise StepMismatchError(f"step {plan.step_id} after step {self.last_step_id}")
        self.last_step_id = plan.step_id
        for seq_id in plan.finished_ids:
            self.states.pop(seq_id, None)
            self.structured.discard(seq_id)
        scheduled = []
        for seq in plan.new:
            state = self.states[seq.seq_id] = SequenceState.from_new(seq, self.eos_token_ids)
            if self.is_driver and seq.params.structured_outputs is not None:
                # A fresh matcher: it replays the sequence's output tokens on first use
                # (worker/structured.py), whatever this worker saw of the sequence before.
                state.row.grammar = self.grammars.matcher(seq.params.structured_outputs)
                self.structured.add(seq.seq_id)
            scheduled.append((seq.seq_id, state, seq.num_scheduled_tokens, ()))
        for seq in plan.running:
            state = self.states.get(seq.seq_id)
            if state is None:
                raise StepMismatchError(f"unknown sequence {seq.seq_id!r}")
            if state.num_computed_tokens != seq.num_computed_tokens:
                # More: accepted drafts. One less: the driver deferred the sequence's sampling
                # (StepOutput.deferred) and its last known token runs again.
                ours, pending = state.num_computed_tokens, state.spec_pending
                if not (ours < seq.num_computed_tokens <= ours + pending
                        or seq.num_computed_tokens == ours - 1):
                    raise StepMismatchError(
                        f"sequence {seq.seq_id!r}: scheduler says {seq.num_computed_tokens} "
                        f"tokens computed, worker has {ours}")
                state.num_computed_tokens = seq.num_computed_tokens   # accepted drafts
            state.spec_pending = 0
            state.block_ids.extend(seq.new_block_ids)
            if seq.new_token_ids:
                state.extend(seq.new_token_ids)
            scheduled.append((seq.seq_id, state, seq.num_scheduled_tokens, seq.draft_token_ids))
        return scheduled

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        scheduled = self._apply(plan)
        out = StepOutput(step_id=plan.step_id)
        if not scheduled:
            return out
        inputs = []
        for _, st, n, drafts in scheduled:
            c = st.num_computed_tokens
            if drafts:
                # A decode with guesses: its last known token, then the drafts, logits at all.
                if n != len(drafts) + 1 or c + 1 != len(st.token_ids):
                    raise StepMismatchError(f"{len(drafts)} drafts in {n} tokens from {c} of "
                                            f"{len(st.token_ids)}")
                inputs.append(SequenceInput([st.token_ids[c], *drafts], c, st.block_ids, n))
                continue
            if c + n > len(st.token_ids):
                raise StepMismatchError(f"{n} tokens scheduled past the {len(st.token_ids)} known")
            inputs.append(SequenceInput(st.token_ids[c:c + n], c, st.block_ids))
        want_prompt_lp = any(st.params.prompt_logprobs is not None and
                             st.num_computed_tokens < st.num_prompt_tokens
                             for _, st, _, _ in scheduled)
        # Only the sequences that finish their known tokens (or verify drafts) are sampled:
        # the runner skips the LM head of the rest (prompt chunks mid-prompt). Every rank
        # passes the same list: the LM head's tensor-parallel gather needs it.
        sample_at = [i for i, (_, st, n, drafts) in enumerate(scheduled)
                     if drafts or st.num_computed_tokens + n == len(st.token_ids)]
        result = self.runner.execute(inputs, all_logits=want_prompt_lp, logits_for=sample_at)
        if not self.is_driver:
            for _, st, n, drafts in scheduled:
                st.num_computed_tokens += n - len(drafts)
                st.spec_pending = len(drafts)
            return out
        rows, row_index, row_ids = [], [], []
        defer = self._to_defer(scheduled, sample_at) if self.structured else ()
        offset = 0   # of the sequence's first row in result.logits (the sample_at ones')
        for i, (seq_id, st, n, drafts) in enumerate(scheduled):
            if want_prompt_lp and st.params.prompt_logprobs is not None:
                self._prompt_logprobs(out, seq_id, st, n, result.all_logits[i])
            if drafts:
                st.num_computed_tokens += 1
                st.spec_pending = len(drafts)
                if defer and seq_id in defer:
                    out.deferred.append(seq_id)
                    offset += n
                    continue
                grammar = st.row.grammar
                if grammar is not None:   # a draft the grammar refuses cannot be accepted:
                    grammar.sync(st.row.output_token_ids)   # verify only the ones before it
                    drafts = drafts[:grammar.count_valid(drafts)]
                rows += verification_rows(st.row, drafts)
                row_index += range(offset, offset + len(drafts) + 1)
                row_ids.append((seq_id, drafts))
                offset += n
                continue
            st.num_computed_tokens += n
            if st.num_computed_tokens == len(st.token_ids):
                if defer and seq_id in defer:
                    out.deferred.append(seq_id)
                    offset += 1
                    continue
                rows.append(st.row)
                row_index.append(offset)
                row_ids.append((seq_id, ()))
                offset += 1
        if rows:
            logits = result.logits if len(row_index) == offset else \
                result.logits[torch.tensor(row_index, device=result.logits.device)]
            sampled = self.sampler(logits, rows)
            j = 0
            for seq_id, drafts in row_ids:
                out.sampled[seq_id] = _token(sampled, j)
                if drafts:   # accept while each draft equals the token sampled before it
                    accepted = 0
                    while accepted < len(drafts) and \
                            sampled.token_ids[j + accepted] == drafts[accepted]:
                        accepted += 1
                    if accepted:
                        out.extra_sampled[seq_id] = [_token(sampled, j + a)
                                                     for a in range(1, accepted + 1)]
                    j += len(drafts)
                j += 1
        return out

    @staticmethod
    def _to_defer(scheduled: list, sample_at: list[int]) -> set[str]:
        """The sequences to sample whose grammar still compiles: left unsampled this step, so
        that the step's others do not wait for a compile (a fresh spec's takes ~10-30 ms, a
        large schema's much longer). When the step has nothing else, it waits instead: no
        one is held up, and a step that could only be repeated would spin."""
        waiting = set()
        for i in sample_at:
            seq_id, st = scheduled[i][0], scheduled[i][1]
            if st.row.grammar is not None and st.row.grammar.compiling():
                waiting.add(seq_id)
        return waiting if len(waiting) < len(scheduled) else set()

    @staticmethod
    def _prompt_logprobs(out: StepOutput, seq_id: str, st: SequenceState, n: int,
                         logits: torch.Tensor) -> None:
        """Logprobs of prompt tokens 1.. given their prefixes, for the positions computed now."""
        start = st.num_computed_tokens
        end = min(start + n, st.num_prompt_tokens - 1)   # the last prompt position predicts output
        if end <= start:
            return
        next_ids = st.token_ids[start + 1:end + 1]
        out.prompt_logprobs[seq_id] = compute_prompt_logprobs(
            logits[:end - start], next_ids, st.params.prompt_logprobs)
