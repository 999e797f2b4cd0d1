"""What the offline benchmarks share: the bench workload, the measured matmul peak, the
useful FLOPs of a token (CPU_PERF_NOTES.md's accounting) and the HF `generate` baselines."""

from __future__ import annotations

import random
import time

import torch

from common.model_config import ModelConfig


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))] for _ in range(n)]


def peak_matmul_flops(dtype: torch.dtype, device: str) -> float:
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    reps = 5 if device == "cpu" else 50
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def layer_params(cfg: ModelConfig) -> int:
    """Matmul weights of one decoder layer: QKV, O, gate + up, down (norms and biases aside)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size


def flops_per_token(cfg: ModelConfig, context: float) -> float:
    """Matmul FLOPs of one token: weights (2 per parameter) plus attention over `context`."""
    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    weights = cfg.num_layers * layer_params(cfg) + h * cfg.vocab_size
    attention = cfg.num_layers * 2 * q * context
    return 2 * weights + 2 * attention


def left_padded(group: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of prompts left-padded to the longest, as HF batches them."""
    width = max(len(p) for p in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(group):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    return ids, mask


def run_hf_one_at_a_time(hf, prompts, out_len: int, device: str) -> float:
    t = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=out_len,
                          min_new_tokens=out_len, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(ids) + out_len
    sync(device)
    return len(prompts) * out_len / (time.perf_counter() - t)


def run_hf_padded(hf, prompts, out_len: int, batch: int, device: str) -> float:
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids, mask = left_padded(prompts[i:i + batch])
        hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=out_len,
                    min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    sync(device)
    return len(prompts) * out_len / (time.perf_counter() - t)
