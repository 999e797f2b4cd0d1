"""Decode steps replayed from CUDA graphs: one launch instead of a few hundred kernel launches.

A graph is captured per batch size in `sizes` (1, 2, 4, 8, 16, 32, ... up to max_num_seqs) over
static input buffers; a decode batch of n sequences is padded up to the nearest captured size,
its inputs copied into the buffers, and the graph replayed. Padding rows compute garbage that
is never read: their KV write goes to one scratch block past the scheduler's pool (so no
sequence's cache is touched), they attend to one token of block 0, and their hidden states
are sliced off. Only pure-decode steps of single-worker groups are replayed (no pipeline
sends, no tensor-parallel collectives inside a graph); everything else runs eagerly.

`capture=False` builds the same static-buffer path without capturing (each "replay" runs the
model eagerly on the buffers): the CPU tests use it to check the padding and buffer logic,
which is everything here except the capture itself.
"""

from __future__ import annotations

import logging

import torch

from worker.attn_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list, scratch_block: int, block_size: int,
                 max_blocks_per_seq: int, sizes: list[int], device: torch.device,
                 capture: bool = True) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.sizes = sorted(set(sizes))
        self.max_bs = self.sizes[-1]
        n, d = self.max_bs, device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=d)
        self.positions = torch.zeros(n, dtype=torch.int64, device=d)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=d)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int64, device=d)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=d)
        self.pad_slot = scratch_block * block_size
        self.capture = capture
        self._graphs: dict[int, object] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._build()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=list(range(bs + 1)), num_decode_tokens=bs,
            prefill_query_start_loc=[0], prefill_seq_lens=[])

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches,
                          self._meta(bs))

    @torch.inference_mode()
    def _build(self) -> None:
        self.slot_mapping.fill_(self.pad_slot)
        if not self.capture:
            return
        pool = None
        for bs in reversed(self.sizes):   # largest first: the smaller ones reuse its memory
            self._forward(bs)              # compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bs)
            pool = graph.pool()
            self._graphs[bs], self._outputs[bs] = graph, out
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode batch of n <= max_bs sequences."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        width = meta.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks exceeds the graphs' "
                             f"{self.block_tables.shape[1]}")
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        if bs > n:   # padding rows: scratch-block writes, one token of block 0 read
            self.slot_mapping[n:bs].fill_(self.pad_slot)
            self.seq_lens[n:bs].fill_(1)
            self.block_tables[n:bs, 0].fill_(0)
        if self.capture:
            self._graphs[bs].replay()
            return self._outputs[bs][:n]
        return self._forward(bs)[:n]
