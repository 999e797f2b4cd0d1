"""The offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))` and `.chat(...)`.

A thin face over `LLMEngine`: every prompt becomes a request of the continuous-batching
engine, and the call returns when all have finished, in the order given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

from tqdm.auto import tqdm

from common.config import EngineConfig
from common.limits import check_prompt
from common.sampling_params import SamplingParams
from tessera.engine import LLMEngine
from tessera.outputs import RequestOutput

Prompt = Union[str, dict]
Message = dict


class LLM:
    """`LLM(model, **settings)` or `LLM(config=EngineConfig(...))`: the settings are
    EngineConfig's fields (common/config.py), e.g. `LLM(model, tensor_parallel_size=2)`.

    tensor_parallel_size x pipeline_parallel_size > 1 runs the model sharded over that many
    worker processes (gloo on CPU, NCCL on CUDA); `close()` stops them. On CUDA, decode
    steps replay CUDA graphs unless enforce_eager. The KV cache is sized as a worker sizes it,
    after a profiled worst-case step: kv_cache_memory_gb on CPU, the gpu_memory_utilization
    share of the GPU on CUDA (num_kv_blocks caps it). kv_cache_dtype: auto (the compute
    dtype), float32, float16 or bfloat16 (vLLM's --kv-cache-dtype)."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 **settings: Any) -> None:
        if config is None:
            if model is None:
                raise TypeError("LLM() needs a model directory or config=EngineConfig(...)")
            config = EngineConfig(model=model, **settings)
        elif model is not None or settings:
            config = dataclasses.replace(config, **({"model": model} if model else {}),
                                         **settings)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def close(self) -> None:
        """Stop the worker processes of a sharded model (also done at exit)."""
        if self.engine.worker_group is not None:
            self.engine.worker_group.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt is a string or a dict with 'prompt_token_ids' or 'prompt'")

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # Validate everything before queueing anything: a bad prompt fails the call cleanly.
        inputs = [self._prompt_ids(p) for p in prompts]
        for _, ids in inputs:
            check_prompt(ids, self.engine.max_model_len, self.engine.model_config.vocab_size)
        ids = []
        for (text, token_ids), p in zip(inputs, params):
            rid = str(self._next_id)
            self._next_id += 1
            self.engine.add_request(rid, token_ids, p, prompt=text)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        """Each conversation is rendered with the model's chat template, then generated."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    done[out.request_id] = out
                    bar.update(1)
        except BaseException:
            for rid in request_ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in request_ids]
