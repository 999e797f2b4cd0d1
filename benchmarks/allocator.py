"""The engine under other memory allocators: glibc malloc against tcmalloc and jemalloc.

Runs benchmarks/offline_throughput.py (the bench workload, fast path only, no HF baselines) in
a fresh process per run with each allocator preloaded (`LD_PRELOAD`), the allocators
alternating for --rounds rounds (the machine is shared: its load drifts), and prints each
run's tok/s and tokens per CPU-second and the median ratio of each allocator against glibc
in the same rounds. An allocator whose library is not installed is skipped (Debian:
`apt-get install libtcmalloc-minimal4 libjemalloc2`). `tessera serve` preloads tcmalloc
into its CPU workers (tessera.launcher.cpu_allocator_env); any other tessera process can
have it with `LD_PRELOAD=libtcmalloc_minimal.so.4 tessera ...`.

`as_served()` is how the other benchmarks run the in-process engine on the allocator serve's
workers have: offline_throughput.py and serving_overhead.py run themselves again under it.

    python benchmarks/allocator.py [--rounds 2] [--allocators tcmalloc jemalloc]
                                  [--num-requests 64] [--output-len 64]
"""

from __future__ import annotations

import argparse
import ctypes.util
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tessera.launcher import cpu_allocator_env

# found as the launcher finds tcmalloc (ctypes.util.find_library: a soname, or None)
ALLOCATORS = {"glibc": None, "tcmalloc": ctypes.util.find_library("tcmalloc_minimal"),
              "jemalloc": ctypes.util.find_library("jemalloc")}
SCRIPT = Path(__file__).resolve().parent / "offline_throughput.py"
FAST = re.compile(r"^fast\s+([\d.]+)\s+.*?\s([\d.]+)\s+\|", re.M)


# Set in a benchmark that as_served() ran again under the allocator of serve's workers.
SERVED_ALLOCATOR = "TESSERA_BENCH_SERVED_ALLOCATOR"


def as_served() -> bool:
    """Run this script again (exec) under the allocator `tessera serve` preloads into its CPU
    workers, unless it already runs under it or the user set LD_PRELOAD (`LD_PRELOAD=`:
    glibc's malloc), which is kept. True in the process that was run again."""
    if SERVED_ALLOCATOR in os.environ:
        return True
    env = cpu_allocator_env()
    if env:
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **env, SERVED_ALLOCATOR: "1"})
    return False


def allocator_of(pid: int | str = "self") -> str:
    """The allocator a process has mapped: tcmalloc, jemalloc or glibc."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return next((n for n in ("tcmalloc", "jemalloc") if f"lib{n}" in maps), "glibc")


def run(preload: str | None, args) -> tuple[float, float]:
    """(tok/s, tokens per CPU-second) of one offline_throughput run."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = preload or ""   # empty: glibc (as_served)
    cmd = [sys.executable, str(SCRIPT), "--rounds", "1", "--skip-hf", "--skip-torch-path",
           "--num-requests", str(args.num_requests), "--output-len", str(args.output_len)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    m = FAST.search(proc.stdout)
    if m is None:
        raise RuntimeError(f"no result line in offline_throughput's output:\n{proc.stdout}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS)[1:],
                    default=list(ALLOCATORS)[1:], help="compared against glibc")
    args = ap.parse_args()
    names = ["glibc"] + [n for n in args.allocators if ALLOCATORS[n] is not None]
    skipped = sorted(set(args.allocators) - set(names))
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            results[n].append(run(ALLOCATORS[n], args))
            tps, per_cpu = results[n][-1]
            print(f"round {r + 1}: {n:9s} {tps:7.1f} tok/s {per_cpu:7.1f} tok/CPU-s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    base = results["glibc"]
    print(f"\n{'allocator':9s} {'median tok/s':>12s} {'vs glibc':>9s} {'tok/CPU-s vs glibc':>19s}"
          + (f"   (not installed: {', '.join(skipped)})" if skipped else ""))
    for n, rs in results.items():
        speed = statistics.median(a[0] / b[0] for a, b in zip(rs, base))
        per_cpu = statistics.median(a[1] / b[1] for a, b in zip(rs, base))
        print(f"{n:9s} {statistics.median(x[0] for x in rs):12.1f} {speed:8.2f}x {per_cpu:18.2f}x")


if __name__ == "__main__":
    main()
