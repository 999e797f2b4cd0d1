"""The model runner: one forward pass over a batch of sequences on a paged KV cache.

Its input says, per sequence, which tokens to compute, where they start and which cache
blocks hold the sequence; its output is each sequence's next-token logits. It keeps no
request state between calls: everything it needs arrives with the batch.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from common.model_config import ModelConfig
from worker.attn_metadata import build_attention_metadata
from worker.kv_cache import allocate_kv_cache, resolve_kv_cache_dtype
from worker.layers.cpu_linear import prepack_linears
from worker.loader import load_model, parse_dtype
from worker.parallel import get_pp_stage


logger = logging.getLogger(__name__)


def _on_device(method):
    """Run a runner method with its GPU as the thread's current device. Triton launches on
    the current device, not on its tensors' device, and a new thread (the worker service's
    step thread) starts on GPU 0: without this, LLM(device="cuda:1") would run its kernels
    on GPU 0 against GPU 1's memory."""
    @functools.wraps(method)
    def on_device(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)
    return on_device


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the model computes in for a requested dtype on a device.

    NOTE: a CPU without native bf16/fp16 matrix instructions (AVX2-only, e.g. many EPYCs)
    runs half-precision matmuls through slow emulation: 10-15x slower than float32 here. On
    such CPUs a half-precision model is loaded and computed in float32 (more accurate and
    faster; twice the memory). `TESSERA_CPU_HALF=native` keeps the requested dtype anyway.
    """
    import os

    if device.type != "cpu" or dtype == torch.float32 or os.environ.get("TESSERA_CPU_HALF") == "native":
        return dtype
    flags = _cpu_flags()
    native = ({"avx512_bf16", "amx_bf16"} if dtype == torch.bfloat16
              else {"avx512_fp16", "amx_fp16"}) & flags
    if native or not flags:
        return dtype
    logger.warning("this CPU has no native %s matmul: computing in float32", dtype)
    return torch.float32


@dataclass
class SequenceInput:
    token_ids: list[int]     # the tokens to compute this step
    start_pos: int           # tokens of this sequence already in the KV cache
    block_table: list[int]   # cache blocks holding the sequence, in order
    num_logits: int = 1      # logits for this many last positions (speculative verification)


@dataclass
class RunnerOutput:
    # [len(logits_for), vocab] float32 (None before the last stage): the wanted sequences'
    # rows in order, num_logits rows each (speculative verification), else one.
    logits: torch.Tensor | None
    all_logits: list[torch.Tensor] | None     # per sequence [n_tokens, vocab] when asked


class ModelRunner:
    def __init__(self, config: ModelConfig, dtype: str | torch.dtype = "float32",
                 num_blocks: int = 256, block_size: int = 16,
                 device: str | torch.device = "cpu", kv_cache_dtype: str = "auto") -> None:
        self.config = config
        self.device = torch.device(device)
        self.requested_dtype = parse_dtype(dtype)
        self.dtype = compute_dtype(self.requested_dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, self.device)
        self.block_size = block_size
        self.pp = get_pp_stage()
        self.graphs = None
        self.model = load_model(config, self.dtype, self.device)
        prepack_linears(self.model)   # CPU float32: oneDNN-packed weights (no-op elsewhere)
        self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """(Re)allocate the paged KV cache; 0 leaves none (a worker sizes it at warm-up).
        Decode graphs captured over the old cache are dropped."""
        self.kv_caches = []   # drop the old tensors before making new ones
        self.graphs = None
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(self.config, num_blocks, self.block_size,
                                           self.kv_cache_dtype, self.device)

    def release_kv_cache(self) -> None:
        """Drop the KV cache and decode graphs and, on CUDA, hand their memory back to the
        driver, so that a warm-up measuring free memory sees it free."""
        self.allocate_kv_cache(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def why_no_decode_graphs(self, capture: bool = True) -> str | None:
        """Why capture_decode_graphs would run decode steps eagerly; None: it captures."""
        from kernels import use_triton
        from worker.parallel import get_tp_group

        if self.pp.size > 1 or get_tp_group().size > 1:
            return "decode graphs are for single-worker groups"
        if capture and not use_triton(self.device):
            # The torch references read values on the host (int(seq_lens.max()) in decode
            # attention): a host sync inside a capture fails it.
            return "the torch kernel fallback syncs with the host, which a capture cannot"
        if capture and self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device, not {self.device}"
        return None

    def decode_graphs_supported(self) -> bool:
        """Whether capture_decode_graphs would capture (else decode steps run eagerly)."""
        return self.why_no_decode_graphs() is None

    @_on_device
    def capture_decode_graphs(self, max_num_seqs: int, capture: bool = True) -> None:
        """Replay decode steps of up to max_num_seqs sequences from CUDA graphs
        (worker/cuda_graphs.py). The cache gets one scratch block past the scheduler's pool,
        for the padding rows' writes. capture=False: the same path run eagerly (tests).
        Where capture is unsupported (decode_graphs_supported), decode steps stay eager."""
        from worker.cuda_graphs import DecodeGraphs, graph_sizes

        reason = self.why_no_decode_graphs(capture)
        if reason is not None:
            logger.info("%s: running decode steps eagerly", reason)
            return
        pool = self.num_blocks
        self.allocate_kv_cache(pool + 1)
        self.num_blocks = pool
        max_blocks = -(-self.config.max_position_embeddings // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, pool, self.block_size, max_blocks,
                                   graph_sizes(max_num_seqs), self.device, capture=capture)

    @_on_device
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One worst-case forward pass (num_tokens tokens over num_seqs prompt chunks) on a
        temporary cache just large enough: warms the kernels and, on CUDA, shows the peak
        activation memory a step needs before the KV cache takes the rest."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        per_seq = -(-num_tokens // num_seqs)
        blocks_per_seq = -(-per_seq // self.block_size)
        saved = self.num_blocks
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        seqs = [SequenceInput([0] * per_seq, 0,
                              list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
                for i in range(num_seqs)]
        self.execute(seqs)
        self.allocate_kv_cache(saved)

    @_on_device
    @torch.inference_mode()
    def execute(self, seqs: list[SequenceInput], all_logits: bool = False,
                logits_for: list[int] | None = None) -> RunnerOutput:
        """logits_for: the indices (into seqs, ascending) of the sequences whose next-token
        logits are wanted (the sampled ones); None: all. A prompt chunk that does not end
        its prompt is never sampled: its LM head row (2 x hidden x vocab FLOPs) is skipped."""
        if not seqs:
            raise ValueError("execute() needs at least one sequence")
        # Decodes first: attention then handles them with one vectorised call.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) != 1)
        batch = [seqs[i] for i in order]
        for s in batch:
            if not s.token_ids:
                raise ValueError("a sequence with no tokens to compute")
            if s.start_pos + len(s.token_ids) > self.config.max_position_embeddings:
                raise ValueError(f"position {s.start_pos + len(s.token_ids) - 1} exceeds the "
                                 f"model's {self.config.max_position_embeddings} positions")
        meta = build_attention_metadata([len(s.token_ids) for s in batch],
                                        [s.start_pos for s in batch],
                                        [s.block_table for s in batch], self.block_size,
                                        self.device)
        input_ids = torch.tensor([t for s in batch for t in s.token_ids], dtype=torch.int64,
                                 device=self.device)
        intermediate = None
        if not self.pp.is_first:   # hidden states and residual from the previous stage
            pair = self.pp.recv_prev((2, len(input_ids), self.config.hidden_size), self.dtype,
                                     self.device)
            intermediate = (pair[0], pair[1])
        if (self.graphs is not None and not all_logits and meta.num_decode_tokens == len(batch)
                and self.graphs.fits(len(batch))):
            hidden = self.graphs.run(input_ids, meta)
        else:
            hidden = self.model(input_ids, meta.positions, self.kv_caches, meta, intermediate)
        if not self.pp.is_last:
            self.pp.send_next(torch.stack(hidden))
            return RunnerOutput(logits=None, all_logits=None)
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        wanted = list(range(len(seqs))) if logits_for is None else logits_for
        if any(seqs[i].num_logits != 1 for i in wanted):
            # Speculative verification: logits at each of a row's last num_logits positions.
            ends, inv = meta.query_start_loc[1:], inverse.tolist()
            rows = [p for i in wanted
                    for p in range(ends[inv[i]] - seqs[i].num_logits, ends[inv[i]])]
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        else:   # the wanted sequences' last tokens, in the caller's order
            index = meta.last_token_indices[inverse[torch.tensor(wanted, dtype=torch.int64)]]
        if len(index):   # one gather, one LM head
            logits = self.model.compute_logits(hidden.index_select(0, index.to(self.device)))
            logits = logits.float()
        else:   # nothing sampled this step (all prompt chunks mid-prompt)
            logits = torch.empty(0, self.config.vocab_size, device=self.device)
        per_seq = self._all_logits(hidden, batch, inverse) if all_logits else None
        return RunnerOutput(logits=logits, all_logits=per_seq)

    def _all_logits(self, hidden: torch.Tensor, batch: list[SequenceInput],
                    inverse: torch.Tensor) -> list[torch.Tensor]:
        full = self.model.compute_logits(hidden).float()
        chunks = full.split([len(s.token_ids) for s in batch])
        return [chunks[j] for j in inverse.tolist()]
