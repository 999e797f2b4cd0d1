"""Decode steps through the CUDA-graph path (worker/cuda_graphs.py): padded up to a captured
batch size, their results equal the eager path's and padding never touches a sequence's cache.

On the CPU the path runs with capture=False (static buffers, padding, scratch block: all but
the capture itself); on CUDA the same checks run with real graphs."""

from __future__ import annotations

import random

import pytest
import torch

from common.model_config import ModelConfig
from worker.runner import ModelRunner, SequenceInput

BLOCK = 16
NUM_BLOCKS = 40


def _run(runner: ModelRunner, seed: int = 0) -> list[torch.Tensor]:
    """Prefill 7 prompts, then decode steps of 7, 3, 1, 5 and 7 sequences (padded to 8, 4,
    1, 8, 8 on the graph path); returns every step's logits."""
    rng = random.Random(seed)
    lens = [1, 5, 16, 17, 30, 2, 9]
    tokens = [[rng.randrange(512) for _ in range(n)] for n in lens]
    tables = [list(range(5 * i, 5 * i + 5)) for i in range(len(lens))]
    logits = [runner.execute([SequenceInput(t, 0, tables[i]) for i, t in enumerate(tokens)]).logits]
    for batch in [range(7), [0, 3, 6], [2], [1, 2, 4, 5, 6], range(7)]:
        seqs = []
        for i in batch:
            tokens[i].append(rng.randrange(512))
            seqs.append(SequenceInput([tokens[i][-1]], len(tokens[i]) - 1, tables[i]))
        logits.append(runner.execute(seqs).logits)
    return logits


def _runners(model_dir, device: str, capture: bool) -> tuple[ModelRunner, ModelRunner]:
    cfg = ModelConfig.from_dir(model_dir)
    eager = ModelRunner(cfg, "float32", NUM_BLOCKS, BLOCK, device)
    graphed = ModelRunner(cfg, "float32", NUM_BLOCKS, BLOCK, device)
    graphed.capture_decode_graphs(max_num_seqs=8, capture=capture)
    assert graphed.graphs is not None and graphed.graphs.sizes == [1, 2, 4, 8]
    return eager, graphed


def _check(eager: ModelRunner, graphed: ModelRunner) -> None:
    for a, b in zip(_run(eager), _run(graphed)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for (ke, ve), (kg, vg) in zip(eager.kv_caches, graphed.kv_caches):
        # The pool is identical; padding rows wrote only the scratch block past it.
        torch.testing.assert_close(kg[:NUM_BLOCKS], ke, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vg[:NUM_BLOCKS], ve, rtol=1e-5, atol=1e-5)
        assert kg.shape[0] == NUM_BLOCKS + 1 and kg[NUM_BLOCKS].abs().sum() > 0


def test_padded_static_buffer_path_matches_eager_on_cpu(tiny_model):
    _check(*_runners(tiny_model("llama"), "cpu", capture=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_graphs_match_eager_on_cuda(tiny_model):
    _check(*_runners(tiny_model("llama"), "cuda", capture=True))
