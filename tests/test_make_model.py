"""`tessera make-model` writes checkpoints that HF transformers loads exactly as intended."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tessera.make_model import ARCHS, PRESETS, make_model, num_parameters

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _load_hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_writes_a_checkpoint_hf_loads_without_key_problems(tiny_model, arch):
    model_dir = tiny_model(arch)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(FILES)

    model, info = _load_hf(model_dir)
    assert type(model).__name__ == HF_CLASS[arch]
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info

    # Every stored tensor landed in the HF model unchanged (catches transposed Conv1D weights
    # that would load with a silent reshape, and a tied head that ignores our embedding).
    hf_state = model.state_dict()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            assert torch.equal(hf_state[name], f.get_tensor(name)), name
    head = model.get_output_embeddings().weight
    tied = arch in ("qwen2", "gpt2")
    assert (head.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_has_peaked_next_token_distributions(tiny_model, arch):
    # Greedy comparisons against HF must not hinge on near-ties: most positions should put
    # a clear majority of the mass on one token.
    model_dir = tiny_model(arch)
    model, _ = _load_hf(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok("import os\nimport sys\n\ndef main(argv):\n    return 0  # done")["input_ids"]])
    with torch.no_grad():
        probs = model(ids).logits[0].float().softmax(-1)
    assert probs.max(-1).values.median().item() > 0.4


def test_llama_config_as_hf_reads_it(tiny_model):
    cfg = transformers.AutoConfig.from_pretrained(tiny_model("llama"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 16, 176)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (512, 2048, False)
    assert cfg.rms_norm_eps == 1e-5 and cfg.dtype == torch.float32
    # The legacy rope_theta + rope_scaling keys we write become v5's rope_parameters.
    assert cfg.rope_parameters == {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }


def test_mistral_qwen2_gpt2_configs_as_hf_reads_them(tiny_model):
    mistral = transformers.AutoConfig.from_pretrained(tiny_model("mistral"))
    assert mistral.sliding_window == 48 and mistral.num_key_value_heads == 2
    assert mistral.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert mistral.tie_word_embeddings is False

    qwen2 = transformers.AutoConfig.from_pretrained(tiny_model("qwen2"))
    assert (qwen2.num_attention_heads, qwen2.num_key_value_heads) == (4, 1)
    assert qwen2.rope_parameters == {"rope_type": "default", "rope_theta": 1000000.0}
    assert qwen2.tie_word_embeddings is True and qwen2.rms_norm_eps == 1e-6
    assert qwen2.use_sliding_window is False and qwen2.sliding_window is None

    gpt2 = transformers.AutoConfig.from_pretrained(tiny_model("gpt2"))
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_positions, gpt2.vocab_size) == (64, 2, 4, 1024, 512)
    assert gpt2.n_inner is None and gpt2.activation_function == "gelu_new"
    assert gpt2.tie_word_embeddings is True and gpt2.layer_norm_epsilon == 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_special_token_ids_agree_across_files(tiny_model, arch):
    model_dir = tiny_model(arch)
    cfg = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert cfg["eos_token_id"] == tok.eos_token_id and cfg["bos_token_id"] == tok.bos_token_id
    assert gen["do_sample"] is False
    assert sorted(gen["eos_token_id"]) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model, tmp_path):
    first = tiny_model("llama")
    again = make_model(tmp_path / "again", "llama")
    other = tiny_model("llama", seed=1)
    for name in FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    # Only the weights depend on the seed.
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_bfloat16_checkpoint_stores_bf16(tiny_model):
    model_dir = tiny_model("llama", dtype="bfloat16")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes == {torch.bfloat16}
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert transformers.AutoConfig.from_pretrained(model_dir).dtype == torch.bfloat16
    # The bf16 weights are the float32 ones rounded: casting happens after generation.
    f32 = tiny_model("llama")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as a, safe_open(str(f32 / "model.safetensors"), "pt") as b:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(a.get_tensor(name), b.get_tensor(name).to(torch.bfloat16))


def test_bench_preset_is_about_60m_parameters():
    # Counted from the config alone: building the 32000-token bench model is left to benchmarks.
    assert num_parameters("llama", "bench") == 60_039_680
    p = PRESETS["bench"]
    assert (p.hidden_size, p.num_layers, p.num_heads, p.num_kv_heads) == (512, 8, 8, 8)
    assert (p.intermediate_size, p.vocab_size, p.max_position_embeddings) == (1536, 32000, 4096)
    assert num_parameters("llama", "small") < num_parameters("llama", "bench")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_make_model_writes_a_checkpoint(tmp_path, tiny_model):
    out = tmp_path / "cli-gpt2"
    result = _cli("make-model", str(out), "--arch", "gpt2", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "gpt2/tiny" in result.stdout
    # Identical to the library call with the same arguments.
    ref = tiny_model("gpt2")
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--arch", "bert"), "invalid choice: 'bert'"),
        (("--arch", "llama", "--preset", "huge"), "invalid choice: 'huge'"),
        (("--arch", "llama", "--dtype", "int8"), "invalid choice: 'int8'"),
        ((), "the following arguments are required: --arch"),
    ],
)
def test_cli_rejects_bad_arguments_clearly(tmp_path, args, message):
    result = _cli("make-model", str(tmp_path / "m"), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "m").exists()


def test_library_rejects_unknown_arch_and_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'bert'"):
        make_model(tmp_path, "bert")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_model(tmp_path, "llama", preset="huge")
