"""Tensor and pipeline parallelism on the CPU (gloo): each rank holds only its shard, and a
sharded model's greedy outputs equal a single worker's and Hugging Face's (fp32)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from tessera.procs import free_port
from tessera import LLM, SamplingParams
from test_model_equivalence import NEW_TOKENS, _hf_reference, _prompts, assert_same_greedy


def _probe(rank: int, tp: int, pp: int, addr: str, model_dir: str, out) -> None:
    """One rank of a group: build the model, report its parameters and what it read."""
    from common.model_config import ModelConfig
    from worker import lazy_tensor
    from worker.loader import load_model
    from worker.parallel import init_worker_group

    init_worker_group(tp, pp, rank, f"tcp://{addr}", "gloo", timeout_s=60)
    model = load_model(ModelConfig.from_dir(model_dir))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out.put((rank, shapes, lazy_tensor.elements_read))


def _shards(model_dir: str, tp: int, pp: int) -> dict[int, tuple[dict, int]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_probe, args=(r, tp, pp, addr, model_dir, out))
             for r in range(tp * pp)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, shapes, read = out.get(timeout=120)
        results[rank] = (shapes, read)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_tp2_ranks_hold_half_of_each_sharded_weight_and_read_no_more(tiny_model):
    model_dir = str(tiny_model("llama"))
    full = _shards(model_dir, 1, 1)[0][0]
    ranks = _shards(model_dir, 2, 1)
    split_rows = ("qkv_proj.weight", "gate_up_proj.weight", "embed_tokens.weight", "lm_head.weight")
    split_cols = ("o_proj.weight", "down_proj.weight")
    for rank, (shapes, read) in ranks.items():
        assert shapes.keys() == full.keys()
        for name, shape in shapes.items():
            whole = full[name]
            if name.endswith(split_rows):
                assert shape == (whole[0] // 2, whole[1]), name
            elif name.endswith(split_cols):
                assert shape == (whole[0], whole[1] // 2), name
            else:
                assert shape == whole and len(shape) == 1, name   # norms: replicated
        held = sum(torch.Size(s).numel() for s in shapes.values())
        assert held < 0.6 * sum(torch.Size(s).numel() for s in full.values())
        # Each rank read its own slices from the checkpoint, never a whole sharded tensor.
        assert read == held, (rank, read, held)


def test_pp2_stages_hold_their_layers_only(tiny_model):
    model_dir = str(tiny_model("qwen2"))   # tied embeddings: the last stage loads its own copy
    ranks = _shards(model_dir, 1, 2)
    first, last = ranks[0][0], ranks[1][0]
    assert any(n.startswith("model.layers.0.") for n in first)
    assert not any(n.startswith("model.layers.1.") for n in first)
    assert not any(n.startswith("model.layers.0.") for n in last)
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "model.norm.weight" in last
    assert "model.embed_tokens.weight" not in last
    for shapes, read in ranks.values():
        assert read == sum(torch.Size(s).numel() for s in shapes.values())


GROUPS = [("llama", 2, 1), ("llama", 1, 2), ("llama", 2, 2), ("qwen2", 2, 2), ("gpt2", 2, 2)]


@pytest.fixture(scope="module")
def references(tiny_model):
    """Per arch: the prompts, HF's greedy references and a single worker's outputs."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model_dir = str(tiny_model(arch))
            prompts = _prompts(512)[::2]   # 1, 16, 64 and 150 tokens
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
            single = LLM(model_dir).generate([{"prompt_token_ids": p} for p in prompts], params,
                                             use_tqdm=False)
            cache[arch] = (model_dir, prompts, _hf_reference(model_dir, prompts),
                           [o.outputs[0].token_ids for o in single])
        return cache[arch]

    return get


@pytest.mark.parametrize("arch,tp,pp", GROUPS, ids=[f"{a}-tp{t}-pp{p}" for a, t, p in GROUPS])
def test_sharded_offline_greedy_matches_single_worker_and_hf(references, arch, tp, pp):
    model_dir, prompts, hf, single = references(arch)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             kv_cache_memory_gb=8 / 1024) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, (hf_tokens, hf_logprobs, _), one in zip(outs, hf, single):
        ours = out.outputs[0].token_ids
        assert_same_greedy(ours, hf_tokens, hf_logprobs)
        assert_same_greedy(ours, one, hf_logprobs)
