"""What we need to know about a Hugging Face model directory, parsed once from its config.json
(or about a single GGUF file, from its metadata: `common/gguf_config.py`).

Every service reads the same frozen `ModelConfig`: the worker to build the model, the scheduler
for the context length and stop ids, the gateway for the context length. It accepts both the
transformers 4.x key spellings (`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5.x ones
(`rope_parameters`, `dtype`), so directories written by either version load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import gguf_config
from common.gguf_file import GGUFError, is_gguf, open_gguf

# HF `architectures` name -> our model family: the one list of supported architectures. The
# worker's registry maps each family to its class; make-model writes these names.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
}
# A config without `architectures` names its class by `model_type`, as transformers reads it.
MODEL_TYPES: dict[str, str] = {family: arch for arch, family in ARCHITECTURES.items()}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """A model directory or its config.json cannot be used; the message says exactly why."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope: RopeConfig | None = None
    # One entry per layer: the sliding window (number of keys a query sees, itself included)
    # or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes each head of q and k (RMSNorm over head_dim) before RoPE."""
        return self.family == "qwen3"

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir)
        if is_gguf(path):
            return cls.from_gguf(path)
        if not path.is_dir():
            raise ModelConfigError(f"model directory not found: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelConfigError(f"config.json not found in model directory {path}")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dict(raw, model_dir=str(path), generation=gen)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ModelConfig":
        """The config of a single GGUF file, from its metadata (`common/gguf_config.py`)."""
        try:
            f = open_gguf(path)
            raw, gen = gguf_config.hf_config(f), gguf_config.generation_config(f)
        except GGUFError as e:
            raise ModelConfigError(str(e)) from None
        return cls.from_dict(raw, model_dir=str(path), generation=gen)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], model_dir: str = "", generation: dict | None = None
                  ) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if not archs and raw.get("model_type") in MODEL_TYPES:
            archs = [MODEL_TYPES[raw["model_type"]]]
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(
                f"unsupported architectures {archs!r} in {model_dir or 'config'}: "
                f"supported are {sorted(ARCHITECTURES)}")
        family = ARCHITECTURES[arch]
        parse = _parse_gpt2 if family == "gpt2" else _parse_llama_family
        fields = parse(raw, family)
        eos = _ids((generation or {}).get("eos_token_id")) or _ids(raw.get("eos_token_id"))
        bos = raw.get("bos_token_id", (generation or {}).get("bos_token_id"))
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return cls(model_dir=model_dir, architecture=arch, family=family,
                   bos_token_id=bos, eos_token_ids=eos, torch_dtype=str(dtype), extra=raw,
                   **fields)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _require(raw: dict, *keys: str) -> Any:
    for k in keys:
        if raw.get(k) is not None:
            return raw[k]
    raise ModelConfigError(f"config.json lacks {' / '.join(keys)}")


def _parse_rope(raw: dict) -> RopeConfig:
    # transformers 5 folds theta and scaling into `rope_parameters`; 4.x had them apart.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(f"unsupported rope_scaling type {rope_type!r}; "
                               f"supported are {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(
        theta=theta, rope_type=rope_type, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", raw.get("max_position_embeddings", 8192))))


def _sliding_windows(raw: dict, family: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if family == "llama" or window is None:
        return (None,) * num_layers
    if family == "mistral":
        return (int(window),) * num_layers
    # qwen2: per-layer types, or the legacy rule (layers from max_window_layers on slide)
    layer_types = raw.get("layer_types")
    if layer_types is None:
        if not raw.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(raw.get("max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ModelConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _parse_llama_family(raw: dict, family: str) -> dict[str, Any]:
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    layers = int(_require(raw, "num_hidden_layers"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelConfigError(f"num_attention_heads {heads} is not a multiple of "
                               f"num_key_value_heads {kv_heads}")
    return dict(
        vocab_size=int(_require(raw, "vocab_size")), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=int(_require(raw, "intermediate_size")),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", family == "qwen2")),
        rope=_parse_rope(raw), sliding_windows=_sliding_windows(raw, family, layers))


def _parse_gpt2(raw: dict, family: str) -> dict[str, Any]:
    hidden = int(_require(raw, "n_embd", "hidden_size"))
    heads = int(_require(raw, "n_head", "num_attention_heads"))
    layers = int(_require(raw, "n_layer", "num_hidden_layers"))
    act = raw.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelConfigError(f"unsupported GPT-2 activation_function {act!r}")
    if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
        raise ModelConfigError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                               "reorder_and_upcast_attn are not supported")
    return dict(
        vocab_size=int(_require(raw, "vocab_size")), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(_require(raw, "n_positions", "max_position_embeddings")),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)), attention_bias=True,
        rope=None, sliding_windows=(None,) * layers)
