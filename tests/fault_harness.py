"""Helpers of the fault tests (tests/test_faults.py): services started as real processes,
SSE and gRPC stream clients that pause mid-stream and resume, the fault-free reference run."""

from __future__ import annotations

import signal
import os
import subprocess
import sys
import threading
import time
import uuid

import httpx

from scheduler.admission import POISON_ENV
from scheduler.fence import holder_pid
from tessera.client import TesseraClient, TesseraError
from tessera.procs import free_port
from tessera.sse import DONE, events

MAX_TOKENS = 40
POISON = "poison-"

def start(args: list[str], ready: str, env: dict[str, str] | None = None,
           timeout: float = 180) -> subprocess.Popen:
    """`tessera ARGS`, once it prints `ready`; its later output is drained (never blocks it)."""
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if ready in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    proc.kill()
    raise RuntimeError(f"tessera {args[0]} did not start:\n" + "".join(lines[-30:]))


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


class Stack:
    """worker + scheduler (with the poison hook armed) + gateways, on the session's Redis."""

    def __init__(self, model_dir: str, redis_url: str, poison: str = POISON) -> None:
        self.model_dir, self.redis_url = model_dir, redis_url
        self.name = f"faults-{uuid.uuid4().hex[:6]}"
        port = free_port()
        self.worker = start(["worker", "--model", model_dir, "--port", str(port),
                              "--kv-cache-memory-gb", "0.02", "--metrics-port", "0"],
                             "worker ready")
        self.scheduler = start(["scheduler", "--model", model_dir, "--workers",
                                 f"127.0.0.1:{port}", "--redis-url", redis_url,
                                 "--served-model-name", self.name, "--metrics-port", "0",
                                 "--max-num-batched-tokens", "512"], "scheduler ready",
                                env={POISON_ENV: poison})
        self.gateways: list[tuple[subprocess.Popen, str, str]] = []

    def gateway(self) -> tuple[subprocess.Popen, str, str]:
        http, grpc_port = free_port(), free_port()
        proc = start(["gateway", "--model", self.model_dir, "--served-model-name", self.name,
                       "--redis-url", self.redis_url, "--http-port", str(http),
                       "--grpc-port", str(grpc_port)], "gateway ready")
        g = (proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}")
        self.gateways.append(g)
        return g

    def close(self) -> None:
        stop(*(p for p, _, _ in self.gateways), self.scheduler, self.worker)


def prompt(i: int) -> str:
    return f"Story {i}: once upon a time"


def sampling(i: int) -> dict:
    """Greedy, except every fourth stream: seeded temperature-1.0 sampling."""
    return {"temperature": 1.0, "seed": 1000 + i} if i % 4 == 3 else {"temperature": 0}


def http_body(i: int, max_tokens: int) -> tuple[str, dict]:
    if i % 2:
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, **sampling(i)}
    return "/v1/completions", {"prompt": prompt(i), "max_tokens": max_tokens,
                               "ignore_eos": True, "stream": True, **sampling(i)}


def text_of(data: dict) -> str:
    c = data["choices"][0] if data.get("choices") else {}
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


class HttpStream:
    """One SSE client: reads ``pause_after`` events, waits for ``go``, then reads on until
    the connection breaks, and resumes on ``resume_url`` after the last id it saw."""

    def __init__(self, i: int, base_url: str, pause_after: int | None, go: threading.Event,
                 max_tokens: int = MAX_TOKENS):
        self.i, self.base_url, self.pause_after, self.go = i, base_url, pause_after, go
        self.max_tokens = max_tokens
        self.events: list[tuple[str | None, dict]] = []
        self.rid: str | None = None
        self.last_id: str | None = None
        self.paused = threading.Event()
        self.done = False

    def _read(self, response: httpx.Response) -> None:
        for eid, data in events(response.iter_lines()):
            if data == DONE:
                self.done = True
                return
            self.events.append((eid, data))
            if eid is not None:
                self.last_id = eid
            if self.pause_after is not None and len(self.events) == self.pause_after:
                self.paused.set()
                self.go.wait(120)

    def run(self) -> None:
        path, body = http_body(self.i, self.max_tokens)
        try:
            with httpx.Client(timeout=60) as c, c.stream("POST", self.base_url + path,
                                                         json=body) as r:
                self.rid = r.headers["x-request-id"]
                self._read(r)
        except httpx.HTTPError:
            pass   # the gateway died under us
        finally:
            self.paused.set()

    def resume(self, base_url: str) -> None:
        with httpx.Client(timeout=60) as c, c.stream(
                "GET", f"{base_url}/v1/streams/{self.rid}",
                headers={"Last-Event-ID": self.last_id or ""}) as r:
            assert r.status_code == 200, r.read()
            self._read(r)

    @property
    def text(self) -> str:
        return "".join(text_of(d) for _, d in self.events)


def grpc_stream(address: str, rid: str, i: int, pause_after: int | None,
                go: threading.Event, out: list, paused: threading.Event,
                max_tokens: int = MAX_TOKENS) -> None:
    try:
        with TesseraClient(address, timeout=300) as client:
            for chunk in client.stream(prompt(i), request_id=rid, max_tokens=max_tokens,
                                       ignore_eos=True, **sampling(i)):
                out.append(chunk)
                if pause_after is not None and len(out) == pause_after:
                    paused.set()
                    go.wait(120)
    except TesseraError:
        pass   # the gateway died under us
    finally:
        paused.set()


def reference(stack: Stack, base_url: str, grpc_address: str, n_http: int, n_grpc: int,
               max_tokens: int = MAX_TOKENS):
    """The fault-free run, on the same stack."""
    go = threading.Event()
    go.set()
    streams = [HttpStream(i, base_url, None, go, max_tokens) for i in range(n_http)]
    grpc_out = [[] for _ in range(n_grpc)]
    threads = [threading.Thread(target=s.run) for s in streams] + [
        threading.Thread(target=grpc_stream, args=(grpc_address, f"ref-{uuid.uuid4().hex}",
                                                   i, None, go, grpc_out[i], threading.Event(),
                                                   max_tokens))
        for i in range(n_grpc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(s.done for s in streams)
    return [s.text for s in streams], ["".join(c.text for ch in out for c in ch.choices)
                                       for out in grpc_out]


def metric(port: int, name: str, **labels: str) -> float:
    """A sample of a service's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class Services:
    """Services started apart, as a supervisor would run them: per worker group one worker
    (restartable on its port) and ``schedulers`` schedulers (the first takes the group's
    lease, the others stand by), and one gateway."""

    def __init__(self, model_dir: str, redis_url: str, groups: int = 1,
                 schedulers: int = 2) -> None:
        self.model_dir, self.redis_url = model_dir, redis_url
        self.name = f"recover-{uuid.uuid4().hex[:6]}"
        self.workers: dict[int, tuple[list[str], subprocess.Popen]] = {}
        self.schedulers: list[tuple[int, subprocess.Popen, int]] = []   # group, proc, metrics
        self.gw: subprocess.Popen | None = None
        try:
            for g in range(groups):
                args = ["worker", "--model", model_dir, "--port", str(free_port()),
                        "--kv-cache-memory-gb", "0.02", "--metrics-port", "0"]
                self.workers[g] = (args, start(args, "worker ready"))
            for g in range(groups):
                for _ in range(schedulers):
                    self.add_scheduler(g)
            http, grpc_port = free_port(), free_port()
            self.gw = start(["gateway", "--model", model_dir, "--served-model-name", self.name,
                             "--redis-url", redis_url, "--http-port", str(http),
                             "--grpc-port", str(grpc_port)], "gateway ready")
            self.http, self.grpc = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
        except BaseException:
            self.close()
            raise

    def add_scheduler(self, group: int) -> subprocess.Popen:
        port = self.workers[group][0][self.workers[group][0].index("--port") + 1]
        metrics = free_port()
        proc = start(["scheduler", "--model", self.model_dir, "--workers", f"127.0.0.1:{port}",
                      "--redis-url", self.redis_url, "--served-model-name", self.name,
                      "--group", str(group), "--metrics-port", str(metrics),
                      "--max-num-batched-tokens", "512"], "scheduler ready")
        self.schedulers.append((group, proc, metrics))
        return proc

    def active(self, group: int = 0) -> tuple[subprocess.Popen, int]:
        """The scheduler holding the group's lease (its value is "host-pid epoch"), and its
        metrics port; waits for one to hold it."""
        import redis

        from common import redis_schema as schema

        deadline = time.monotonic() + 60
        with redis.Redis.from_url(self.redis_url) as r:
            while time.monotonic() < deadline:
                holder = r.get(schema.group_lease(self.name, str(group)))
                pid = holder_pid(holder)
                for g, proc, port in self.schedulers:
                    if g == group and proc.pid == pid and proc.poll() is None:
                        return proc, port
                time.sleep(0.2)
        raise AssertionError(f"no scheduler holds the lease of group {group}")

    def kill_worker(self, group: int = 0) -> None:
        proc = self.workers[group][1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart_worker(self, group: int = 0) -> None:
        args, _ = self.workers[group]
        self.workers[group] = (args, start(args, "worker ready"))

    def close(self) -> None:
        stop(*([self.gw] if self.gw else []), *(p for _, p, _ in self.schedulers),
             *(p for _, p in self.workers.values()))


def streams_through(svc: Services, fault, n_http: int = 16, n_grpc: int = 16,
                    max_tokens: int = MAX_TOKENS) -> None:
    """32 concurrent streams (HTTP completions and chat, gRPC; a quarter seeded temperature
    1.0, the rest greedy); ``fault()`` strikes once every client has two events; then every
    stream must complete with the fault-free run's text, contiguous event ids, none twice."""
    ref_http, ref_grpc = reference(svc, svc.http, svc.grpc, n_http, n_grpc, max_tokens)
    go = threading.Event()
    streams = [HttpStream(i, svc.http, 2, go, max_tokens) for i in range(n_http)]
    grpc_ids = [f"g-{uuid.uuid4().hex}" for _ in range(n_grpc)]
    grpc_out: list[list] = [[] for _ in range(n_grpc)]
    grpc_paused = [threading.Event() for _ in range(n_grpc)]
    threads = [threading.Thread(target=s.run) for s in streams] + [
        threading.Thread(target=grpc_stream, args=(svc.grpc, grpc_ids[i], i, 2, go,
                                                   grpc_out[i], grpc_paused[i], max_tokens))
        for i in range(n_grpc)]
    for t in threads:
        t.start()
    try:
        for e in [s.paused for s in streams] + grpc_paused:
            assert e.wait(120)
        fault()
    finally:
        go.set()
        for t in threads:
            t.join(300)
    for s, expected in zip(streams, ref_http):
        assert s.done and s.text == expected, (s.i, s.text, expected)
        ids = [int(e.split(":")[1]) for e, _ in s.events if e is not None]
        assert ids == list(range(len(ids))), "event ids are contiguous, none twice"
    for out, expected in zip(grpc_out, ref_grpc):
        assert [ch.index for ch in out] == list(range(len(out)))
        assert "".join(c.text for ch in out for c in ch.choices) == expected
        assert out[-1].choices[-1].finish_reason == "length"
