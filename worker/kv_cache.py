"""The paged KV cache tensors a worker holds: per layer, keys and values laid out as blocks."""

from __future__ import annotations

import torch

from common.model_config import ModelConfig
from worker.parallel import get_tp_group


def local_kv_heads(cfg: ModelConfig) -> int:
    """KV heads this rank holds (at least one: KV heads are replicated past the head count)."""
    return max(1, cfg.num_kv_heads // get_tp_group().size)


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * local_kv_heads(cfg) * cfg.head_dim * elem


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(k_cache, v_cache)] per layer, each [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, local_kv_heads(cfg), cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
