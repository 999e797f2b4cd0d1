"""Linear layers that know how to take their slice of a checkpoint tensor.

Column-parallel layers split the output dimension across tensor-parallel ranks, row-parallel
ones the input dimension (and all-reduce after). Fused projections (q/k/v, gate/up) are one
matrix here and several tensors in a checkpoint: `weight_loader` takes a shard id saying which
part a checkpoint tensor fills. Every loader checks the checkpoint tensor's full shape first,
so a wrong checkpoint fails with both shapes named instead of a silent broadcast.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from worker.layers.cpu_linear import free_plain, linear, pack_weight
from worker.lazy_tensor import as_tensor
from worker.parallel import get_tp_group


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""


def check_shape(expected: tuple[int, ...], loaded: torch.Tensor) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(f"expected shape {tuple(expected)}, checkpoint has {tuple(loaded.shape)}")


def _check_divisible(what: str, n: int, tp_size: int) -> None:
    if n % tp_size:
        raise ValueError(f"{n} {what} cannot be split evenly over tensor-parallel size {tp_size}")


def replicated_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Loader for a parameter every rank holds whole (norms, position tables, unsplit biases)."""
    check_shape(param.shape, loaded)
    param.data.copy_(as_tensor(loaded))


class _Linear(nn.Module):
    """y = x W^T + b with W stored [out_local, in_local].

    Subclasses decide the split and define `weight_loader(param, loaded, shard_id)`.
    """

    # shard ids a checkpoint must provide for this layer (None: one unsplit tensor)
    shard_ids: tuple = (None,)

    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False)
                     if bias else None)
        for p in self.parameters():
            p.weight_loader = self.weight_loader
            p.shard_ids = self.shard_ids
        self.packed_weight: torch.Tensor | None = None   # see worker/layers/cpu_linear.py

    def prepack(self) -> bool:
        """Make the oneDNN-packed copy of the loaded weight (CPU float32 or bf16) and free the plain
        one (restored on demand, worker/layers/cpu_linear.py); True if packed."""
        if self.packed_weight is not None:
            return True   # already packed (the plain copy may be gone)
        self.packed_weight = pack_weight(self.weight)
        if self.packed_weight is not None:
            free_plain(self.weight)
        return self.packed_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class ReplicatedLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        replicated_loader(param, loaded)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        tp = get_tp_group()
        _check_divisible("output features", out_features, tp.size)
        super().__init__(in_features, out_features // tp.size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        local = param.shape[0]
        check_shape((local * self.tp.size, *param.shape[1:]), loaded)
        param.data.copy_(as_tensor(loaded.narrow(0, self.tp.rank * local, local)))


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel projections of the same input in one matrix (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        tp = get_tp_group()
        for size in out_sizes:
            _check_divisible("output features", size, tp.size)
        self.out_sizes = [s // tp.size for s in out_sizes]
        self.shard_ids = tuple(range(len(out_sizes)))
        super().__init__(in_features, sum(self.out_sizes), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = self.out_sizes[shard_id]
        offset = sum(self.out_sizes[:shard_id])
        check_shape((size * self.tp.size, *param.shape[1:]), loaded)
        param.data.narrow(0, offset, size).copy_(as_tensor(loaded.narrow(0, self.tp.rank * size, size)))


class QKVParallelLinear(_Linear):
    """Query, key and value projections in one matrix, split by heads across ranks.

    With fewer KV heads than ranks, each KV head is replicated on the ranks that need it.
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32) -> None:
        tp = get_tp_group()
        _check_divisible("attention heads", num_heads, tp.size)
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over tensor-parallel size "
                             f"{tp.size} (one must divide the other)")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.sizes = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        self.full_rows = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                          "v": num_kv_heads * head_dim}
        super().__init__(hidden_size, q + 2 * kv, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset, size = self.sizes[shard_id]
        check_shape((self.full_rows[shard_id], *param.shape[1:]), loaded)
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(as_tensor(loaded.narrow(0, rank * size, size)))


class RowParallelLinear(_Linear):
    """Input features split across ranks; partial outputs are all-reduced.

    The bias is added once, after the reduction (adding it on every rank would count it
    `size` times).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        tp = get_tp_group()
        _check_divisible("input features", in_features, tp.size)
        super().__init__(in_features // tp.size, out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias, self.packed_weight)
        y = self.tp.all_reduce(linear(x, self.weight, None, self.packed_weight))
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: not split
            replicated_loader(param, loaded)
            return
        local = param.shape[1]
        check_shape((param.shape[0], local * self.tp.size), loaded)
        param.data.copy_(as_tensor(loaded.narrow(1, self.tp.rank * local, local)))
