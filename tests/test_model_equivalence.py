"""Our model code against Hugging Face transformers on the same random fp32 weights.

Greedy tokens must be equal; where they differ, HF's own top-2 log-probabilities at that step
must be within 1e-3 (a near-tie that floating point may flip), and the comparison stops there
because the continuations no longer share a context.

Ours runs on TESSERA_TEST_DEVICE (default cpu; scripts/gpu_check.sh sets cuda, where the
Triton kernels and decode graphs run), HF always on the CPU.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from common.model_config import ModelConfig
from tessera import LLM, SamplingParams
from worker.runner import ModelRunner, SequenceInput

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
PROMPT_LENS = [1, 7, 16, 33, 64, 100, 150, 200]   # mistral's tiny window is 48
NEW_TOKENS = 32
NEAR_TIE = 1e-3
DEVICE = os.environ.get("TESSERA_TEST_DEVICE", "cpu")


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]


def _hf_reference(model_dir, prompts: list[list[int]]):
    """Per prompt: HF greedy continuation, its per-step logprobs, and the prompt logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # ignore_eos on our side: HF must neither stop at nor suppress EOS (min_new_tokens would)
    hf.generation_config.eos_token_id = None
    refs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                              do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0)
            steps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
            refs.append((out.sequences[0, len(ids):].tolist(), steps, hf(x).logits[0]))
    return refs


def assert_same_greedy(ours: list[int], theirs: list[int], logprobs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        top2 = logprobs[step].topk(2).values
        assert (top2[0] - top2[1]).item() < NEAR_TIE and logprobs[step][a] >= top2[1] - 1e-6, (
            f"token {step}: ours {a}, HF {b}, HF top-2 logprobs {top2.tolist()}")
        return


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tiny_model):
    model_dir = tiny_model(request.param)
    cfg = ModelConfig.from_dir(model_dir)
    prompts = _prompts(cfg.vocab_size)
    return request.param, model_dir, cfg, prompts, _hf_reference(model_dir, prompts)


def test_offline_api_greedy_batch_matches_hf(arch_case):
    arch, model_dir, cfg, prompts, refs = arch_case
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=256, device=DEVICE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert len(outs) == len(prompts)
    for out, (tokens, logprobs, _) in zip(outs, refs):
        assert out.outputs[0].finish_reason == "length"
        assert_same_greedy(out.outputs[0].token_ids, tokens, logprobs)
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def _run_chunked(runner: ModelRunner, prompts: list[list[int]], chunk: int,
                 shuffle_blocks: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill every prompt in `chunk`-token pieces (all prompts in each forward pass), then
    decode greedily in one batch; blocks come from a shuffled pool when asked."""
    pool = list(range(runner.num_blocks))
    if shuffle_blocks:
        random.Random(1).shuffle(pool)
    tables = []
    for ids in prompts:
        n = -(-(len(ids) + NEW_TOKENS) // runner.block_size)
        tables.append(pool[:n])
        pool = pool[n:]
    prompt_logits = [[] for _ in prompts]
    done = [0] * len(prompts)
    last = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        which = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        seqs = [SequenceInput(prompts[i][done[i]:done[i] + chunk], done[i], tables[i]) for i in which]
        out = runner.execute(seqs, all_logits=True)
        for i, s, full in zip(which, seqs, out.all_logits):
            prompt_logits[i].append(full)
            done[i] += len(s.token_ids)
            last[i] = full[-1]
    generated = [[int(l.argmax())] for l in last]
    for _ in range(NEW_TOKENS - 1):
        seqs = [SequenceInput([g[-1]], len(p) + len(g) - 1, t)
                for p, g, t in zip(prompts, generated, tables)]
        for g, tok in zip(generated, runner.execute(seqs).logits.argmax(dim=-1).tolist()):
            g.append(tok)
    return [torch.cat(p) for p in prompt_logits], generated


@pytest.mark.parametrize("chunk,shuffle", [(10_000, False), (7, False), (7, True)],
                         ids=["whole-prompts", "chunks-of-7", "chunks-of-7-scattered-blocks"])
def test_runner_prompt_logits_and_greedy_match_hf(arch_case, chunk, shuffle):
    arch, model_dir, cfg, prompts, refs = arch_case
    runner = ModelRunner(cfg, "float32", num_blocks=256, block_size=4, device=DEVICE)
    prompt_logits, generated = _run_chunked(runner, prompts, chunk, shuffle)
    for ours, gen, (tokens, logprobs, hf_logits) in zip(prompt_logits, generated, refs):
        torch.testing.assert_close(ours.cpu(), hf_logits, atol=1e-4, rtol=0)
        assert_same_greedy(gen, tokens, logprobs)


def test_sliding_window_matters_for_mistral(tiny_model):
    """Guard against a vacuous pass: a prompt longer than the window must give different
    logits with the window than without it."""
    model_dir = tiny_model("mistral")
    cfg = ModelConfig.from_dir(model_dir)
    assert cfg.sliding_windows[0] is not None and max(PROMPT_LENS) > cfg.sliding_windows[0]
    ids = _prompts(cfg.vocab_size)[-1]
    windowed = ModelRunner(cfg, num_blocks=64, block_size=16)
    full_cfg = ModelConfig.from_dict({**cfg.extra, "sliding_window": None}, model_dir=str(model_dir))
    full = ModelRunner(full_cfg, num_blocks=64, block_size=16)
    a = windowed.execute([SequenceInput(ids, 0, list(range(13)))]).logits
    b = full.execute([SequenceInput(ids, 0, list(range(13)))]).logits
    assert (a - b).abs().max() > 1e-3
