"""CPU KV-cache write: the C++ one-pass kernel against the torch path it replaced.

One layer's write of T tokens' keys and values (the bench model's 8 KV heads of 64, key and
value strided views of one fused projection, as in the model) into scattered slots of a
cache larger than the last-level cache, per cache dtype: a decode step's T = 64..128 rows and
a prompt step's 2048. The torch path (kernels/kv_write.py `write_kv_cache_ref`) converts
into a temporary and scatters it with index_copy_; the kernel (kernels/csrc/kv_write_cpu.cpp)
converts on the way. Interleaved rounds, the best of each kept; both write the same bits
(tests/test_cpu_kv_write.py).

    python benchmarks/kv_write.py [--tokens 128 2048] [--blocks 8192] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse

import torch

from benchmarks.cpu_attention import DTYPES, best_ms
from kernels.cpu_ext import cpu_ops
from kernels.kv_write import write_kv_cache_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--blocks", type=int, default=8192, help="cache blocks of 16 tokens")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if cpu_ops() is None:
        sys.exit("the C++ extension did not build (see the warning above)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hkv, d = args.kv_heads, args.head_dim
    print(f"{args.threads} threads; cache {args.blocks} blocks x 16 x {hkv} x {d} per K and V; "
          f"best of {args.rounds} interleaved rounds x {args.reps} calls")
    print(f"{'cache':>14} {'tokens':>6} {'torch us':>9} {'kernel us':>9} {'GB/s':>6} {'speed-up':>8}")
    for dt in DTYPES:
        k_cache = torch.zeros(args.blocks, 16, hkv, d, dtype=dt)
        v_cache = torch.zeros_like(k_cache)
        for t in args.tokens:
            fused = torch.randn(t, 3 * hkv * d, generator=gen)   # q | k | v of one projection
            key = fused[:, hkv * d:2 * hkv * d].view(t, hkv, d)
            value = fused[:, 2 * hkv * d:].view(t, hkv, d)
            slots = torch.randperm(args.blocks * 16, generator=gen)[:t]
            ref, kern = float("inf"), float("inf")
            for r in range(args.rounds):
                calls = [("ref", lambda: write_kv_cache_ref(key, value, k_cache, v_cache, slots)),
                         ("kern", lambda: cpu_ops().write_kv_cache(key, value, k_cache, v_cache,
                                                                   slots))]
                for name, fn in (calls if r % 2 == 0 else calls[::-1]):
                    us = best_ms(fn, args.reps) * 1e3
                    ref, kern = (min(ref, us), kern) if name == "ref" else (ref, min(kern, us))
            moved = 2 * t * hkv * d * (4 + k_cache.element_size())   # read fp32, write the cache
            print(f"{str(dt).removeprefix('torch.'):>14} {t:>6} {ref:>9.1f} {kern:>9.1f} "
                  f"{moved / kern / 1e3:>6.1f} {ref / kern:>7.2f}x")


if __name__ == "__main__":
    main()
