"""The offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))`.

This first version runs the prompts of a call as static batches: every prompt is prefilled
in chunks, then all sequences decode together until each finishes. The continuous-batching
engine replaces the inside later without changing this surface.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from common.model_config import ModelConfig
from common.tokenizer import Tokenizer
from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams
from worker.kv_cache import kv_cache_bytes_per_block
from worker.loader import parse_dtype
from worker.runner import ModelRunner, SequenceInput

Prompt = Union[str, dict]
DEFAULT_KV_CACHE_BYTES = 1 << 30


class LLM:
    def __init__(self, model: str, dtype: str = "float32", block_size: int = 16,
                 num_kv_blocks: int | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 2048, seed: int = 0) -> None:
        self.config = ModelConfig.from_dir(model)
        self.tokenizer = Tokenizer.from_dir(model)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        if num_kv_blocks is None:
            per_block = kv_cache_bytes_per_block(self.config, block_size, parse_dtype(dtype))
            num_kv_blocks = max(DEFAULT_KV_CACHE_BYTES // per_block, 1)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seed = seed
        self.runner = ModelRunner(self.config, dtype, num_kv_blocks, block_size)

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids contains ids outside the vocabulary: {bad[:5]}")
            return None, ids
        raise ValueError("a prompt is a string or a dict with 'prompt_token_ids'")

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        requests = [self._prompt_ids(p) for p in prompts]
        for _, ids in requests:
            if not ids:
                raise ValueError("prompt is empty")
            if len(ids) + params.max_tokens > self.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} "
                                 f"exceeds max_model_len {self.max_model_len}")
        outputs: list[RequestOutput] = []
        for wave in self._waves([ids for _, ids in requests], params.max_tokens):
            outputs.extend(self._run_static_batch(
                [requests[i] for i in wave], params, first_index=len(outputs)))
        return outputs

    def _waves(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Groups of prompt indices whose sequences fit the KV cache together."""
        bs, capacity = self.runner.block_size, self.runner.num_blocks
        waves, current, used = [], [], 0
        for i, ids in enumerate(prompt_ids):
            need = -(-(len(ids) + max_tokens) // bs)
            if need > capacity:
                raise ValueError(f"prompt {i} needs {need} KV blocks, the cache has {capacity}")
            if used + need > capacity:
                waves.append(current)
                current, used = [], 0
            current.append(i)
            used += need
        return waves + [current] if current else waves

    def _run_static_batch(self, requests: list[tuple[str | None, list[int]]],
                          params: SamplingParams, first_index: int) -> list[RequestOutput]:
        bs = self.runner.block_size
        tables, next_block = [], 0
        for _, ids in requests:
            n = -(-(len(ids) + params.max_tokens) // bs)
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        generator = torch.Generator().manual_seed(self.seed if params.seed is None else params.seed)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.config.eos_token_ids)
        generated: list[list[int]] = [[] for _ in requests]
        reasons: list[str | None] = [None] * len(requests)
        last_logits = self._prefill(requests, tables)
        while True:
            active = [i for i, r in enumerate(reasons) if r is None]
            tokens = self._pick(last_logits[active], params, generator)
            for i, tok in zip(active, tokens):
                generated[i].append(tok)
                if tok in stop_ids:
                    reasons[i] = "stop"
                elif len(generated[i]) >= params.max_tokens:
                    reasons[i] = "length"
            active = [i for i in active if reasons[i] is None]
            if not active:
                break
            seqs = [SequenceInput([generated[i][-1]], len(requests[i][1]) + len(generated[i]) - 1,
                                  tables[i]) for i in active]
            logits = self.runner.execute(seqs).logits
            last_logits = torch.zeros(len(requests), logits.shape[1])
            last_logits[active] = logits
        return [RequestOutput(request_id=str(first_index + i), prompt=text, prompt_token_ids=ids,
                              outputs=[CompletionOutput(0, self.tokenizer.decode(generated[i]),
                                                        generated[i], reasons[i])])
                for i, (text, ids) in enumerate(requests)]

    def _prefill(self, requests: list[tuple[str | None, list[int]]],
                 tables: list[list[int]]) -> torch.Tensor:
        """Computes every prompt, at most max_num_batched_tokens per forward pass."""
        done = [0] * len(requests)
        logits = None
        while any(d < len(ids) for d, (_, ids) in zip(done, requests)):
            budget, seqs, which = self.max_num_batched_tokens, [], []
            for i, (_, ids) in enumerate(requests):
                take = min(len(ids) - done[i], budget)
                if take <= 0:
                    continue
                seqs.append(SequenceInput(ids[done[i]:done[i] + take], done[i], tables[i]))
                which.append(i)
                done[i] += take
                budget -= take
            out = self.runner.execute(seqs).logits
            if logits is None:
                logits = torch.zeros(len(requests), out.shape[1])
            logits[which] = out
        return logits

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
              ) -> list[int]:
        if params.greedy:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits / params.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
