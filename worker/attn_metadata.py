"""Per-step attention metadata: positions, cache slots and block tables for a mixed batch.

Built once per step from the scheduled sequences (decodes first, then prompt chunks) and
shared by every layer. Slots are derived here from the block tables; nothing upstream ever
sends per-token slot lists. On CUDA the step's index tensors cross in one copy from pinned
memory that does not wait for the device, and so does the Triton prefill kernel's tile
metadata (built here, once, rather than by each layer's launch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kernels import use_triton
from kernels.paged_attention_prefill import prefill_tile_metadata


@dataclass
class AttentionMetadata:
    positions: torch.Tensor          # [T] int64
    slot_mapping: torch.Tensor       # [T] int64
    block_tables: torch.Tensor       # [S, max_blocks] int64, rows padded with block 0
    seq_lens: torch.Tensor           # [S] int64, tokens in cache after this step
    query_start_loc: list[int]       # S + 1 offsets of each sequence's tokens in the batch
    num_decode_tokens: int           # the first this-many sequences have exactly one token
    prefill_query_start_loc: list[int]  # offsets of the prompt chunks, relative to their start
    prefill_seq_lens: list[int]
    prefill_tiles: tuple[torch.Tensor, ...] | None = None   # the Triton prefill's, per step

    @cached_property
    def query_start_loc_tensor(self) -> torch.Tensor:
        """query_start_loc as an int64 CPU tensor (for the CPU attention kernel), made once
        per step and shared by every layer."""
        return torch.tensor(self.query_start_loc, dtype=torch.int64)

    @property
    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the batch (where its next-token logits are)."""
        return torch.tensor(self.query_start_loc[1:], dtype=torch.int64) - 1


def build_attention_metadata(query_lens: list[int], start_positions: list[int],
                             block_tables: list[list[int]], block_size: int,
                             device: torch.device | str = "cpu") -> AttentionMetadata:
    """query_lens[i] tokens of sequence i are computed this step, starting at start_positions[i].

    One-token sequences take the vectorised decode path only when they come first (the
    runner orders them so); anywhere else they are handled, more slowly, as prompt chunks.
    """
    num_seqs = len(query_lens)
    num_decodes = 0
    while num_decodes < num_seqs and query_lens[num_decodes] == 1:
        num_decodes += 1
    query_start_loc = [0]
    for q in query_lens:
        query_start_loc.append(query_start_loc[-1] + q)
    seq_lens = [s + q for s, q in zip(start_positions, query_lens)]
    for i, (n, table) in enumerate(zip(seq_lens, block_tables)):
        if len(table) * block_size < n:
            raise ValueError(f"sequence {i} needs {-(-n // block_size)} blocks for {n} tokens, "
                             f"its block table has {len(table)}")
    max_blocks = max(len(t) for t in block_tables)
    # One tensor from padded lists: a torch.tensor per row costs ~5 µs each, every step.
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables],
                          dtype=torch.int64)
    lens = torch.tensor(query_lens, dtype=torch.int64)
    starts = torch.tensor(start_positions, dtype=torch.int64)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), lens)
    offset_in_seq = torch.arange(int(lens.sum())) - torch.repeat_interleave(
        torch.tensor(query_start_loc[:-1], dtype=torch.int64), lens)
    positions = starts[seq_of_token] + offset_in_seq
    slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    first_prefill = query_start_loc[num_decodes]
    prefill_query_start_loc = [x - first_prefill for x in query_start_loc[num_decodes:]]
    tiles = None
    if num_decodes < num_seqs and use_triton(device):
        tiles = prefill_tile_metadata(prefill_query_start_loc, seq_lens[num_decodes:], device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        # One pinned buffer, one copy that does not block the host; views split it again.
        t = len(positions)
        packed = torch.cat([positions, slot_mapping, seq_lens_t, tables.view(-1)])
        packed = packed.pin_memory().to(device, non_blocking=True)
        positions, slot_mapping = packed[:t], packed[t:2 * t]
        seq_lens_t = packed[2 * t:2 * t + num_seqs]
        tables = packed[2 * t + num_seqs:].view(num_seqs, max_blocks)
    else:
        positions, slot_mapping = positions.to(device), slot_mapping.to(device)
        tables, seq_lens_t = tables.to(device), seq_lens_t.to(device)
    return AttentionMetadata(
        positions=positions, slot_mapping=slot_mapping, block_tables=tables,
        seq_lens=seq_lens_t, query_start_loc=query_start_loc, num_decode_tokens=num_decodes,
        prefill_query_start_loc=prefill_query_start_loc,
        prefill_seq_lens=seq_lens[num_decodes:], prefill_tiles=tiles)
