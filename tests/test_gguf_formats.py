"""GGUF files of every family we serve, written from random checkpoints by llama.cpp's rules
(tests/gguf_writer.py): Qwen3 (against HF on the same weights), Llama quantized to Q8_0 (q/k
permutation; HF reading the same GGUF), GPT-2 in F16, and TP=2 ranks that dequantize only
their own slices."""

from __future__ import annotations

import pytest
import torch

from common.model_config import ModelConfig
from gguf_writer import write_gguf
from tessera import LLM, SamplingParams
from test_model_equivalence import NEW_TOKENS, _hf_reference, _prompts, assert_same_greedy
from test_parallel import _shards
from test_qwen3 import make_qwen3
from worker.runner import ModelRunner, SequenceInput

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _check_logits(path, prompts, refs) -> None:
    runner = ModelRunner(ModelConfig.from_dir(path), "float32", num_blocks=64, block_size=16)
    for ids, (_, _, hf_logits) in zip(prompts, refs):
        out = runner.execute([SequenceInput(ids, 0, list(range(-(-len(ids) // 16))))],
                             all_logits=True)
        torch.testing.assert_close(out.all_logits[0], hf_logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-gguf")
    model_dir = make_qwen3(root / "hf", tied=False)
    prompts = _prompts(512)[:5:2]
    # transformers' own GGUF reader drops Qwen3's explicit head_dim (its mapping has no
    # attention.key_length for qwen3), so the oracle reads the same fp32 weights from the
    # directory the GGUF was written from.
    return write_gguf(model_dir, root / "qwen3.gguf"), prompts, _hf_reference(model_dir, prompts)


def test_qwen3_gguf_matches_hf(qwen3_gguf):
    path, prompts, refs = qwen3_gguf
    cfg = ModelConfig.from_dir(path)
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.head_dim == 32 and cfg.qk_norm
    assert not cfg.tie_word_embeddings
    _check_logits(path, prompts, refs)
    outs = LLM(str(path), num_kv_blocks=128).generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for out, (tokens, logprobs, _) in zip(outs, refs):
        assert_same_greedy(out.outputs[0].token_ids, tokens, logprobs)


def test_qwen3_gguf_tp2_matches_hf(qwen3_gguf):
    path, prompts, refs = qwen3_gguf
    with LLM(str(path), tensor_parallel_size=2, kv_cache_memory_gb=8 / 1024) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for out, (tokens, logprobs, _) in zip(outs, refs):
        assert_same_greedy(out.outputs[0].token_ids, tokens, logprobs)


@pytest.fixture(scope="module")
def llama_q8(tiny_model, tmp_path_factory):
    """The tiny Llama as Q8_0 (rows of 64: whole blocks); HF reads the same file."""
    path = write_gguf(tiny_model("llama"), tmp_path_factory.mktemp("llama-q8") / "llama.gguf",
                      "Q8_0")
    prompts = _prompts(512)[:5:2]
    return path, prompts, _hf_reference_gguf(path, prompts)


def _hf_reference_gguf(path, prompts):
    hf = _hf_gguf(path)
    refs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                              do_sample=False, output_scores=True, return_dict_in_generate=True,
                              eos_token_id=None, pad_token_id=0)
            refs.append((out.sequences[0, len(ids):].tolist(),
                         [torch.log_softmax(s[0], -1) for s in out.scores], hf(x).logits[0]))
    return refs


def test_llama_q8_0_gguf_matches_hf_reading_it(llama_q8):
    path, prompts, refs = llama_q8
    _check_logits(path, prompts, refs)
    outs = LLM(str(path), num_kv_blocks=128).generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for out, (tokens, logprobs, _) in zip(outs, refs):
        assert_same_greedy(out.outputs[0].token_ids, tokens, logprobs)


def test_tp2_ranks_read_only_their_quantized_slices(llama_q8):
    path = str(llama_q8[0])
    full = _shards(path, 1, 1)[0][0]
    for rank, (shapes, read) in _shards(path, 2, 1).items():
        held = sum(torch.Size(s).numel() for s in shapes.values())
        assert read == held, (rank, read, held)   # never a whole sharded tensor
        assert shapes["model.layers.0.self_attn.qkv_proj.weight"][0] == \
            full["model.layers.0.self_attn.qkv_proj.weight"][0] // 2


def test_gpt2_f16_gguf_matches_hf_reading_it(tiny_model, tmp_path):
    path = write_gguf(tiny_model("gpt2"), tmp_path / "gpt2.gguf", "F16")
    assert ModelConfig.from_dir(path).architecture == "GPT2LMHeadModel"
    hf = _hf_gguf(path)
    prompts = _prompts(512)[1:4]
    with torch.no_grad():
        refs = [(None, None, hf(torch.tensor([ids])).logits[0]) for ids in prompts]
    _check_logits(path, prompts, refs)
