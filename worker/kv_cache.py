"""The paged KV cache tensors a worker holds: per layer, keys and values laid out as blocks."""

from __future__ import annotations

import torch

from common.model_config import ModelConfig
from worker.hugepages import huge_page_zeros
from worker.parallel import get_pp_stage, get_tp_group


def local_kv_heads(cfg: ModelConfig) -> int:
    """KV heads this rank holds (at least one: KV heads are replicated past the head count)."""
    return max(1, cfg.num_kv_heads // get_tp_group().size)


def local_num_layers(cfg: ModelConfig) -> int:
    """Layers this pipeline stage holds (and caches)."""
    start, end = get_pp_stage().layer_range(cfg.num_layers)
    return end - start


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
# vLLM's names: `fp8` is e4m3 (the "fn" variant: no infinities, max 448), stored unscaled
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(name: str, compute_dtype: torch.dtype,
                           device: torch.device | str = "cpu") -> torch.dtype:
    """The cache's storage dtype for `--kv-cache-dtype` (vLLM's flag): `auto` stores what the
    model computes in; a half type halves the bytes attention reads, fp8 quarters them (of
    float32), and the CPU kernel converts on load and computes in float32. fp8 values are
    stored without a scale (vLLM's default k/v scale of 1.0: e4m3 saturates at +-448, e5m2
    keeps 2 mantissa bits); the Triton kernels do not read fp8 yet, so it is CPU only."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv cache dtype must be one of {KV_CACHE_DTYPES}, not {name!r}")
    if name in _FP8:
        if torch.device(device).type != "cpu":
            raise ValueError(f"kv cache dtype {name!r} is CPU only for now (the Triton "
                             "attention kernels read float32, float16 or bfloat16 caches)")
        return _FP8[name]
    return compute_dtype if name == "auto" else getattr(torch, name)


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * local_num_layers(cfg) * block_size * local_kv_heads(cfg) * cfg.head_dim * elem


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(k_cache, v_cache)] per layer of this stage, each [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, local_kv_heads(cfg), cfg.head_dim)

    def zeros() -> torch.Tensor:   # on CPU on huge pages: decode reads it all, every step
        if torch.device(device).type == "cpu":
            return huge_page_zeros(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=device)
    return [(zeros(), zeros()) for _ in range(local_num_layers(cfg))]
