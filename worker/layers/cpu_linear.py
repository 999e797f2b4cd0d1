"""float32 (and bfloat16) linear layers on CPU through oneDNN with weights reordered once
("prepacked").

`F.linear` hands MKL the weight as stored and MKL repacks it on every call; at the small row
counts of decode steps that repacking is a large share of the matmul (CPU_PERF_NOTES.md:
prepacked weights run 1.2-2.3x faster at 32-64 rows, and no slower at thousands). The packed
copy is made after the weights are loaded (`prepack_linears`, called by the model runner).

NOTE on memory: keeping both copies doubled a CPU fp32 model's weight memory. Once packed, a
layer's plain `weight` is freed (`free_plain`: an empty tensor; the tied LM head keeps it, the
embedding reads it). The fast path never reads it; the torch paths that do (`F.linear`: the
`torch` kernel backend, another dtype or device) first restore it from the packed copy, once
and exactly (x = I through the packed weight gives W^T: one product per output), and it stays.
`TESSERA_CPU_PREPACK=0` or the `torch` kernel backend turn the packing off.

A bfloat16 model is packed too where it computes in bfloat16 (a CPU with AMX or AVX512-BF16:
worker/runner.py `compute_dtype`); there oneDNN's packed AMX kernels ran 1.2-1.7x faster than
`F.linear` at 64 rows (one weight in a loop, a Xeon with AMX). Where oneDNN refuses to pack
(no native bf16), the layer keeps its plain weight.
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


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of a [out, in] float32 or bfloat16 CPU weight, or None where not
    applicable."""
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or not prepack_available():
        return None
    with torch.inference_mode(False), torch.no_grad():
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                           _PACK_ROWS_HINT)
        except RuntimeError:   # e.g. bfloat16 on a CPU without native bf16
            if weight.dtype == torch.float32:
                raise
            return None


def free_plain(weight: torch.Tensor) -> None:
    """Drop the plain copy of a packed weight (in place: the parameter object stays)."""
    weight.data = torch.empty(0, dtype=weight.dtype)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The plain [out, in] weight of a packed one, exactly: the identity through it is W^T."""
    eye = torch.eye(packed.shape[1], dtype=packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(eye, packed, None, "none", [], "").t().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b, through the packed weight when there is one and x is of its dtype on the CPU.
    `weight` is the layer's parameter: a freed one is restored here when the plain path runs."""
    if packed is None or x.dtype != packed.dtype or x.device.type != "cpu" \
            or kernel_backend() == "torch":
        if packed is not None and weight.numel() == 0:
            weight.data = unpack_weight(packed)   # once: the parameter keeps it from now on
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias, packed).view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack_linears(model: nn.Module) -> int:
    """Pack every layer that has a `prepack()` method (each frees its plain copy where
    nothing else reads it); returns how many were packed."""
    return sum(bool(m.prepack()) for m in model.modules() if hasattr(m, "prepack"))
