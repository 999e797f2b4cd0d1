"""Each Triton kernel against its torch reference on CUDA, next to the device's ceilings.

Ceilings are measured in the same run: a large device-to-device copy (bandwidth) and a large
bfloat16 matmul (FLOP/s). Memory-bound kernels report achieved GB/s (bytes they must move
at least once), attention over long prompts reports TFLOP/s. Shapes: the `bench` model
(8 heads of 64, hidden 512) and a Llama-3-8B-like layer (32 query / 8 KV heads of 128).

    PYTHONPATH=. python benchmarks/kernels.py [--json results.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package: the repository root goes there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SHAPES = {  # name: (hidden, Hq, Hkv, head_dim, intermediate)
    "bench": (512, 8, 8, 64, 1536),
    "llama8b": (4096, 32, 8, 128, 14336),
}
DTYPE = torch.bfloat16
TOKENS = 4096            # tokens of a prefill-sized step for the element-wise kernels
DECODE_SEQS, DECODE_CTX = 64, 2048
PREFILL_SEQS, PREFILL_LEN = 4, 1024
BLOCK_SIZE = 16


@dataclass
class Row:
    kernel: str
    shape: str
    triton_us: float
    torch_us: float
    metric: str          # "GB/s" or "TFLOP/s"
    achieved: float
    ceiling: float

    @property
    def speedup(self) -> float:
        return self.torch_us / self.triton_us


def bench_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def matmul_flops() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    return 2 * n ** 3 / (bench_us(lambda: a @ b) * 1e-6)


def paged_cache(num_seqs: int, ctx: int, hkv: int, d: int) -> tuple[torch.Tensor, ...]:
    """K/V caches with every sequence's blocks scattered, and the block tables."""
    per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = num_seqs * per_seq
    k = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, per_seq)
    return k, v, tables


def run(bw: float, flops: float) -> list[Row]:
    from kernels import activation, kv_write, norm, paged_attention, rotary

    rows: list[Row] = []
    el = torch.tensor([], dtype=DTYPE).element_size()

    def add(kernel: str, shape: str, triton_fn: Callable[[], object],
            torch_fn: Callable[[], object], amount: float, metric: str = "GB/s") -> None:
        t_us, r_us = bench_us(triton_fn), bench_us(torch_fn)
        scale = 1e9 if metric == "GB/s" else 1e12
        rows.append(Row(kernel, shape, t_us, r_us, metric, amount / (t_us * 1e-6) / scale,
                        (bw if metric == "GB/s" else flops) / scale))

    for shape, (hidden, hq, hkv, d, inter) in SHAPES.items():
        x = torch.randn(TOKENS, hidden, dtype=DTYPE, device="cuda")
        res, w = torch.randn_like(x), torch.randn(hidden, dtype=DTYPE, device="cuda")
        add("fused_add_rms_norm", shape, lambda: norm.fused_add_rms_norm_triton(x, res, w, 1e-6),
            lambda: norm.fused_add_rms_norm_ref(x, res, w, 1e-6), 4 * x.numel() * el)

        gate_up = torch.randn(TOKENS, 2 * inter, dtype=DTYPE, device="cuda")
        add("silu_and_mul", shape, lambda: activation.silu_and_mul_triton(gate_up),
            lambda: activation.silu_and_mul_ref(gate_up), 1.5 * gate_up.numel() * el)

        qkv = torch.randn(TOKENS, (hq + 2 * hkv) * d, dtype=DTYPE, device="cuda")
        q = qkv[:, :hq * d].view(TOKENS, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(TOKENS, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(TOKENS, hkv, d)
        cos_sin = rotary.build_cos_sin_cache(rotary.rope_inv_freq(d, 500000.0), 8192).cuda()
        pos = torch.randint(0, 8192, (TOKENS,), device="cuda")
        add("apply_rotary", shape, lambda: rotary.apply_rotary_triton(pos, q, k, cos_sin),
            lambda: rotary.apply_rotary_ref(pos, q, k, cos_sin), 2 * (hq + hkv) * d * TOKENS * el)

        k_cache, v_cache, _ = paged_cache(TOKENS // 256, 4096, hkv, d)
        slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device="cuda")[:TOKENS]
        add("write_kv_cache", shape,
            lambda: kv_write.write_kv_cache_triton(k, v, k_cache, v_cache, slots),
            lambda: kv_write.write_kv_cache_ref(k, v, k_cache, v_cache, slots),
            4 * TOKENS * hkv * d * el)
        del k_cache, v_cache

        k_cache, v_cache, tables = paged_cache(DECODE_SEQS, DECODE_CTX, hkv, d)
        qd = torch.randn(DECODE_SEQS, hq, d, dtype=DTYPE, device="cuda")
        lens = torch.full((DECODE_SEQS,), DECODE_CTX, device="cuda")
        add(f"decode {DECODE_SEQS}x{DECODE_CTX}", shape,
            lambda: paged_attention.paged_attention_decode_triton(
                qd, k_cache, v_cache, tables, lens, d ** -0.5),
            lambda: paged_attention.paged_attention_decode_ref(
                qd, k_cache, v_cache, tables, lens, d ** -0.5),
            2 * DECODE_SEQS * DECODE_CTX * hkv * d * el)
        del k_cache, v_cache

        k_cache, v_cache, tables = paged_cache(PREFILL_SEQS, PREFILL_LEN, hkv, d)
        qp = torch.randn(PREFILL_SEQS * PREFILL_LEN, hq, d, dtype=DTYPE, device="cuda")
        qsl = [i * PREFILL_LEN for i in range(PREFILL_SEQS + 1)]
        lens_list = [PREFILL_LEN] * PREFILL_SEQS
        causal_pairs = PREFILL_SEQS * PREFILL_LEN * (PREFILL_LEN + 1) / 2
        add(f"prefill {PREFILL_SEQS}x{PREFILL_LEN}", shape,
            lambda: paged_attention.paged_attention_prefill_triton(
                qp, k_cache, v_cache, tables, qsl, lens_list, d ** -0.5),
            lambda: paged_attention.paged_attention_prefill_ref(
                qp, k_cache, v_cache, tables, qsl, lens_list, d ** -0.5),
            4 * causal_pairs * hq * d, metric="TFLOP/s")
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the rows and ceilings here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA device (the kernels run on the CPU only "
                 "through Triton's interpreter, which is no measure of speed)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/kernels.py needs Triton: pip install '.[triton]'")
    torch.manual_seed(0)
    bw, flops = copy_bandwidth(), matmul_flops()
    rows = run(bw, flops)
    print(f"\n{torch.cuda.get_device_name()}, {DTYPE}: copy {bw / 1e9:.0f} GB/s, "
          f"bf16 matmul {flops / 1e12:.0f} TFLOP/s (measured now)")
    print(f"{'kernel':24s} {'shape':8s} {'triton us':>10s} {'torch us':>10s} {'speedup':>8s} "
          f"{'achieved':>10s} {'ceiling':>10s} {'% ceil':>7s}")
    for r in rows:
        print(f"{r.kernel:24s} {r.shape:8s} {r.triton_us:10.1f} {r.torch_us:10.1f} "
              f"{r.speedup:7.2f}x {r.achieved:10.1f} {r.ceiling:10.1f} "
              f"{100 * r.achieved / r.ceiling:6.1f}%  {r.metric}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": bw / 1e9,
                       "matmul_tflops": flops / 1e12,
                       "rows": [{**asdict(r), "speedup": r.speedup} for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
