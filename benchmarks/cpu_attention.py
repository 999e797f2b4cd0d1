"""CPU decode attention: the C++ kernel's achieved K/V bandwidth against a measured copy.

Decode attention reads each sequence's K and V once: its floor is memory bandwidth. This
times one layer's decode attention at batch x context (default 64 x 512, the bench model's
8 KV heads of 64) for each cache dtype, interleaved in the same run with a large tensor copy
(bandwidth counted as read + write) and with the torch path it replaces
(kernels/paged_attention_cpu.py `paged_attention_decode_cpu`: gather into reused buffers +
batched matmuls). Reported: ms per call, K/V bytes read per second, that as a fraction of
the copy bandwidth, and the speed-up over the torch path.

    python benchmarks/cpu_attention.py [--batch 64] [--context 512] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time

import torch

from kernels.paged_attention_cpu import (cpu_attention_available, paged_attention_cpu,
                                         paged_attention_decode_cpu)


def best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
    args = ap.parse_args()
    if not cpu_attention_available():
        sys.exit("the C++ extension did not build (see the warning above)")
    torch.set_num_threads(args.threads)
    s, ctx, bs = args.batch, args.context, args.block_size
    per_seq = -(-ctx // bs)
    num_blocks = s * per_seq + 16
    tables = torch.randperm(num_blocks)[:s * per_seq].view(s, per_seq)   # scattered blocks
    seq_lens = torch.full((s,), ctx, dtype=torch.int64)
    starts = torch.arange(s + 1, dtype=torch.int64)
    q = torch.randn(s, args.heads, args.head_dim)
    out = torch.empty_like(q)
    shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    copy_src = torch.randn(2 * s * ctx * args.kv_heads * args.head_dim)   # fp32 K + V bytes
    copy_dst = torch.empty_like(copy_src)
    caches = {dt: (torch.randn(shape).to(dt), torch.randn(shape).to(dt))
              for dt in (torch.float32, torch.float16, torch.bfloat16)}
    scale = args.head_dim ** -0.5
    rows = {}
    for _ in range(args.rounds):
        copy_ms = best_ms(lambda: copy_dst.copy_(copy_src), args.reps)
        rows.setdefault("copy", []).append(copy_ms)
        for dt, (k, v) in caches.items():
            kern = best_ms(lambda: paged_attention_cpu(q, k, v, tables, seq_lens, starts, scale,
                                                       out=out), args.reps)
            kf, vf = (k, v) if dt == torch.float32 else (k.float(), v.float())
            ref = best_ms(lambda: paged_attention_decode_cpu(q, kf, vf, tables, seq_lens, scale),
                          args.reps)
            rows.setdefault(dt, []).append((kern, ref))
    copy_ms = min(rows.pop("copy"))
    copy_bw = 2 * copy_src.numel() * 4 / copy_ms / 1e6   # GB/s, read + write
    print(f"decode attention, batch {s} x context {ctx}, {args.heads} heads / {args.kv_heads} KV "
          f"heads of {args.head_dim}, block {bs}, {args.threads} threads")
    print(f"copy bandwidth (read + write): {copy_bw:.1f} GB/s")
    print(f"{'cache':9s} {'kernel ms':>9s} {'K/V GB/s':>9s} {'of copy bw':>10s} "
          f"{'torch path ms':>13s} {'speed-up':>8s}")
    for dt, results in rows.items():
        kern = min(r[0] for r in results)
        ref = min(r[1] for r in results)
        nbytes = 2 * s * ctx * args.kv_heads * args.head_dim * torch.empty((), dtype=dt).element_size()
        bw = nbytes / kern / 1e6
        print(f"{str(dt)[6:]:9s} {kern:9.2f} {bw:9.1f} {bw / copy_bw * 100:9.0f}% {ref:13.2f} "
              f"{ref / kern:7.1f}x")


if __name__ == "__main__":
    main()
