"""Model loading: every way a model directory can be wrong gets its own message; sharded
checkpoints, other dtypes and transformers' own save_pretrained output load and agree."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.model_config import ModelConfig, ModelConfigError
from tessera import LLM, SamplingParams
from worker.loader import CheckpointError, load_model
from worker.runner import ModelRunner, SequenceInput

PROMPT = list(range(3, 40))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _logits(model_dir, dtype="float32") -> torch.Tensor:
    runner = ModelRunner(ModelConfig.from_dir(model_dir), dtype, num_blocks=8, block_size=16)
    return runner.execute([SequenceInput(PROMPT, 0, [0, 1, 2])]).logits


def _rewrite_weights(model_dir, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_directory(tmp_path):
    with pytest.raises(ModelConfigError, match="model directory not found"):
        ModelConfig.from_dir(tmp_path / "nope")


def test_missing_config(tiny_model, tmp_path):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="config.json not found"):
        ModelConfig.from_dir(d)


def test_missing_weights_file(tiny_model, tmp_path):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ModelConfig.from_dir(d))


def test_unsupported_architecture(tiny_model, tmp_path):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="unsupported architectures.*FalconForCausalLM"):
        ModelConfig.from_dir(d)


def test_missing_tensor(tiny_model, tmp_path):
    d = _copy(tiny_model("llama"), tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*layers\.1\.self_attn\.qkv_proj\.weight \[k\]"):
        load_model(ModelConfig.from_dir(d))


def test_extra_tensor(tiny_model, tmp_path):
    d = _copy(tiny_model("qwen2"), tmp_path / "m")
    _rewrite_weights(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="does not use.*mlp.extra.weight"):
        load_model(ModelConfig.from_dir(d))


def test_shape_mismatch(tiny_model, tmp_path):
    d = _copy(tiny_model("gpt2"), tmp_path / "m")
    _rewrite_weights(d, lambda t: t.__setitem__("transformer.h.0.mlp.c_fc.weight",
                                                 torch.zeros(64, 100)))
    with pytest.raises(CheckpointError, match=r"c_fc.weight.*expected shape \(256, 64\).*\(100, 64\)"):
        load_model(ModelConfig.from_dir(d))


def test_sharded_checkpoint_loads_identically(tiny_model, tmp_path):
    src = tiny_model("llama")
    d = _copy(src, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(d / file))
        weight_map.update({n: file for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(_logits(d), _logits(src), atol=0, rtol=0)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards that are missing"):
        load_model(ModelConfig.from_dir(d))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_close_to_fp32(tiny_model, dtype, native, monkeypatch):
    if native:
        monkeypatch.setenv("TESSERA_CPU_HALF", "native")
    d = tiny_model("llama")
    runner = ModelRunner(ModelConfig.from_dir(d), dtype, num_blocks=8, block_size=16)
    # on a CPU without native half-precision matmuls the runner computes in float32
    assert runner.requested_dtype == getattr(torch, dtype)
    assert runner.dtype in (getattr(torch, dtype), torch.float32)
    if native:
        assert runner.dtype == getattr(torch, dtype)
    assert all(p.dtype == runner.dtype for p in runner.model.parameters())
    low = runner.execute([SequenceInput(PROMPT, 0, [0, 1, 2])]).logits
    ref = _logits(d)
    assert torch.corrcoef(torch.stack([low[0], ref[0]]))[0, 1] > 0.99


def test_tied_embeddings_share_one_matrix(tiny_model):
    runner = ModelRunner(ModelConfig.from_dir(tiny_model("qwen2")), num_blocks=4)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_save_pretrained_directory(tiny_model, tmp_path, arch):
    """A directory written by transformers itself (its own key spellings, sharding, dtype
    fields) loads and generates exactly what HF generates."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tiny_model(arch)
    torch.manual_seed(7)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    d = tmp_path / "hf"
    hf.save_pretrained(d, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").exists()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    hf.generation_config.eos_token_id = None
    x = torch.tensor([PROMPT])
    expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                           do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    out = LLM(str(d), num_kv_blocks=16).generate(
        {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected
