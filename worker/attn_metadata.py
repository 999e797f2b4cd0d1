"""Per-step attention metadata: positions, cache slots and block tables for a mixed batch.

Built once per step from the scheduled sequences (decodes first, then prompt chunks) and
shared by every layer. Slots are derived here from the block tables; nothing upstream ever
sends per-token slot lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


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
    return AttentionMetadata(
        positions=positions.to(device), slot_mapping=slot_mapping.to(device),
        block_tables=tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device),
        query_start_loc=query_start_loc, num_decode_tokens=num_decodes,
        prefill_query_start_loc=[x - first_prefill for x in query_start_loc[num_decodes:]],
        prefill_seq_lens=seq_lens[num_decodes:])
