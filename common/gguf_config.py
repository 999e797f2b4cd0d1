"""A Hugging Face `config.json` dict from a GGUF file's metadata.

llama.cpp writes the hyper-parameters under `{arch}.*` keys; we translate them to the keys
transformers writes, so one parser (`ModelConfig.from_dict`) serves both forms and
`tessera convert` can write the same dict as `config.json`. Keys follow llama.cpp's
`gguf-py/gguf/constants.py` (`Keys.LLM`, `Keys.Attention`, `Keys.Rope`).
"""

from __future__ import annotations

from typing import Any

from common.gguf_file import GGUFError, GGUFFile

# GGUF `general.architecture` -> (HF architectures name, HF model_type)
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gpt2": ("GPT2LMHeadModel", "gpt2"),
}

# Families whose attention llama.cpp's converter permutes (q/k rows, for its RoPE layout).
PERMUTED_QK = ("llama", "mistral")


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """The config.json transformers would write for this model."""
    arch = f.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{f.path}: general.architecture {arch!r} is not supported; "
                        f"supported are {sorted(GGUF_ARCHITECTURES)}")
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        return f.require(full) if required else f.get(full, default)

    vocab = key("vocab_size")
    if vocab is None:
        tokens = f.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError(f"{f.path} lacks {arch}.vocab_size and tokenizer.ggml.tokens")
        vocab = len(tokens)
    cfg: dict[str, Any] = {"architectures": [hf_arch], "model_type": model_type,
                           "vocab_size": int(vocab), "torch_dtype": "float32",
                           "tie_word_embeddings": "output.weight" not in f.tensors}
    for name, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        value = f.get(f"tokenizer.ggml.{field}")
        if value is not None:
            cfg[name] = int(value)
    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    layers = int(key("block_count", required=True))
    if arch == "gpt2":
        cfg.update(n_embd=hidden, n_head=heads, n_layer=layers,
                   n_positions=int(key("context_length", required=True)),
                   n_inner=int(key("feed_forward_length", 4 * hidden)),
                   layer_norm_epsilon=float(key("attention.layer_norm_epsilon", 1e-5)),
                   activation_function="gelu_new")
        return cfg
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise GGUFError(f"{f.path}: per-layer {arch}.attention.head_count_kv is not supported")
    head_dim = key("attention.key_length")
    if head_dim is None and arch in PERMUTED_QK:
        head_dim = key("rope.dimension_count")
    cfg.update(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
               num_key_value_heads=int(kv_heads),
               head_dim=int(head_dim) if head_dim is not None else hidden // heads,
               intermediate_size=int(key("feed_forward_length", required=True)),
               max_position_embeddings=int(key("context_length", 2048)),
               rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
               rope_theta=float(key("rope.freq_base", 10000.0)),
               attention_bias="blk.0.attn_q.bias" in f.tensors)
    scaling = _rope_scaling(f, arch)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    window = key("attention.sliding_window")
    if window is not None and arch == "mistral":
        cfg["sliding_window"] = int(window)
    if "rope_freqs.weight" in f.tensors:
        # Llama 3.1-style frequency scaling stored as a tensor of factors, not as metadata.
        raise GGUFError(f"{f.path}: the rope_freqs.weight tensor (llama3 RoPE scaling) is not "
                        "supported")
    return cfg


def _rope_scaling(f: GGUFFile, arch: str) -> dict[str, Any] | None:
    kind = f.get(f"{arch}.rope.scaling.type")
    factor = f.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind not in (None, "linear"):
        raise GGUFError(f"{f.path}: {arch}.rope.scaling.type {kind!r} is not supported "
                        "(only linear)")
    return {"rope_type": "linear", "factor": float(factor)}


def generation_config(f: GGUFFile) -> dict[str, Any]:
    """Stop ids: eos, plus llama.cpp's end-of-turn / end-of-message ids where the file has them."""
    ids = [f.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    out: dict[str, Any] = {}
    if ids:
        out["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    bos = f.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    return out
