"""GPT-2: learned absolute positions, LayerNorm, GELU, fused q/k/v in Conv1D layout."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from common.model_config import ModelConfig
from kernels import gelu_tanh
from worker.attn_metadata import AttentionMetadata
from worker.layers.attention import Attention
from worker.layers.embed import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                  check_shape, replicated_loader)
from worker.layers.norm import LayerNorm
from worker.layers.pipeline import layer_index, stage_layers
from worker.parallel import get_pp_stage

KVCache = tuple[torch.Tensor, torch.Tensor]
# Old checkpoints store attention-mask buffers next to the weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.c_attn = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                        cfg.num_heads, bias=True, dtype=dtype)
        self.size = self.c_attn.num_heads * cfg.head_dim
        self.c_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype)
        self.attn = Attention(self.c_attn.num_heads, cfg.head_dim, self.c_attn.num_heads,
                              cfg.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split([self.size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True,
                                         dtype=dtype)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True,
                                        dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.attn = GPT2Attention(cfg, dtype)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mlp = GPT2MLP(cfg, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.ln_1(x)
        else:
            x, residual = self.ln_1(x, residual)
        x = self.attn(x, kv_cache, meta)
        x, residual = self.ln_2(x, residual)
        return self.mlp(x), residual


class PositionEmbedding(nn.Module):
    """Learned absolute positions, replicated on every rank (small)."""

    def __init__(self, max_positions: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = replicated_loader
        self.weight.shard_ids = (None,)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class GPT2Model(nn.Module):
    """Per pipeline stage as LlamaModel: embeddings first, ln_f last."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        pp = get_pp_stage()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype) if pp.is_first else None
        self.wpe = (PositionEmbedding(cfg.max_position_embeddings, cfg.hidden_size, dtype)
                    if pp.is_first else None)
        self.h, self.start, self.end = stage_layers(cfg.num_layers, lambda i: GPT2Block(cfg, dtype))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype) if pp.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata, intermediate=None):
        if intermediate is None:
            x, residual = self.wte(input_ids) + self.wpe(positions), None
        else:
            x, residual = intermediate
        for block, kv_cache in zip(self.h[self.start:self.end], kv_caches):
            x, residual = block(x, residual, kv_cache, meta)
        if self.ln_f is None:
            return x, residual
        return self.ln_f(x, residual)[0]


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = GPT2Model(cfg, dtype)
        pp = get_pp_stage()
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype) if pp.is_last else None
        if pp.is_first and pp.is_last:
            self.lm_head.tie_to(self.transformer.wte)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata, intermediate=None):
        return self.transformer(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def map_checkpoint_tensor(self, name: str, tensor: torch.Tensor
                              ) -> Iterator[tuple[str, object, torch.Tensor]]:
        """Yields (parameter name, shard id, tensor); Conv1D weights are [in, out]: transposed."""
        if name.endswith(_BUFFERS) or name == "lm_head.weight":
            return
        if not name.startswith("transformer."):
            name = "transformer." + name  # the original checkpoints have no prefix
        t = self.transformer
        if name.endswith(".wte.weight"):
            if t.wte is not None:
                yield name, None, tensor
            if t.wte is None and self.lm_head is not None:
                yield "lm_head.weight", None, tensor   # tied: a last stage without wte
            return
        layer = layer_index(name)
        if ((layer is not None and not t.start <= layer < t.end)
                or (".wpe." in name and t.wpe is None) or (".ln_f." in name and t.ln_f is None)):
            return  # another pipeline stage's tensor
        conv1d = name.endswith(".weight") and any(
            f".{m}.weight" in name for m in ("c_attn", "c_proj", "c_fc"))
        if conv1d:
            tensor = tensor.t()
        if ".c_attn." in name:
            hidden = self.cfg.hidden_size
            check_shape((3 * hidden, *tensor.shape[1:]), tensor)
            for shard, part in zip("qkv", tensor.split(hidden, dim=0)):
                yield name, shard, part
            return
        yield name, None, tensor
