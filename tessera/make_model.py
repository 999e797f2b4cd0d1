"""Write random-weight Hugging Face checkpoints with a real tokenizer (``tessera make-model``).

There is no model hub in our tests, demos or benchmarks, so we manufacture checkpoints that
HF transformers loads as-is: it is the correctness oracle for our own model code. Weights are
random but deterministic for a seed, and initialised so a random model still has peaked
next-token distributions (greedy comparisons against HF must not hinge on near-ties).

This module must not import transformers: it is a runtime feature and transformers is only a
test dependency.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.config import DTYPES
from common.model_config import ARCHITECTURES
from tessera.tokenizer_build import FAMILIES, Family, tokenizer_json

if TYPE_CHECKING:  # torch is imported where weights are made, so the CLI parses flags fast
    import torch

# Our families and the HF `architectures` name each is written with (common/model_config.py).
_ARCHITECTURES = {family: hf_name for hf_name, family in ARCHITECTURES.items()}
# Qwen3's tests use checkpoints transformers itself makes (tests/test_qwen3.py): its q/k norms
# are not among the tensors this writer knows.
ARCHS = tuple(f for f in _ARCHITECTURES if f != "qwen3")


@dataclass(frozen=True)
class Preset:
    """Model dimensions shared by every architecture; arch specifics are applied in ``_config``."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    gpt2_positions: int
    sliding_window: int
    llama3_scaling: bool
    # The benchmark model is untied everywhere (except GPT-2, which HF always ties) so that
    # its parameter count and lm_head cost match a typical Llama-style checkpoint.
    untie_all: bool = False
    # Qwen2's tiny/small presets use a GQA ratio of 4 to exercise a different grouping.
    qwen2_kv_heads: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176,
                   vocab_size=512, max_position_embeddings=2048, gpt2_positions=1024,
                   sliding_window=48, llama3_scaling=True, qwen2_kv_heads=1),
    "small": Preset(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688,
                    vocab_size=4096, max_position_embeddings=2048, gpt2_positions=2048,
                    sliding_window=512, llama3_scaling=False, qwen2_kv_heads=2),
    # THE benchmark model (about 60M parameters as llama); other archs take the same dims.
    "bench": Preset(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536,
                    vocab_size=32000, max_position_embeddings=4096, gpt2_positions=4096,
                    sliding_window=4096, llama3_scaling=False, untie_all=True),
}


def _family(arch: str) -> Family:
    """Tokenizer family: qwen2 differs from llama only in its pre-tokenizer (see tokenizer_build)."""
    return "gpt2" if arch == "gpt2" else "qwen2" if arch == "qwen2" else "llama"


def _special_ids(arch: str, vocab_size: int) -> tuple[int, int, int]:
    """(bos, eos, im_end) ids: special tokens sit right after the learned vocabulary."""
    specials = FAMILIES[_family(arch)]
    tok = json.loads(tokenizer_json(vocab_size, _family(arch)))
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    return ids[specials.bos], ids[specials.eos], ids["<|im_end|>"]


def _config(arch: str, p: Preset, dtype: str, bos: int, eos: int) -> dict[str, Any]:
    """config.json written by hand, with the legacy (v4) key names other servers also read."""
    common = {"architectures": [_ARCHITECTURES[arch]], "model_type": arch, "vocab_size": p.vocab_size,
              "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": dtype, "dtype": dtype,
              "initializer_range": 0.02, "use_cache": True}
    if arch == "gpt2":
        return {**common, "n_embd": p.hidden_size, "n_layer": p.num_layers, "n_head": p.num_heads,
                "n_positions": p.gpt2_positions, "n_inner": None, "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "tie_word_embeddings": True}
    kv_heads = p.qwen2_kv_heads if arch == "qwen2" and p.qwen2_kv_heads else p.num_kv_heads
    rope_theta = 1_000_000.0 if arch == "qwen2" else 10_000.0
    rope_scaling = None
    if arch == "llama" and p.llama3_scaling:
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = {**common, "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
           "num_hidden_layers": p.num_layers, "num_attention_heads": p.num_heads,
           "num_key_value_heads": kv_heads, "head_dim": p.head_dim, "hidden_act": "silu",
           "max_position_embeddings": p.max_position_embeddings,
           "rms_norm_eps": 1e-6 if arch == "qwen2" else 1e-5, "rope_theta": rope_theta,
           "rope_scaling": rope_scaling, "attention_dropout": 0.0,
           "tie_word_embeddings": arch == "qwen2" and not p.untie_all}
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "mistral":
        cfg.update(sliding_window=p.sliding_window)
    elif arch == "qwen2":
        # Qwen2's q/k/v bias is implied by the architecture in HF; attention_bias documents it
        # for readers of the config. sliding_window is inert while use_sliding_window is false.
        cfg.update(attention_bias=True, use_sliding_window=False, sliding_window=p.max_position_embeddings,
                   max_window_layers=p.num_layers)
    return cfg


# (shape, kind, fan_in); kind selects the init rule in _init_tensor.
_Spec = tuple[tuple[int, ...], str, int]


def _tensor_specs(arch: str, cfg: dict[str, Any]) -> dict[str, _Spec]:
    """Every tensor HF's modeling code expects, by its HF name."""
    specs: dict[str, _Spec] = {}
    if arch == "gpt2":
        d, v, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
        specs["transformer.wte.weight"] = ((v, d), "embed", d)
        specs["transformer.wpe.weight"] = ((n, d), "embed", d)
        # Conv1D stores weights as [in, out], so fan_in is the first dimension.
        for i in range(cfg["n_layer"]):
            h = f"transformer.h.{i}"
            for ln in ("ln_1", "ln_2"):
                specs[f"{h}.{ln}.weight"] = ((d,), "norm", d)
                specs[f"{h}.{ln}.bias"] = ((d,), "bias", d)
            for name, fan_in, fan_out in (("attn.c_attn", d, 3 * d), ("attn.c_proj", d, d),
                                          ("mlp.c_fc", d, 4 * d), ("mlp.c_proj", 4 * d, d)):
                specs[f"{h}.{name}.weight"] = ((fan_in, fan_out), "linear", fan_in)
                specs[f"{h}.{name}.bias"] = ((fan_out,), "bias", fan_in)
        specs["transformer.ln_f.weight"] = ((d,), "norm", d)
        specs["transformer.ln_f.bias"] = ((d,), "bias", d)
        return specs

    d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    specs["model.embed_tokens.weight"] = ((v, d), "embed", d)
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        specs[f"{layer}.input_layernorm.weight"] = ((d,), "norm", d)
        specs[f"{layer}.post_attention_layernorm.weight"] = ((d,), "norm", d)
        # nn.Linear stores weights as [out, in].
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            specs[f"{layer}.self_attn.{name}.weight"] = ((out, d), "linear", d)
            if arch == "qwen2":
                specs[f"{layer}.self_attn.{name}.bias"] = ((out,), "bias", d)
        specs[f"{layer}.self_attn.o_proj.weight"] = ((d, q_out), "linear", q_out)
        specs[f"{layer}.mlp.gate_proj.weight"] = ((f, d), "linear", d)
        specs[f"{layer}.mlp.up_proj.weight"] = ((f, d), "linear", d)
        specs[f"{layer}.mlp.down_proj.weight"] = ((d, f), "linear", f)
    specs["model.norm.weight"] = ((d,), "norm", d)
    if not cfg["tie_word_embeddings"]:
        specs["lm_head.weight"] = ((v, d), "lm_head", d)
    return specs


# NOTE: an untied lm_head of std c/sqrt(hidden) gives logits of std about c (the final norm
# leaves unit-RMS hidden states). c = 2 left the median top-1 probability of tiny/small llama
# at 0.03-0.10 (near-ties everywhere); c = 8 matches the logit scale of the tied presets
# (N(0, 1) embeddings, std sqrt(64) = 8 for tiny) and gives a median top-1 of about 0.6-0.75.
LM_HEAD_STD = 8.0


def _init_tensor(shape: tuple[int, ...], kind: str, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """Peaked-distribution init: unit embeddings, variance-preserving linears, a wide lm_head."""
    import torch

    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "embed":
        return x
    if kind == "linear":
        return x / math.sqrt(fan_in)
    if kind == "lm_head":
        return x * (LM_HEAD_STD / math.sqrt(fan_in))
    if kind == "norm":
        return 1.0 + 0.1 * x
    if kind == "bias":
        return 0.1 * x
    raise ValueError(f"unknown tensor kind {kind!r}")


def random_state_dict(arch: str, cfg: dict[str, Any], seed: int, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Deterministic weights: one generator, tensors drawn in sorted-name order, cast last."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    specs = _tensor_specs(arch, cfg)
    target = getattr(torch, dtype)
    return {name: _init_tensor(*specs[name], gen).to(target).contiguous() for name in sorted(specs)}


def num_parameters(arch: str, preset: str = "tiny") -> int:
    """Parameter count of a preset, from its config alone (no weights are built)."""
    p = PRESETS[preset]
    cfg = _config(arch, p, "float32", 0, 0)
    return sum(math.prod(shape) for shape, _, _ in _tensor_specs(arch, cfg).values())


def _tokenizer_config(arch: str, vocab_size: int, max_len: int) -> dict[str, Any]:
    specials = FAMILIES[_family(arch)]
    return {
        # NOTE: transformers 5 maps model_type "llama" to LlamaTokenizer, which rebuilds a
        # SentencePiece-style (Metaspace) pipeline; naming the generic fast class makes
        # AutoTokenizer load tokenizer.json exactly as written (TokenizersBackend in v5).
        # For model_type "qwen2" HF forces Qwen2Tokenizer whatever this says, hence the
        # qwen2 tokenizer family.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "add_bos_token": specials.add_bos,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": specials.chat_template,
        # Qwen2Tokenizer (forced by transformers 5 for model_type qwen2) would otherwise add
        # its default "<|endoftext|>" unk/pad token, growing the vocabulary past the config's.
        "unk_token": None,
        "pad_token": None,
    }


def make_model(out_dir: str | pathlib.Path, arch: str, preset: str = "tiny", seed: int = 0,
               dtype: str = "float32") -> pathlib.Path:
    """Write a complete HF checkpoint directory and return its path.

    Raises ValueError for an unknown arch, preset or dtype.
    Files: config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json (with the chat template). Existing files of the same names are
    overwritten; other files in ``out_dir`` are left alone.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    p = PRESETS[preset]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bos, eos, im_end = _special_ids(arch, p.vocab_size)
    cfg = _config(arch, p, dtype, bos, eos)
    max_len = cfg.get("n_positions", cfg.get("max_position_embeddings"))
    gen_cfg = {"bos_token_id": bos, "eos_token_id": sorted({eos, im_end}), "do_sample": False}

    from safetensors.torch import save_file

    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", gen_cfg)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(arch, p.vocab_size, max_len))
    (out / "tokenizer.json").write_text(tokenizer_json(p.vocab_size, _family(arch)), encoding="utf-8")
    save_file(random_state_dict(arch, cfg, seed, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _write_json(path: pathlib.Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
