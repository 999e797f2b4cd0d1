"""--kv-cache-dtype: a half-precision KV cache (fp32 compute) stays close to the fp32 cache.

Teacher-forced through prompt logprobs, so both runs score the same tokens: a long prompt
prefilled in small chunks makes later chunks read earlier ones back from the half cache, then
greedy decoding continues from it. The equivalence tests against HF stay on the fp32 cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from tessera import LLM, SamplingParams
from worker.kv_cache import resolve_kv_cache_dtype


def _run(model: str, kv_cache_dtype: str, ids: list[int]):
    llm = LLM(model, num_kv_blocks=64, max_num_batched_tokens=32, kv_cache_dtype=kv_cache_dtype)
    assert llm.engine.executor.worker.runner.kv_caches[0][0].dtype == getattr(
        torch, "float32" if kv_cache_dtype == "auto" else kv_cache_dtype)
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0,
                                      ignore_eos=True), use_tqdm=False)[0]
    return [lp[0] for lp in out.prompt_logprobs[1:]], out.outputs[0].token_ids


@pytest.mark.parametrize("kv_dtype,tol", [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_half_kv_cache_logprobs_close_to_fp32(tiny_model, kv_dtype, tol):
    model = str(tiny_model("llama"))
    ids = [(i * 37) % 200 + 10 for i in range(150)]
    ref_lp, ref_tokens = _run(model, "auto", ids)
    lp, tokens = _run(model, kv_dtype, ids)
    assert len(lp) == len(ref_lp) == len(ids) - 1
    worst = max(abs(a - b) for a, b in zip(lp, ref_lp))
    assert worst < tol, f"prompt logprobs differ by up to {worst:.4f} with a {kv_dtype} cache"
    assert all(math.isfinite(x) for x in lp)
    # greedy decoding from the half cache: the first tokens agree (random models are peaked)
    assert tokens[:4] == ref_tokens[:4]


def test_kv_cache_dtype_is_checked():
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="kv cache dtype"):
        resolve_kv_cache_dtype("fp8", torch.float32)
