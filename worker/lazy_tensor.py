"""A checkpoint tensor that is read only where a rank needs it.

`narrow`, `split` and `t` change which region will be read; `materialize()` reads that region
alone through safetensors' slicing (memory-mapped), so a tensor-parallel rank reads its half of
a matrix and never the whole model. `elements_read` counts what was read (tests assert it).
"""

from __future__ import annotations

import torch

elements_read = 0


class LazyTensor:
    def __init__(self, source, shape: tuple[int, ...],
                 ranges: tuple[tuple[int, int], ...] | None = None,
                 transposed: bool = False) -> None:
        self._source = source           # a safetensors slice (or a torch.Tensor)
        self._ranges = ranges or tuple((0, n) for n in shape)   # (start, length), stored order
        self._transposed = transposed

    @classmethod
    def from_safetensors(cls, handle, name: str) -> "LazyTensor":
        part = handle.get_slice(name)
        return cls(part, tuple(part.get_shape()))

    @property
    def shape(self) -> tuple[int, ...]:
        dims = tuple(n for _, n in self._ranges)
        return dims[::-1] if self._transposed else dims

    def dim(self) -> int:
        return len(self._ranges)

    def t(self) -> "LazyTensor":
        if self.dim() != 2:
            raise ValueError("t() needs a 2-D tensor")
        return LazyTensor(self._source, (), self._ranges, not self._transposed)

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        dim = dim % self.dim()
        stored = self.dim() - 1 - dim if self._transposed else dim
        offset, size = self._ranges[stored]
        if start < 0 or length < 0 or start + length > size:
            raise IndexError(f"narrow({dim}, {start}, {length}) outside a dimension of {size}")
        ranges = list(self._ranges)
        ranges[stored] = (offset + start, length)
        return LazyTensor(self._source, (), tuple(ranges), self._transposed)

    def split(self, size: int, dim: int = 0) -> list["LazyTensor"]:
        total = self.shape[dim]
        return [self.narrow(dim, s, min(size, total - s)) for s in range(0, total, size)]

    def materialize(self) -> torch.Tensor:
        global elements_read
        index = tuple(slice(s, s + n) for s, n in self._ranges)
        out = self._source[index]
        elements_read += out.numel()
        return out.t() if self._transposed else out


def as_tensor(x: LazyTensor | torch.Tensor) -> torch.Tensor:
    return x.materialize() if isinstance(x, LazyTensor) else x
