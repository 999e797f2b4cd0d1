"""Qwen3 (per-head q/k RMSNorm, explicit head_dim) against HF transformers, on random
checkpoints written by transformers itself: GQA, tied and untied embeddings, TP=2 and PP=2."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from common.model_config import ModelConfig
from tessera import LLM, SamplingParams
from tessera.tokenizer_build import tokenizer_json
from test_model_equivalence import NEW_TOKENS, _hf_reference, _prompts, assert_same_greedy
from worker.runner import ModelRunner, SequenceInput

VOCAB = 512


def make_qwen3(path: pathlib.Path, tied: bool, seed: int = 0) -> pathlib.Path:
    """A tiny random Qwen3ForCausalLM saved by transformers (head_dim != hidden / heads)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, initializer_range=0.15,
                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        # HF initializes norms to one; random scales make a wrong q/k norm show in the logits.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tokenizer_json(VOCAB, "qwen2"))
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen3_case(request, tmp_path_factory):
    model_dir = make_qwen3(tmp_path_factory.mktemp("qwen3"), tied=request.param)
    prompts = _prompts(VOCAB)[:6]        # 1 .. 100 tokens
    return str(model_dir), prompts, _hf_reference(model_dir, prompts)


def test_config_reads_qwen3(qwen3_case):
    model_dir = qwen3_case[0]
    cfg = ModelConfig.from_dir(model_dir)
    raw = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    assert cfg.family == "qwen3" and cfg.qk_norm and cfg.head_dim == 32
    assert cfg.num_kv_heads == 2 and not cfg.attention_bias
    assert cfg.tie_word_embeddings == raw["tie_word_embeddings"]


def test_config_without_architectures_falls_back_to_model_type(qwen3_case):
    raw = json.loads((pathlib.Path(qwen3_case[0]) / "config.json").read_text())
    del raw["architectures"]
    assert ModelConfig.from_dict(raw).architecture == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="unsupported architectures"):
        ModelConfig.from_dict({**raw, "model_type": "bloom"})


def test_offline_greedy_and_prompt_logits_match_hf(qwen3_case):
    model_dir, prompts, refs = qwen3_case
    llm = LLM(model_dir, num_kv_blocks=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    for out, (tokens, logprobs, _) in zip(outs, refs):
        assert_same_greedy(out.outputs[0].token_ids, tokens, logprobs)
    runner = ModelRunner(ModelConfig.from_dir(model_dir), "float32", num_blocks=64, block_size=16)
    for ids, (_, _, hf_logits) in zip(prompts, refs):
        out = runner.execute([SequenceInput(ids, 0, list(range(-(-len(ids) // 16))))],
                             all_logits=True)
        torch.testing.assert_close(out.all_logits[0], hf_logits, atol=1e-4, rtol=0)


def test_first_greedy_steps_are_not_near_ties(qwen3_case):
    """Guard against a vacuous pass: most steps must have a clear winner."""
    _, _, refs = qwen3_case
    gaps = [float(s.topk(2).values.diff().abs()) for _, steps, _ in refs for s in steps]
    assert sum(g > 1e-2 for g in gaps) > 0.9 * len(gaps)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_greedy_matches_hf(qwen3_case, tp, pp):
    model_dir, prompts, refs = qwen3_case
    with LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             kv_cache_memory_gb=8 / 1024) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[::2]],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                            use_tqdm=False)
    for out, (tokens, logprobs, _) in zip(outs, refs[::2]):
        assert_same_greedy(out.outputs[0].token_ids, tokens, logprobs)
