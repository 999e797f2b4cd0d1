"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from worker.layers.cpu_linear import free_plain, linear, pack_weight
from worker.layers.linear import check_shape
from worker.lazy_tensor import as_tensor
from worker.parallel import get_tp_group


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of vocabulary rows; lookups outside it give zeros
    and the all-reduce sums the one rank that had the row."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32
                 ) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_ids = (None,)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        check_shape((self.vocab_size, param.shape[1]), loaded)
        rows = max(0, min(self.rows, self.vocab_size - self.start))   # the last rank: fewer
        param.data[:rows].copy_(as_tensor(loaded.narrow(0, self.start, rows)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * inside[:, None]
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; shares the embedding's weight when tied."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 bias: bool = False) -> None:
        super().__init__(vocab_size, hidden_size, dtype)
        assert not bias, "LM heads with bias are not supported"
        self.packed_weight: torch.Tensor | None = None   # see worker/layers/cpu_linear.py
        self.tied = False

    def prepack(self) -> bool:
        """Make the oneDNN-packed copy of the loaded weight (CPU float32 or bf16); True if made. An
        untied head frees its plain copy; a tied one shares it with the embedding, which
        reads it."""
        if self.packed_weight is not None:
            return True
        self.packed_weight = pack_weight(self.weight)
        if self.packed_weight is not None and not self.tied:
            free_plain(self.weight)
        return self.packed_weight is not None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, None, self.packed_weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_last_dim(logits)[:, :self.vocab_size]
