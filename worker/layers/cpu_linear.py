"""float32 linear layers on CPU through oneDNN with weights reordered once ("prepacked").

`F.linear` hands MKL the weight as stored and MKL repacks it on every call; at the small row
counts of decode steps that repacking is a large share of the matmul (CPU_PERF_NOTES.md:
prepacked weights run 1.2-2.3x faster at 32-64 rows, and no slower at thousands). The packed
copy is made after the weights are loaded (`prepack_linears`, called by the model runner) and
the layer keeps its plain `weight` too, for the tests, the tied embedding and other devices.
`TESSERA_CPU_PREPACK=0` or the `torch` kernel backend turn it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import kernel_backend

# oneDNN picks the packed layout for a typical row count; any row count works with it.
_PACK_ROWS_HINT = 64


def prepack_available() -> bool:
    return (os.environ.get("TESSERA_CPU_PREPACK", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of a [out, in] float32 CPU weight, or None where not applicable."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not prepack_available():
        return None
    with torch.inference_mode(False), torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_ROWS_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b, through the packed weight when there is one and x is float32 on the CPU."""
    if packed is None or x.dtype != torch.float32 or x.device.type != "cpu" \
            or kernel_backend() == "torch":
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias, packed).view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack_linears(model: nn.Module) -> int:
    """Pack every layer that has a `prepack()` method; returns how many were packed."""
    return sum(bool(m.prepack()) for m in model.modules() if hasattr(m, "prepack"))
