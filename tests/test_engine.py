"""The continuous-batching engine behind the offline API, against HF transformers.

64 mixed requests (prompts 1..300 tokens, some sharing prefixes) must give HF's greedy tokens
with prefix caching on, and again with a KV pool so small that preemption happens repeatedly.
"""

from __future__ import annotations

import random

import pytest
import torch

from tessera import LLM, SamplingParams
NEAR_TIE = 1e-3   # as in test_model_equivalence

NEW_TOKENS = 16


def _mixed_prompts(vocab: int, n: int = 64, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [[rng.randrange(vocab) for _ in range(rng.randint(40, 120))] for _ in range(3)]
    prompts = []
    for i in range(n):
        if i % 3 == 0:   # a third share one of three prefixes, with their own tails
            base = shared[i % len(shared)]
            prompts.append(base + [rng.randrange(vocab) for _ in range(rng.randint(1, 60))])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(rng.randint(1, 300))])
    return prompts


@pytest.fixture(scope="module")
def hf_case(tiny_model):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompts = _mixed_prompts(hf.config.vocab_size)
    refs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                              do_sample=False, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=0)
            refs.append((out.sequences[0, len(ids):].tolist(),
                         [torch.log_softmax(s[0], -1) for s in out.scores]))
    return model_dir, prompts, refs


def _assert_matches(outs, refs):
    for out, (tokens, logprobs) in zip(outs, refs):
        ours = out.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS and out.outputs[0].finish_reason == "length"
        for step, (a, b) in enumerate(zip(ours, tokens)):
            if a != b:
                top2 = logprobs[step].topk(2).values
                assert (top2[0] - top2[1]).item() < NEAR_TIE, (step, a, b, top2.tolist())
                break


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_64_mixed_requests_with_prefix_caching_match_hf(hf_case):
    model_dir, prompts, refs = hf_case
    llm = LLM(str(model_dir), num_kv_blocks=2048, max_num_batched_tokens=512)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    _assert_matches(outs, refs)
    kv = llm.engine.scheduler.kv
    assert kv.prefix_hits > 0, "shared prefixes must hit the prefix cache"
    assert kv.num_blocks_in_use == 0


def test_64_requests_under_repeated_preemption_match_hf(hf_case):
    model_dir, prompts, refs = hf_case
    # 40 blocks of 16 tokens: the longest request (316 tokens) needs 20; many must wait or be
    # preempted and recomputed.
    llm = LLM(str(model_dir), num_kv_blocks=40, max_num_batched_tokens=256,
              enable_prefix_caching=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions >= 5
    _assert_matches(outs, refs)


def test_seeded_request_is_reproducible_alone_in_a_batch_and_under_preemption(tiny_model):
    model_dir = str(tiny_model("llama"))
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    target = {"prompt_token_ids": list(range(10, 60))}
    alone = LLM(model_dir, num_kv_blocks=256).generate(target, params)[0].outputs[0].token_ids

    rng = random.Random(0)
    others = [{"prompt_token_ids": [rng.randrange(500) for _ in range(rng.randint(5, 80))]}
              for _ in range(32)]
    other_params = [SamplingParams(temperature=0.9, max_tokens=24, seed=None if i % 2 else i,
                                   ignore_eos=True) for i in range(32)]
    batch = LLM(model_dir, num_kv_blocks=256).generate(
        others[:16] + [target] + others[16:], other_params[:16] + [params] + other_params[16:],
        use_tqdm=False)
    assert batch[16].outputs[0].token_ids == alone

    small = LLM(model_dir, num_kv_blocks=14, max_num_batched_tokens=64)
    preempted = small.generate(others[:8] + [target], other_params[:8] + [params], use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert preempted[8].outputs[0].token_ids == alone


def test_n_sequences_share_the_prompt_blocks(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=64)
    prompt = {"prompt_token_ids": list(range(100, 180))}   # 80 tokens = 5 full blocks
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5,
                                              ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "n seeded streams must differ"
    # the two later sequences hit the first one's cached prompt blocks (at most 4 of 5:
    # the last prompt token is always recomputed)
    assert llm.engine.scheduler.kv.prefix_hits >= 2 * 64


def test_stop_string_and_stop_token(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=64)
    free = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = free[0].outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                      ignore_eos=True))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    tok = free[0].outputs[0].token_ids[4]
    by_id = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=20,
                                                        stop_token_ids=[tok], ignore_eos=True))
    ids = by_id[0].outputs[0].token_ids
    assert by_id[0].outputs[0].finish_reason == "stop" and ids[-1] == tok and len(ids) <= 5


def test_chat_uses_the_template(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64)
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    expected = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(conv), add_special_tokens=False)
    assert out.prompt_token_ids == expected and len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("n", 0), ("temperature", -0.1), ("top_k", -5),
                                         ("min_p", 2.0), ("presence_penalty", 3.0),
                                         ("repetition_penalty", 0.0), ("logprobs", 100)])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_prompt_longer_than_max_model_len_is_rejected(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=64, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate({"prompt_token_ids": list(range(100))}, GREEDY)
    assert not llm.engine.has_unfinished()


def test_logprobs_and_prompt_logprobs(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=64)
    ids = list(range(20, 45))
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1,
                                      ignore_eos=True))[0]
    lp = out.outputs[0].logprobs
    assert len(lp) == 3 and all(len(top) == 2 for _, _, top in lp)
    assert all(tok == top[0][0] for tok, _, top in lp), "greedy token is the top-1"
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
