"""Where a worker sits in its group: the one place layers and the runner ask for ranks.

A group is `tp_size x pp_size` processes joined by torch.distributed (NCCL on CUDA, gloo on
CPU). Global rank = pp_rank * tp_size + tp_rank: the ranks of one pipeline stage form a
tensor-parallel group (all-reduce after row-parallel layers), and stage s sends its hidden
states to the same tensor-parallel rank of stage s + 1. A single worker is rank 0 of a group
of size 1 and never touches torch.distributed.

The group is set once at start-up (`init_worker_group`), before the model is built: every
parallel layer reads it in its constructor to size its slice.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    process_group: object | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[.., n] on every rank -> [.., size * n] on every rank (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class PipelineStage:
    rank: int = 0          # the stage
    size: int = 1          # number of stages
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """This stage's contiguous layers [start, end): an even split, the first stages taking
        one more when it does not divide."""
        if num_layers < self.size:
            raise ValueError(f"{num_layers} layers cannot be split over {self.size} pipeline stages")
        base, extra = divmod(num_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def send_next(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), dst=(self.rank + 1) * self.tp_size + self.tp_rank)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=(self.rank - 1) * self.tp_size + self.tp_rank)
        return buf


_tp_group = TensorParallelGroup()
_pp_stage = PipelineStage()


def get_tp_group() -> TensorParallelGroup:
    return _tp_group


def get_pp_stage() -> PipelineStage:
    return _pp_stage


def set_tp_group(group: TensorParallelGroup) -> None:
    global _tp_group
    _tp_group = group


def set_pp_stage(stage: PipelineStage) -> None:
    global _pp_stage
    _pp_stage = stage


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device, rank: int, local_size: int,
                device_count: int) -> torch.device:
    """The device a rank of a group runs on, from the configured one.

    NCCL needs one GPU per rank, and `torch.cuda.set_device` needs an index: on a host running
    `local_size` ranks of the group (ranks r, r+1, ... all here), a bare "cuda" puts local rank
    i on cuda:(i % device_count); "cuda:k" names the host's first GPU for the group, so rank i
    takes cuda:((k + i) % device_count). A host that sees one GPU (a pod per rank) gives every
    rank cuda:0. Non-CUDA devices are returned as they are."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if device_count < 1:
        raise ValueError(f"device {dev} requested but no CUDA device is visible")
    if local_size < 1 or rank < 0:
        raise ValueError(f"rank {rank} of a local group of {local_size}")
    first = dev.index or 0
    if first >= device_count:
        raise ValueError(f"{dev} requested but only {device_count} CUDA devices are visible")
    return torch.device("cuda", (first + rank % local_size) % device_count)


def init_worker_group(tp_size: int, pp_size: int, rank: int, init_method: str,
                      backend: str = "gloo", timeout_s: float = 120.0,
                      device: torch.device | None = None) -> None:
    """Join the group's process group (blocks until all tp_size * pp_size ranks arrive at the
    TCP store `init_method`, e.g. "tcp://10.0.0.5:29500") and set the TP group and the
    pipeline stage. Collectives that stall longer than timeout_s fail (a dead peer). With
    NCCL, `device` (this rank's GPU, see rank_device) binds the communicator to it."""
    world = tp_size * pp_size
    if tp_size < 1 or pp_size < 1:
        raise ValueError("tensor- and pipeline-parallel sizes must be at least 1")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the group of {world} ({tp_size} x {pp_size})")
    pp_rank, tp_rank = divmod(rank, tp_size)
    if world > 1:
        dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    tp_pg = None
    if tp_size > 1:
        # Every rank creates every stage's group, in the same order (torch.distributed's rule).
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
            if stage == pp_rank:
                tp_pg = group
    set_tp_group(TensorParallelGroup(tp_rank, tp_size, tp_pg))
    set_pp_stage(PipelineStage(pp_rank, pp_size, tp_rank, tp_size))


def destroy_worker_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tp_group(TensorParallelGroup())
    set_pp_stage(PipelineStage())
