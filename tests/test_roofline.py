"""The memory-aware roofline of benchmarks/roofline.py: its arithmetic on hand-counted steps, and
the steps it records from a real engine run."""

from __future__ import annotations

import pytest

from benchmarks.roofline import Step, StepRecorder, last_level_cache_bytes, step_floor
from common.model_config import ModelConfig
from tessera import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


def _counts(cfg: ModelConfig) -> tuple[int, int, int]:
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer_params = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    return layer_params, h * cfg.vocab_size, kv


def test_a_step_costs_the_larger_of_its_compute_and_its_bytes(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    layer_params, head_params, kv = _counts(cfg)
    q = cfg.num_heads * cfg.head_dim
    L = cfg.num_layers
    # a prompt chunk of 8 tokens after 4 cached ones, which samples (its last token)
    prefill = Step([(4, 8)], sampled=1)
    flops = 8 * 2 * L * layer_params + 2 * head_params + L * 4 * q * (8 * 4 + 8 * 9 / 2)
    nbytes = (L * layer_params + head_params) * 4 + 12 * L * 2 * kv * 4
    # no sample: no LM head in either count; two decodes after 100 and 30 cached tokens
    decode = Step([(100, 1), (30, 1)], sampled=0)
    flops_d = 2 * 2 * L * layer_params + L * 4 * q * (100 + 1 + 30 + 1)
    bytes_d = L * layer_params * 4 + (101 + 31) * L * 2 * kv * 4
    peak, bw = 1e9, 1e8
    f = step_floor(cfg, [prefill, decode], peak, bw, weight_elem=4, kv_elem=4)
    assert f.compute_s == pytest.approx((flops + flops_d) / peak)
    assert f.memory_s == pytest.approx((nbytes + bytes_d) / bw)
    assert f.floor_s == pytest.approx(max(flops / peak, nbytes / bw) + max(flops_d / peak, bytes_d / bw))
    assert f.bytes_read == pytest.approx(nbytes + bytes_d)
    assert f.memory_bound_steps == (nbytes / bw > flops / peak) + (bytes_d / bw > flops_d / peak)
    # a half-precision cache halves the K/V bytes and nothing else
    h = step_floor(cfg, [decode], peak, bw, weight_elem=4, kv_elem=2)
    assert h.bytes_read == pytest.approx(L * layer_params * 4 + (101 + 31) * L * 2 * kv * 2)


def test_the_recorder_sees_every_step_the_engine_ran(model_dir):
    llm = LLM(str(model_dir), dtype="float32", enable_prefix_caching=False,
              max_num_batched_tokens=16, max_num_seqs=4)
    prompts = [list(range(3, 3 + n)) for n in (5, 20, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    executor = llm.engine.executor
    with StepRecorder(llm) as rec:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert "execute" not in executor.__dict__        # the wrapper is gone again
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    # every prompt token and every output token but the last is computed exactly once
    assert sum(n for s in rec.steps for _, n in s.seqs) == sum(len(p) + 5 for p in prompts)
    assert sum(s.sampled for s in rec.steps) == 3 * 6
    assert all(sum(n for _, n in s.seqs) <= 16 for s in rec.steps)   # the token budget held
    assert len(rec.steps) >= 5                       # 49 prompt tokens need 4 steps of 16 alone
    assert last_level_cache_bytes() > 0
