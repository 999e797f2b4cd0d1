"""Where a worker sits in its tensor-parallel group: the one place layers ask for rank and size.

A single worker is rank 0 of a group of size 1; sharded serving (multi-process groups over
torch.distributed) sets the group here once at start-up, and every parallel layer follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    process_group: object | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        torch.distributed.all_reduce(x, group=self.process_group)
        return x


_tp_group = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    return _tp_group


def set_tp_group(group: TensorParallelGroup) -> None:
    global _tp_group
    _tp_group = group
