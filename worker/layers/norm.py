"""Normalisation layers; with a residual they fuse the add that precedes them."""

from __future__ import annotations

import torch
import torch.nn as nn

from kernels import fused_add_layer_norm, fused_add_rms_norm, layer_norm, rms_norm
from worker.layers.linear import replicated_loader

def _param(shape: int, dtype: torch.dtype, fill: float) -> nn.Parameter:
    p = nn.Parameter(torch.full((shape,), fill, dtype=dtype), requires_grad=False)
    p.weight_loader = replicated_loader
    p.shard_ids = (None,)
    return p


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size, dtype, 1.0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: the normed x. With: (normed x + residual, x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size, dtype, 1.0)
        self.bias = _param(hidden_size, dtype, 0.0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)
