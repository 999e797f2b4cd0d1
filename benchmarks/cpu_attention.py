"""CPU paged attention: the C++ kernel's decode bandwidth and prompt-chunk FLOP rate.

Decode attention reads each sequence's K and V once: its floor is memory bandwidth. This
times one layer's decode attention at batch x context (default 64 x 512, the bench model's
8 KV heads of 64) for each cache dtype, going through --layers layers' caches in turn (default
8: 1 GiB of fp32 K/V, more than the last-level cache, as in a real decode step; --layers 1
times one cache-resident layer, which flatters the kernel; the caches are on transparent
huge pages where the OS allows, as the engine's are: worker/hugepages.py), interleaved in the
same run with a large tensor copy (bandwidth counted as read + write), a DRAM read pass, and
with the torch path it replaces (kernels/paged_attention_cpu.py `paged_attention_decode_cpu`:
gather into reused buffers + batched matmuls). Reported: ms per call, K/V bytes read per
second, that as a fraction of the copy and of the read bandwidth, and the speed-up over the
torch path.

Prompt chunks (`--chunks`, default 4 prompts of 512 tokens: one step at the CPU's default
token budget of 2048) are compute-bound: reported are the useful FLOPs (QK^T and PV over each
query's causal keys) per second against the fp32 GEMM peak (2048^3) measured in the same run,
and the speed-up over the torch reference (`paged_attention_prefill_ref`).

    python benchmarks/cpu_attention.py [--batch 64] [--context 512] [--layers 8] [--threads 2]
                                       [--chunks 512 512 512 512] [--prefix 0] [--mode both]
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time

import torch

from benchmarks.roofline import last_level_cache_bytes, read_bandwidth
from benchmarks.workload import peak_matmul_flops
from kernels.paged_attention import paged_attention_prefill_ref
from kernels.paged_attention_cpu import (cpu_attention_available, paged_attention_cpu,
                                         paged_attention_decode_cpu)
from worker.hugepages import huge_page_zeros

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def paged(num_seqs: int, tokens: int, args, gen: torch.Generator, layers: int = 1):
    """Scattered block tables for num_seqs sequences of `tokens` and random caches per dtype:
    one (k, v) per dtype, or with `layers` > 1 a list of that many (a model's layers)."""
    bs = args.block_size
    per_seq = -(-tokens // bs)
    num_blocks = num_seqs * per_seq + 16
    tables = torch.randperm(num_blocks, generator=gen)[:num_seqs * per_seq].view(num_seqs, per_seq)
    shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    def kv(dt):   # K scaled by --key-scale: the scores' spread; on huge pages, as the engine's
        return tuple(huge_page_zeros(shape, dt).copy_(torch.randn(shape, generator=gen) * scale)
                     for scale in (args.key_scale, 1.0))
    caches = {dt: [kv(dt) for _ in range(layers)] for dt in DTYPES}   # per dtype, one (K, V) a layer
    return tables, caches


def decode_rows(args, rounds: int, gen: torch.Generator) -> None:
    """Each call reads one layer's K/V; a pass goes through --layers layers' caches in turn, as
    a decode step does, so with several layers the K/V no longer fit in the last-level cache
    and come from DRAM (what the engine sees). Reported per layer, against the copy bandwidth
    and the DRAM read bandwidth measured in the same run (both over 4x the last-level cache)."""
    s, ctx, n_layers = args.batch, args.context, args.layers
    tables, caches = paged(s, ctx, args, gen, layers=n_layers)
    seq_lens = torch.full((s,), ctx, dtype=torch.int64)
    starts = torch.arange(s + 1, dtype=torch.int64)
    q = torch.randn(s, args.heads, args.head_dim, generator=gen)
    out = torch.empty_like(q)
    copy_src = torch.randn(last_level_cache_bytes())    # 4x the LLC: fp32 elements of 4 bytes
    copy_dst = torch.empty_like(copy_src)
    scale = args.head_dim ** -0.5
    rows: dict = {}

    def one_pass(layers):
        for k, v in layers:
            paged_attention_cpu(q, k, v, tables, seq_lens, starts, scale, out=out)
    for _ in range(rounds):
        rows.setdefault("copy", []).append(best_ms(lambda: copy_dst.copy_(copy_src), args.reps))
        rows.setdefault("read", []).append(read_bandwidth(args.reps))
        for dt, layers in caches.items():
            kern = best_ms(lambda: one_pass(layers), args.reps) / n_layers
            k, v = layers[0]
            kf, vf = (k, v) if dt == torch.float32 else (k.float(), v.float())
            ref = best_ms(lambda: paged_attention_decode_cpu(q, kf, vf, tables, seq_lens, scale),
                          args.reps)
            rows.setdefault(dt, []).append((kern, ref))
    copy_ms = min(rows.pop("copy"))
    copy_bw = 2 * copy_src.numel() * 4 / copy_ms / 1e6   # GB/s, read + write
    read_bw = max(rows.pop("read")) / 1e9
    layer_mb = 2 * s * ctx * args.kv_heads * args.head_dim * 4 / 2 ** 20
    print(f"decode attention, batch {s} x context {ctx}, {args.heads} heads / {args.kv_heads} KV "
          f"heads of {args.head_dim}, block {args.block_size}, {args.threads} threads, "
          f"{n_layers} layers in turn ({layer_mb:.0f} MiB of fp32 K/V each; last-level cache "
          f"{last_level_cache_bytes() >> 20} MiB)")
    print(f"copy bandwidth (read + write): {copy_bw:.1f} GB/s; DRAM read bandwidth {read_bw:.1f} "
          f"GB/s (both over {4 * last_level_cache_bytes() >> 20} MiB)")
    print(f"{'cache':13s} {'kernel ms':>9s} {'K/V GB/s':>9s} {'of copy bw':>10s} {'of read bw':>10s} "
          f"{'torch path ms':>13s} {'speed-up':>8s}")
    for dt, results in rows.items():
        kern = min(r[0] for r in results)
        ref = min(r[1] for r in results)
        itemsize = torch.empty((), dtype=dt).element_size()
        nbytes = 2 * s * ctx * args.kv_heads * args.head_dim * itemsize
        bw = nbytes / kern / 1e6
        print(f"{str(dt)[6:]:13s} {kern:9.2f} {bw:9.1f} {bw / copy_bw * 100:9.0f}% "
              f"{bw / read_bw * 100:9.0f}% {ref:13.2f} {ref / kern:7.1f}x")


def prefill_rows(args, rounds: int, gen: torch.Generator) -> None:
    chunks, prefix = args.chunks, args.prefix
    s = len(chunks)
    lens = [prefix + c for c in chunks]
    tables, caches = paged(s, max(lens), args, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c)
    q = torch.randn(starts[-1], args.heads, args.head_dim, generator=gen)
    out = torch.empty_like(q)
    scale = args.head_dim ** -0.5
    # useful FLOPs: query j of a chunk sees prefix + j + 1 keys; QK^T and PV are 2 each per key
    keys = sum(c * prefix + c * (c + 1) // 2 for c in chunks)
    flops = 4 * keys * args.heads * args.head_dim
    rows: dict = {}
    peaks = []
    for _ in range(rounds):
        peaks.append(peak_matmul_flops(torch.float32, "cpu"))   # torch's matmul or oneDNN's
        for dt, [(k, v)] in caches.items():
            kern = best_ms(lambda: paged_attention_cpu(q, k, v, tables, seq_lens,
                                                       torch.tensor(starts), scale, out=out),
                           args.reps)
            rows.setdefault(dt, []).append(kern)
        [(k, v)] = caches[torch.float32]
        rows.setdefault("ref", []).append(best_ms(lambda: paged_attention_prefill_ref(
            q, k, v, tables, starts, lens, scale), max(1, args.reps // 4)))
    peak = max(peaks)
    ref = min(rows.pop("ref"))
    print(f"prompt chunks {chunks} after a cached prefix of {prefix}, {args.heads} heads / "
          f"{args.kv_heads} KV heads of {args.head_dim}, block {args.block_size}, "
          f"{args.threads} threads: {flops / 1e9:.2f} useful GFLOP per call")
    print(f"fp32 GEMM peak (2048^3, torch or oneDNN): {peak / 1e9:.0f} GFLOP/s; torch reference {ref:.2f} ms "
          f"(fp32 cache)")
    print(f"{'cache':13s} {'kernel ms':>9s} {'GFLOP/s':>9s} {'of GEMM peak':>12s} {'vs ref':>7s}")
    for dt, results in rows.items():
        kern = min(results)
        rate = flops / kern / 1e6
        print(f"{str(dt)[6:]:13s} {kern:9.2f} {rate:9.1f} {rate / peak * 1e11:11.0f}% "
              f"{ref / kern:6.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("decode", "prefill", "both"), default="both")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8,
                    help="decode: layers' caches read in turn (1: one layer's, cache-resident)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 512, 512, 512])
    ap.add_argument("--prefix", type=int, default=0, help="cached tokens before each chunk")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--key-scale", type=float, default=1.0,
                    help="K ~ N(0, s^2): 10 spreads the scores ~80 wide, a peaked softmax whose "
                         "tiny probabilities made subnormal products before the kernel flushed "
                         "them to zero")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
    args = ap.parse_args()
    if not cpu_attention_available():
        sys.exit("the C++ extension did not build (see the warning above)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    if args.mode in ("decode", "both"):
        decode_rows(args, args.rounds, gen)
    if args.mode in ("prefill", "both"):
        prefill_rows(args, args.rounds, gen)


if __name__ == "__main__":
    main()
