"""The CUDA-path decisions that can be checked without a GPU: which GPU each rank of a group
takes, a second warm-up sizing the KV cache like the first (the memory probe counting the
cache as used, as CUDA's mem_get_info does), and decode-graph capture refused where a capture
would fail (the torch kernel fallback syncs with the host)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common.model_config import ModelConfig
from kernels import kernel_backend, set_kernel_backend
from worker.attn_metadata import build_attention_metadata
from worker.parallel import rank_device
from worker.runner import ModelRunner, SequenceInput
from worker.warmup import warm_up


@pytest.mark.parametrize("device, rank, local_size, count, expected", [
    ("cuda", 0, 1, 1, "cuda:0"),
    ("cuda", 0, 2, 2, "cuda:0"),
    ("cuda", 1, 2, 2, "cuda:1"),       # TP=2 on a two-GPU host: one GPU per rank
    ("cuda", 3, 4, 8, "cuda:3"),
    ("cuda", 5, 8, 4, "cuda:1"),       # more ranks than GPUs: wrap (NCCL then refuses)
    ("cuda", 1, 2, 1, "cuda:0"),       # a pod per rank, each seeing its one GPU
    ("cuda:2", 0, 2, 4, "cuda:2"),     # an index names the group's first GPU
    ("cuda:2", 1, 2, 4, "cuda:3"),
    ("cuda:3", 1, 2, 4, "cuda:0"),
    ("cpu", 1, 2, 0, "cpu"),
])
def test_each_rank_takes_its_own_gpu(device, rank, local_size, count, expected):
    got = rank_device(device, rank, local_size, count)
    assert got == torch.device(expected) and (got.type != "cuda" or got.index is not None)


def test_rank_device_rejects_impossible_requests():
    with pytest.raises(ValueError, match="no CUDA device"):
        rank_device("cuda", 0, 1, 0)
    with pytest.raises(ValueError, match="only 2"):
        rank_device("cuda:2", 0, 1, 2)


@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(ModelConfig.from_dir(tiny_model("llama")), "float32", 0, 16, "cpu")


def _held_bytes(runner: ModelRunner) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
               for k, v in runner.kv_caches)


def test_a_second_warm_up_sizes_the_cache_like_the_first(runner):
    """A device whose free memory excludes the cache held at the time it is read (CUDA): a
    warm-up that measured with the old cache still allocated came out near zero blocks."""
    total = 8 << 20

    def budget() -> int:
        return int(total * 0.9) - _held_bytes(runner)

    first = warm_up(runner, 64, 4, budget, decode_graphs=True)
    assert first[0] > 8 and runner.num_blocks == first[0] and runner.graphs is None
    for _ in range(2):   # schedulers re-warm after every restart
        assert warm_up(runner, 64, 4, budget, decode_graphs=True) == first
        assert _held_bytes(runner) == first[0] * first[1]


def test_capture_is_refused_on_the_torch_fallback(runner):
    runner.allocate_kv_cache(8)
    before = kernel_backend()
    try:
        for backend in ("auto", "torch"):   # CPU tensors take the torch references either way
            set_kernel_backend(backend)
            assert "torch kernel fallback" in runner.why_no_decode_graphs()
            assert not runner.decode_graphs_supported()
            runner.capture_decode_graphs(4)   # no capture, no scratch block: eager decode
            assert runner.graphs is None and runner.kv_caches[0][0].shape[0] == 8
    finally:
        set_kernel_backend(before)
    out = runner.execute([SequenceInput([5], 3, [0]), SequenceInput([1, 2, 3], 0, [1])])
    assert out.logits.shape[0] == 2 and torch.isfinite(out.logits).all()
    # The static-buffer path without capture (what the CPU graph tests use) is still there.
    runner.capture_decode_graphs(4, capture=False)
    assert runner.graphs is not None and runner.kv_caches[0][0].shape[0] == 9


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_prefill_tile_metadata_is_built_once_per_step_for_the_triton_path():
    """The Triton prefill's tile table travels with the step's metadata (one copy per step,
    shared by every layer), only where the Triton kernels run."""
    from kernels.paged_attention_prefill import PREFILL_BLOCK_M as M

    args = ([1, 1, 2 * M + 3, 5], [9, 3, 0, 20], [[0], [1], [2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12]],
            16)
    before = kernel_backend()
    try:
        set_kernel_backend("torch")
        assert build_attention_metadata(*args).prefill_tiles is None
        set_kernel_backend("triton")
        assert build_attention_metadata([1, 1], [9, 3], [[0], [1]], 16).prefill_tiles is None
        meta = build_attention_metadata(*args)
    finally:
        set_kernel_backend(before)
    qsl, lens, tile_seq, tile_start = (t.tolist() for t in meta.prefill_tiles)
    assert qsl == meta.prefill_query_start_loc == [0, 2 * M + 3, 2 * M + 8]
    assert lens == meta.prefill_seq_lens == [2 * M + 3, 25]
    assert tile_seq == [0, 0, 0, 1] and tile_start == [0, M, 2 * M, 0]
    assert all(t.dtype == torch.int32 for t in meta.prefill_tiles)
