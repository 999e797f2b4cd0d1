"""Rotary position embedding as a layer: owns the float32 cos/sin table for all positions."""

from __future__ import annotations

import torch
import torch.nn as nn

from common.model_config import RopeConfig
from kernels import apply_rotary, build_cos_sin_cache, rope_inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope.theta, rope.rope_type, rope.factor,
                                 rope.low_freq_factor, rope.high_freq_factor,
                                 rope.original_max_position_embeddings)
        # Not a state-dict entry: checkpoints never carry it and it never changes.
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(inv_freq, max_positions),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotates q [T, Hq, D] and k [T, Hkv, D] in place."""
        apply_rotary(positions, q, k, self.cos_sin_cache)
