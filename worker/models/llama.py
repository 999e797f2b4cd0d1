"""The Llama family: Llama 2/3, Mistral (sliding window), Qwen2 (q/k/v bias) and Qwen3
(per-head RMSNorm on q and k before RoPE, explicit head_dim).

They differ only in config values (bias, sliding windows, RoPE scaling, tied embeddings,
q/k norm), all read from `ModelConfig`, so one definition serves them.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from common.model_config import ModelConfig
from kernels import silu_and_mul
from worker.attn_metadata import AttentionMetadata
from worker.layers.attention import Attention
from worker.layers.embed import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.pipeline import layer_index, stage_layers
from worker.parallel import get_pp_stage
from worker.layers.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.attention_bias, dtype=dtype)
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = heads * cfg.head_dim, kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=False, dtype=dtype)
        # Qwen3: one RMSNorm over head_dim, shared by every head (replicated under TP).
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(heads, cfg.head_dim, kv_heads, cfg.head_dim ** -0.5,
                              cfg.sliding_windows[layer])

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, -1, self.attn.head_dim)
        k = k.view(t, -1, self.attn.head_dim)
        if self.q_norm is not None:
            hd = self.attn.head_dim
            q = self.q_norm(q.reshape(-1, hd)).view(t, -1, hd)
            k = self.k_norm(k.reshape(-1, hd)).view(t, -1, hd)
        self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False, dtype=dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False,
                                           dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer, rotary, dtype)
        self.mlp = LlamaMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """A pipeline stage holds the embedding (first stage), its own layers, and the final
    norm (last stage); `forward` returns the final hidden states on the last stage and the
    (hidden, residual) pair to send on to the next stage elsewhere."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        pp = get_pp_stage()
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
                             if pp.is_first else None)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        self.layers, self.start, self.end = stage_layers(
            cfg.num_layers, lambda i: LlamaDecoderLayer(cfg, i, rotary, dtype))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype) if pp.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        if intermediate is None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate
        for layer, kv_cache in zip(self.layers[self.start:self.end], kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        if self.norm is None:
            return x, residual
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (our fused projection, its shard id)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                      "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", 0),
                      "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype)
        pp = get_pp_stage()
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype) if pp.is_last else None
        if cfg.tie_word_embeddings and pp.is_first and pp.is_last:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata, intermediate=None):
        """Hidden states [T, hidden] of every token in the batch (last stage), or the
        (hidden, residual) pair for the next stage."""
        return self.model(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def map_checkpoint_tensor(self, name: str, tensor: torch.Tensor
                              ) -> Iterator[tuple[str, object, torch.Tensor]]:
        """Yields (parameter name, shard id, tensor) for one checkpoint tensor."""
        if name.endswith("rotary_emb.inv_freq"):
            return  # derived from the config; old checkpoints carry a copy
        if name == "lm_head.weight" and (self.cfg.tie_word_embeddings or self.lm_head is None):
            return  # some tied checkpoints store the shared matrix twice
        if name.endswith("embed_tokens.weight"):
            if self.model.embed_tokens is not None:
                yield name, None, tensor
            if self.cfg.tie_word_embeddings and self.lm_head is not None and \
                    self.model.embed_tokens is None:
                yield "lm_head.weight", None, tensor   # a last stage without the embedding
            return
        layer = layer_index(name)
        if layer is not None and not self.model.start <= layer < self.model.end:
            return  # another pipeline stage's layer
        if name.endswith("norm.weight") and layer is None and self.model.norm is None:
            return
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in self.packed_modules:
                fused, shard = self.packed_modules[part]
                yield ".".join(parts[:i] + [fused] + parts[i + 1:]), shard, tensor
                return
        yield name, None, tensor
