"""Faults: time to recover per kind of death, tokens recomputed, and the steady-state cost of
the durability writes, in one run.

The stack is started apart, as a supervisor runs it: a private redis-server, one worker, two
schedulers (one active, one standby on the group's lease) and two gateways, all real
processes. For each kind, N greedy streams (HTTP SSE, ``ignore_eos``) run on gateway A; once
every stream has ``--warm-events`` events, the process is SIGKILLed:

- worker: restarted at once on its port (a supervisor would, after its backoff);
- scheduler: the active one (the lease holder); the standby takes over (then a new standby
  is started for the next round);
- gateway: gateway A; every client resumes on gateway B with ``Last-Event-ID``.

Time to recover = kill -> the next token a client receives that was computed after the kill
(the first event after the longest silence that follows it), per stream (median and max over
the streams). Tokens recomputed = the delta of ``tessera:tokens_recomputed_total`` over the
schedulers. Every stream's text is checked against the fault-free run first.

Durability cost in steady state: the same workload (N streams, ``--output-len`` tokens) on
two more stacks started side by side, one scheduler each: the default one (touching its
in-flight entries and claiming stale ones every claim_idle/3) and one with
``--claim-idle-ms 0`` (no touching, no claiming). Rounds alternate between them (the
machine's load drifts); output tok/s medians and their ratio. Timings are reported, never
asserted.

    python benchmarks/faults.py [--streams 16] [--output-len 120] [--rounds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import httpx
import redis

from common import redis_schema as schema
from scheduler.fence import holder_pid
from tessera.make_model import make_model
from tessera.procs import TESSERA, Proc, RedisProc, free_port
from tessera.sse import DONE, SseReader


class Stack:
    """worker + schedulers + gateways of one model name, on a shared Redis."""

    def __init__(self, model: str, redis_url: str, schedulers: int = 2, gateways: int = 2,
                 scheduler_args: tuple[str, ...] = ()) -> None:
        self.model, self.redis_url, self.scheduler_args = model, redis_url, scheduler_args
        self.name = f"bench-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.worker = self._worker().start().wait_ready(300)
        self.schedulers: list[tuple[Proc, int]] = []
        for _ in range(schedulers):
            self.add_scheduler()
        self.gateways = []
        for _ in range(gateways):
            http = free_port()
            p = Proc("gateway", [*TESSERA, "gateway", "--model", model, "--served-model-name",
                                 self.name, "--redis-url", redis_url, "--http-port", str(http),
                                 "--grpc-port", str(free_port())], "gateway ready")
            self.gateways.append((p.start().wait_ready(300), f"http://127.0.0.1:{http}"))

    def _worker(self) -> Proc:
        return Proc("worker", [*TESSERA, "worker", "--model", self.model, "--port",
                               str(self.port), "--kv-cache-memory-gb", "0.05",
                               "--metrics-port", "0"], "worker ready")

    def add_scheduler(self) -> None:
        metrics = free_port()
        p = Proc("scheduler", [*TESSERA, "scheduler", "--model", self.model, "--workers",
                               f"127.0.0.1:{self.port}", "--redis-url", self.redis_url,
                               "--served-model-name", self.name, "--metrics-port",
                               str(metrics), *self.scheduler_args], "scheduler ready")
        self.schedulers.append((p.start().wait_ready(300), metrics))

    def active(self) -> Proc:
        with redis.Redis.from_url(self.redis_url) as r:
            for _ in range(300):
                holder = r.get(schema.group_lease(self.name, "0"))
                for p, _ in self.schedulers:
                    if holder and p.popen.pid == holder_pid(holder) \
                            and p.poll() is None:
                        return p
                time.sleep(0.2)
        raise RuntimeError("no scheduler holds the lease")

    def recomputed(self, seen: dict[int, float] | None = None) -> dict[int, float]:
        """tokens_recomputed_total per scheduler (by pid); a dead one keeps its value in
        ``seen`` (its count does not vanish with it)."""
        counts = dict(seen or {})
        for p, port in self.schedulers:
            if p.poll() is not None:
                continue
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            counts[p.popen.pid] = sum(float(line.split()[-1]) for line in text.splitlines()
                                      if line.startswith("tessera:tokens_recomputed_total{"))
        return counts

    def stop(self) -> None:
        for p, _ in self.gateways:
            p.stop()
        for p, _ in self.schedulers:
            p.stop()
        self.worker.stop()


class Stream:
    """One SSE stream: its texts and the arrival time of each event; resumes elsewhere."""

    def __init__(self, i: int, max_tokens: int) -> None:
        self.body = {"prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
                     "temperature": 0, "ignore_eos": True, "stream": True}
        self.rid: str | None = None
        self.last_id = ""
        self.texts: list[str] = []
        self.times: list[float] = []
        self.done = False

    async def _read(self, r: httpx.Response) -> None:
        reader = SseReader()
        async for line in r.aiter_lines():
            event = reader.feed(line)
            if event is None:
                continue
            eid, data = event
            if data == DONE:
                self.done = True
                return
            c = data["choices"]
            self.texts.append(c[0]["text"] if c else "")
            self.times.append(time.perf_counter())
            self.last_id = eid or self.last_id

    async def run(self, client: httpx.AsyncClient, base: str) -> None:
        try:
            async with client.stream("POST", f"{base}/v1/completions", json=self.body) as r:
                self.rid = r.headers["x-request-id"]
                await self._read(r)
        except httpx.HTTPError:
            pass   # its gateway died: resumed by the caller

    async def resume(self, client: httpx.AsyncClient, base: str) -> None:
        async with client.stream("GET", f"{base}/v1/streams/{self.rid}",
                                 headers={"Last-Event-ID": self.last_id}) as r:
            await self._read(r)


async def _streams(base: str, n: int, max_tokens: int, kill=None, warm: int = 5,
                   resume_base: str | None = None) -> tuple[list[Stream], float | None]:
    """n streams; ``kill()`` once each has ``warm`` events (returns the kill time)."""
    streams = [Stream(i, max_tokens) for i in range(n)]
    killed = None
    async with httpx.AsyncClient(timeout=300) as client:
        tasks = [asyncio.create_task(s.run(client, base)) for s in streams]
        if kill is not None:
            while not all(len(s.times) >= warm for s in streams):
                await asyncio.sleep(0.01)
            killed = time.perf_counter()
            await asyncio.to_thread(kill)
        await asyncio.gather(*tasks)
        if resume_base is not None:
            await asyncio.gather(*(s.resume(client, resume_base) for s in streams
                                   if not s.done))
    return streams, killed


def _recovery(streams: list[Stream], killed: float) -> tuple[float, float]:
    """Per stream, kill -> the first event after the longest silence that follows the kill
    (events already on their way when the process died arrive first and do not count)."""
    waits = []
    for s in streams:
        after = [t for t in s.times if t > killed]
        if not after:
            continue
        gaps = [(t - prev, t) for prev, t in zip([killed, *after], after)]
        waits.append(max(gaps)[1] - killed)
    return statistics.median(waits), max(waits)


def faults(stack: Stack, n: int, max_tokens: int, warm: int) -> list[tuple]:
    ref, _ = asyncio.run(_streams(stack.gateways[0][1], n, max_tokens))
    rows = []
    for kind in ("worker", "scheduler", "gateway"):
        before = stack.recomputed()
        if kind == "worker":
            def kill():
                stack.worker.popen.kill()
                stack.worker.popen.wait()
                stack.worker.start().wait_ready(300)
        elif kind == "scheduler":
            victim = stack.active()

            def kill():
                victim.popen.kill()
                victim.popen.wait()
        else:
            def kill():
                stack.gateways[0][0].popen.kill()
                stack.gateways[0][0].popen.wait()
        streams, killed = asyncio.run(_streams(
            stack.gateways[0][1], n, max_tokens, kill, warm,
            resume_base=stack.gateways[1][1] if kind == "gateway" else None))
        assert all(s.done for s in streams), kind
        assert ["".join(s.texts) for s in streams] == ["".join(s.texts) for s in ref], kind
        median, worst = _recovery(streams, killed)
        if kind == "scheduler":
            stack.add_scheduler()   # the supervisor's replacement standby
        after = stack.recomputed(before)
        rows.append((kind, median, worst, sum(after.values()) - sum(before.values())))
    return rows


def steady_cost(model: str, redis_url: str, n: int, max_tokens: int, rounds: int):
    on = Stack(model, redis_url, schedulers=1, gateways=1)
    off = Stack(model, redis_url, schedulers=1, gateways=1,
                scheduler_args=("--claim-idle-ms", "0"))
    rates = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for key, stack in (("on", on), ("off", off)):
                t0 = time.perf_counter()
                streams, _ = asyncio.run(_streams(stack.gateways[0][1], n, max_tokens))
                rates[key].append(sum(len(s.times) for s in streams)
                                  / (time.perf_counter() - t0))
    finally:
        on.stop()
        off.stop()
    return statistics.median(rates["on"]), statistics.median(rates["off"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=120)
    ap.add_argument("--warm-events", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-faults-"))
    model = str(make_model(tmp / "model", "llama", preset="tiny"))
    rds = RedisProc(tmp).start().wait_ready(30)
    try:
        stack = Stack(model, rds.url)
        try:
            rows = faults(stack, args.streams, args.output_len, args.warm_events)
        finally:
            stack.stop()
        on, off = steady_cost(model, rds.url, args.streams, args.output_len, args.rounds)
    finally:
        rds.stop()
    print(f"\n{args.streams} greedy streams of {args.output_len} tokens, tiny llama, CPU")
    print("| killed | recover, median (s) | recover, max (s) | tokens recomputed |")
    print("|---|---|---|---|")
    for kind, median, worst, tokens in rows:
        print(f"| {kind} | {median:.2f} | {worst:.2f} | {tokens:.0f} |")
    print(f"\nsteady state, output tok/s (median of {args.rounds} alternating rounds): "
          f"durability writes on {on:.0f}, off {off:.0f}, ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
