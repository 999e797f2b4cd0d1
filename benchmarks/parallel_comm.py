"""What tensor and pipeline parallelism cost per layer on this machine (CPU, gloo).

    python benchmarks/parallel_comm.py [--hidden 512 4096] [--tokens 1 16 256] [--e2e MODEL_DIR]

Two processes joined by gloo over loopback time, for a batch of T tokens of hidden size H:
  - all_reduce of [T, H] fp32: a TP layer does two (after attention and after the MLP);
  - send + recv of the [2, T, H] (hidden, residual) pair: a PP stage boundary, one per step;
next to the compute of one Llama layer (H, 4H/3*2 MLP-ish sizes of the bench preset scaled)
at full width and at half width (what each of 2 TP ranks computes), in the same run.
With --e2e, also the offline decode throughput of MODEL_DIR at TP=1, TP=2 and PP=2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _comm(rank: int, port: int, sizes: list[tuple[int, int]], iters: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    results = {}
    for t, h in sizes:
        x = torch.randn(t, h)
        ar = _median_ms(lambda: dist.all_reduce(x), iters)
        pair = torch.randn(2, t, h)

        def ping_pong():
            if rank == 0:
                dist.send(pair, 1)
                dist.recv(pair, 1)
            else:
                dist.recv(pair, 0)
                dist.send(pair, 0)
        p2p = _median_ms(ping_pong, iters) / 2
        results[(t, h)] = (ar, p2p)
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def _layer_ms(t: int, h: int, width: float, iters: int) -> float:
    """One Llama layer's matmuls for T tokens, at `width` of the full layer (TP slice)."""
    inter = int(h * 8 / 3) // 64 * 64
    w_qkv = torch.randn(int(3 * h * width), h)
    w_o = torch.randn(h, int(h * width))
    w_gu = torch.randn(int(2 * inter * width), h)
    w_d = torch.randn(h, int(inter * width))
    x = torch.randn(t, h)

    def layer():
        a = x @ w_qkv.t()
        y = a[:, :w_o.shape[1]] @ w_o.t()
        g = y @ w_gu.t()
        return g[:, :w_d.shape[1]] @ w_d.t()
    return _median_ms(layer, iters)


def _e2e(model_dir: str) -> None:
    from tessera import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(10 + i, 42 + i))} for i in range(16)]
    print("\noffline decode, 16 requests x 64 tokens:")
    base = None
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        with LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                 kv_cache_memory_gb=64 / 1024) as llm:
            llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t
        rate = sum(len(o.outputs[0].token_ids) for o in outs) / dt
        base = base or rate
        print(f"  TP={tp} PP={pp}: {rate:7.1f} tok/s  ({rate / base:.2f}x of TP=1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--e2e", metavar="MODEL_DIR", default=None)
    args = ap.parse_args()
    sizes = [(t, h) for h in args.hidden for t in args.tokens]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_comm, args=(r, port, sizes, args.iters, out)) for r in range(2)]
    for p in procs:
        p.start()
    comm = out.get(timeout=600)
    for p in procs:
        p.join()
    torch.set_num_threads(1)   # each TP rank has one of this machine's cores
    print(f"{'H':>5} {'T':>4} | {'layer 1/1':>9} {'layer 1/2':>9} | {'2x allred':>9} "
          f"{'send+recv':>9} | TP=2 layer vs 1/1   PP boundary vs layer")
    for t, h in sizes:
        full = _layer_ms(t, h, 1.0, args.iters)
        half = _layer_ms(t, h, 0.5, args.iters)
        ar, p2p = comm[(t, h)]
        tp_layer = half + 2 * ar
        print(f"{h:>5} {t:>4} | {full:8.3f}m {half:8.3f}m | {2 * ar:8.3f}m {p2p:8.3f}m | "
              f"{full / tp_layer:8.2f}x speedup   {p2p / full:8.1%} of a layer")
    print("(ms; medians; fp32; 1 thread per rank; gloo over loopback)")
    if args.e2e:
        _e2e(args.e2e)


if __name__ == "__main__":
    main()
