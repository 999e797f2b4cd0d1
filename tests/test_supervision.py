"""`tessera serve` supervises its children, as Kubernetes would: SIGKILL any one of them and it
is restarted (with backoff, counted in the status line and in the restarted process's
/metrics) and the stack serves again; `--no-restart` stops the stack instead. Redis runs with
AOF and the services ride out its restart (common/redis_client.py)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import redis
from cli_procs import listed, start_serve
from common.redis_schema import SCHEDULERS_GROUP, requests_stream
from tessera.procs import free_port


TOKENS = 400   # long enough that the requests are mid-generation when Redis dies


def children(pid: int) -> dict[str, int]:
    """The direct children of `pid`, by role: worker, scheduler, gateway, redis."""
    return {role: child for role, child in child_list(pid)}


def child_list(pid: int) -> list[tuple[str, int]]:
    """The direct children of `pid` as (role, pid), in pid order."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid != pid:
            continue
        words = [w.decode() for w in argv if w]
        if words and "redis-server" in words[0]:   # it rewrites its title: "PATH HOST:PORT"
            found.append(("redis", int(entry.name)))
        elif "tessera.cli" in words:
            found.append((words[words.index("tessera.cli") + 1], int(entry.name)))
    return sorted(found, key=lambda c: c[1])


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def complete(base: str, name: str, max_tokens: int = 4) -> dict | None:
    try:
        r = httpx.post(base + "/v1/completions", json={
            "model": name, "prompt": "hello there", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}, timeout=60)
    except httpx.HTTPError:
        return None
    body = r.json() if r.status_code == 200 else None
    if body and body["choices"][0]["finish_reason"] == "length":
        return body
    return None


def restarts(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    return {s.labels["service"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "tessera:process_restarts_total"}


@pytest.fixture(scope="module")
def stack(tiny_model):
    model_dir = str(tiny_model("llama"))
    http = free_port()
    proc, lines = start_serve(["--model", model_dir, "--http-port", str(http), "--grpc-port",
                               str(free_port()), "--kv-cache-memory-gb", "0.02",
                               "--max-num-batched-tokens", "128",
                               # one scheduler: each child is named by its role here (the
                               # standbys' take-over is tests/test_faults.py's)
                               "--scheduler-replicas", "1"], timeout=180)
    metrics = dict((svc, url) for url, svc in re.findall(
        r"(http://\S+/metrics) \((\w+)\)", next(l for l in lines if "Metrics" in l)))
    yield proc, f"http://127.0.0.1:{http}", os.path.basename(model_dir), metrics, lines
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize("service", ["gateway", "worker", "scheduler"])
def test_a_killed_child_is_restarted_and_serves_again(stack, service):
    proc, base, name, metrics, _ = stack
    assert complete(base, name), "serves before the kill"
    before = children(proc.pid)
    assert {"gateway", "worker", "scheduler", "redis"} <= set(before)
    os.kill(before[service], signal.SIGKILL)
    wait_for(lambda: f"{service} restarted (restarts: 1)" in proc.output(), 240,
             f"{service} to be restarted:\n{proc.output()}")
    assert f"{service} exited with status -9" in proc.output()
    after = children(proc.pid)
    assert after[service] != before[service]
    assert all(after[s] == before[s] for s in before if s != service), "only it restarted"
    # a restarted worker is re-warmed by the scheduler, a restarted scheduler waits out the
    # dead one's lease: serving resumes within a bound, not at once
    assert wait_for(lambda: complete(base, name), 120, "a completion after the restart")
    assert restarts(metrics[service]) == {service: 1.0}
    assert proc.poll() is None


def test_redis_restart_is_a_pause_for_in_flight_requests(stack):
    """SIGKILL of the private redis-server mid-generation: the supervisor restarts it on its
    port, from its AOF; the services' clients retry with backoff, and the requests in flight
    finish with every token."""
    proc, base, name, _, lines = stack
    assert complete(base, name)

    r = redis.Redis.from_url(listed(lines, "Redis"))
    # (a scheduler killed above leaves what it had read pending: count from here)
    before = r.xpending(requests_stream(name), SCHEDULERS_GROUP)["pending"]

    async def run(n: int, kill: bool = True) -> list[dict]:
        async with httpx.AsyncClient(timeout=240) as client:
            async def one(i: int) -> dict:
                r = await client.post(base + "/v1/completions", json={
                    "model": name, "prompt": f"request {i}", "max_tokens": TOKENS,
                    "temperature": 0, "ignore_eos": True})
                return r.json() | {"status": r.status_code}
            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            if not kill:
                return await asyncio.gather(*tasks)
            # under way: the scheduler has the requests (the stream's group has read them)
            # and none has finished
            for _ in range(600):
                pending = r.xpending(requests_stream(name), SCHEDULERS_GROUP)["pending"]
                if pending == before + n:
                    break
                await asyncio.sleep(0.05)
            assert pending == before + n and not any(t.done() for t in tasks)
            os.kill(children(proc.pid)["redis"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    services = {k: v for k, v in children(proc.pid).items() if k != "redis"}
    results = asyncio.run(run(32))   # 32 concurrent requests, as the other fault tests
    assert all(r["status"] == 200 for r in results), results
    wait_for(lambda: "redis restarted (restarts: 1)" in proc.output(), 60, "redis's restart")
    after = children(proc.pid)
    assert {k: after[k] for k in services} == services, "the services reconnected, none exited"
    assert all(r["usage"]["completion_tokens"] == TOKENS for r in results)
    # greedy: the same text as the same requests without a fault
    again = asyncio.run(run(32, kill=False))
    assert [r["choices"][0]["text"] for r in results] == [r["choices"][0]["text"] for r in again]


def test_no_restart_stops_the_stack_when_a_child_dies(tiny_model):
    proc, _ = start_serve(["--model", str(tiny_model("llama")), "--http-port", str(free_port()),
                           "--grpc-port", str(free_port()), "--kv-cache-memory-gb", "0.02",
                           "--no-restart"], timeout=180)
    try:
        os.kill(children(proc.pid)["gateway"], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        assert "gateway exited with status -9; stopping the stack (--no-restart)" in proc.output()
    finally:
        proc.stop()


def test_a_worker_group_is_restarted_as_a_group(tiny_model):
    """-tp 2: SIGKILL of one rank restarts both (a process group cannot be re-formed one rank
    at a time); the scheduler warms the new group up and serves again."""
    http = free_port()
    proc, lines = start_serve(["--model", str(tiny_model("llama")), "--http-port", str(http),
                               "--grpc-port", str(free_port()), "--kv-cache-memory-gb", "0.01",
                               "-tp", "2"], timeout=240)
    base, name = f"http://127.0.0.1:{http}", tiny_model("llama").name
    try:
        assert complete(base, name)
        workers = [pid for role, pid in child_list(proc.pid) if role == "worker"]
        assert len(workers) == 2
        scheduler = children(proc.pid)["scheduler"]
        os.kill(workers[1], signal.SIGKILL)
        wait_for(lambda: "worker group 0 restarted (restarts: 1)" in proc.output(), 300,
                 f"the group's restart:\n{proc.output()}")
        now = [pid for role, pid in child_list(proc.pid) if role == "worker"]
        assert len(now) == 2 and not set(now) & set(workers), "both ranks are new processes"
        assert children(proc.pid)["scheduler"] == scheduler
        assert wait_for(lambda: complete(base, name), 180, "a completion after the restart")
        metrics = dict((svc, url) for url, svc in re.findall(
            r"(http://\S+/metrics) \(([\w-]+)\)", next(l for l in lines if "Metrics" in l)))
        assert restarts(metrics["worker0-1"]) == {"worker0-1": 1.0}
    finally:
        proc.stop(timeout=60)
