"""Write a GGUF file from an HF checkpoint directory, as llama.cpp's convert_hf_to_gguf.py does
(its key names, tensor names, q/k row permutation for Llama, GPT-2's [out, in] layout), with
`gguf`'s own writer and quantizer. Tests use it for small random models of every family."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from worker.gguf_loader import _GPT2_LAYER, _GPT2_NAMES, _LLAMA_LAYER, _LLAMA_NAMES

_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2"}


def _gguf_name(arch: str, hf: str) -> str:
    fixed, per_layer, prefix = ((_GPT2_NAMES, _GPT2_LAYER, "transformer.h.") if arch == "gpt2"
                                else (_LLAMA_NAMES, _LLAMA_LAYER, "model.layers."))
    if not hf.startswith("transformer.") and arch == "gpt2":
        hf = "transformer." + hf
    for g, h in fixed.items():
        if h == hf:
            return g
    layer, rest = hf[len(prefix):].split(".", 1)
    module, kind = rest.rsplit(".", 1)
    g = next(g for g, h in per_layer.items() if h == module)
    return f"blk.{layer}.{g}.{kind}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (HF's half-split RoPE rows -> interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _add(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], str):
        writer.add_array(key, value)
    elif value and isinstance(value[0], float):
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    else:
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)


def write_metadata_only(out: str | pathlib.Path, arch: str, meta: dict[str, Any]) -> pathlib.Path:
    """A GGUF with metadata and no tensors (enough for the config and tokenizer readers)."""
    import gguf

    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in meta.items():
        _add(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(out)


def write_gguf(model_dir: str | pathlib.Path, out: str | pathlib.Path, quant: str = "F32",
               chat_template: str | None = None, tokenizer_model: str = "gpt2",
               extra: dict[str, Any] | None = None) -> pathlib.Path:
    """`model_dir` (config.json, model.safetensors, tokenizer.json) as one GGUF file; 2-D
    weights stored as `quant` (F32, F16, Q8_0, Q4_0, ...), norms and biases as F32."""
    import gguf

    root = pathlib.Path(model_dir)
    cfg = json.loads((root / "config.json").read_text())
    arch = _ARCH[cfg["architectures"][0]]
    writer = gguf.GGUFWriter(str(out), arch)
    meta: dict[str, Any] = {"general.name": root.name}
    a = f"{arch}."
    if arch == "gpt2":
        meta.update({a + "block_count": cfg["n_layer"], a + "embedding_length": cfg["n_embd"],
                     a + "attention.head_count": cfg["n_head"],
                     a + "context_length": cfg["n_positions"],
                     a + "feed_forward_length": cfg.get("n_inner") or 4 * cfg["n_embd"],
                     a + "attention.layer_norm_epsilon": float(cfg["layer_norm_epsilon"])})
    else:
        rope = cfg.get("rope_parameters") or {}
        meta.update({a + "block_count": cfg["num_hidden_layers"],
                     a + "embedding_length": cfg["hidden_size"],
                     a + "attention.head_count": cfg["num_attention_heads"],
                     a + "attention.head_count_kv": cfg["num_key_value_heads"],
                     a + "context_length": cfg["max_position_embeddings"],
                     a + "feed_forward_length": cfg["intermediate_size"],
                     a + "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
                     a + "rope.freq_base": float(rope.get("rope_theta",
                                                          cfg.get("rope_theta", 10000.0)))})
        if cfg.get("head_dim"):
            meta[a + "attention.key_length"] = meta[a + "attention.value_length"] = cfg["head_dim"]
            meta[a + "rope.dimension_count"] = cfg["head_dim"]
    meta[a + "vocab_size"] = cfg["vocab_size"]
    tok = json.loads((root / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    meta.update({"tokenizer.ggml.model": tokenizer_model, "tokenizer.ggml.pre": "default",
                 "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                 "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
                 "tokenizer.ggml.add_bos_token": False})
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(key), int):
            meta[f"tokenizer.ggml.{key}"] = cfg[key]
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    meta.update(extra or {})
    for key, value in meta.items():
        _add(writer, key, value)

    qtype = gguf.GGMLQuantizationType[quant]
    for name, t in load_file(str(root / "model.safetensors")).items():
        if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
            continue
        w = t.to(torch.float32).numpy()
        if arch == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = np.ascontiguousarray(w.T)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = _permute(w, cfg["num_attention_heads"])
        if arch == "llama" and name.endswith("k_proj.weight"):
            w = _permute(w, cfg["num_key_value_heads"])
        target = _gguf_name(arch, name)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and w.shape[1] % block == 0:
            # (rows not a whole number of blocks stay F32, as llama.cpp's converter falls back)
            try:
                data = gguf.quants.quantize(w, qtype)
            except NotImplementedError:   # no quantizer (e.g. Q8_1): zero blocks, for error tests
                data = np.zeros((w.shape[0], w.shape[1] // block * gguf.GGML_QUANT_SIZES[qtype][1]),
                                np.uint8)
            writer.add_tensor(target, data, raw_dtype=qtype)
        else:
            writer.add_tensor(target, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(out)
