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
    """The best square-GEMM rate of the machine (n = 2048 on CPU, 8192 on GPU): torch's matmul,
    and on CPU in float32 also the oneDNN-prepacked GEMM the engine's linear layers run.

    NOTE: both, because neither is the peak everywhere: on an AMD EPYC (AVX2) torch's matmul
    (MKL) reached 93 GFLOP/s where the prepacked oneDNN GEMM reached 133, and the engine's
    prefill linears ran at 140: a roofline over the matmul alone came out above 100% for
    them. On the Intel machines before, the two were within a few percent."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    rates = [_rate(lambda: a @ b, n, device)]
    if device == "cpu" and dtype == torch.float32:
        from worker.layers.cpu_linear import linear, pack_weight
        packed = pack_weight(b)
        if packed is not None:
            rates.append(_rate(lambda: linear(a, b, None, packed), n, device))
    return max(rates)


def _rate(matmul, n: int, device: str) -> float:
    """FLOP/s of an n x n x n matmul, after two warm-up calls."""
    for _ in range(2):
        matmul()
    reps = 5 if device == "cpu" else 50
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        matmul()
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
