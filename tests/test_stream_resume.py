"""Stream resume on another gateway replica (DESIGN.md §4): SSE event ids, GET /v1/streams,
GET /v1/requests, the gRPC resume cursor and the disconnect policy's TTL.

Two real gateway replicas share a real redis-server; the other side of Redis is the scripted
scheduler stand-in of tests/gateway_harness (real RequestQueue, fixed replies). The gateway
killed mid-stream, with the real scheduler and worker, is in tests/test_faults.py.
"""

from __future__ import annotations

import uuid

import grpc
import httpx
import pytest
import redis
from gateway_harness import GatewayThread, stack, wait_until  # noqa: F401 (fixture)
from tessera.procs import free_port

from common import redis_schema as schema
from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc
from gateway.service import GatewayConfig
from tessera.sse import events
from tessera.client import AsyncTesseraClient, TesseraClient


@pytest.fixture(scope="module")
def replica(stack):
    """A second gateway of the same model (and Redis), with a short resume TTL."""
    first = stack[0].config
    config = GatewayConfig(model=first.model, served_model_name=first.served_model_name,
                           redis_url=first.redis_url, http_port=free_port(),
                           grpc_port=free_port(), resume_ttl_s=2.0)
    gateway = GatewayThread(config)
    gateway.start()
    yield gateway
    gateway.stop()


def sse(response: httpx.Response) -> list[tuple[str | None, dict | str]]:
    """(id, data) of each SSE event; [DONE] as the string."""
    return list(events(response.iter_lines()))


def stream(base_url: str, method: str, path: str, **kw) -> tuple[str, list]:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        with c.stream(method, path, **kw) as r:
            assert r.status_code == 200, r.read()
            return r.headers["x-request-id"], sse(r)


def test_every_event_has_an_id_and_a_second_replica_replays_the_rest(stack, replica) -> None:
    gateway, _, _ = stack
    body = {"prompt": "resume", "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}}
    rid, events = stream(gateway.base_url, "POST", "/v1/completions", json=body)
    assert rid.startswith("cmpl-") and events[-1] == (None, "[DONE]")
    chunks = events[:-2]   # then the usage chunk (no id) and [DONE]
    assert events[-2][0] is None and events[-2][1]["usage"]["completion_tokens"] == 9
    assert [e for e, _ in chunks] == [f"{rid}:{i}" for i in range(9)], "ids are contiguous"
    assert all(d["id"] == rid for _, d in events[:-1]), "the chunk id is the request id"
    for k in (0, 4, 8):   # by header and by query, from anywhere, to after the end
        _, rest = stream(replica.base_url, "GET", f"/v1/streams/{rid}",
                         headers={"Last-Event-ID": f"{rid}:{k}"})
        assert rest == events[k + 1:]
    _, rest = stream(replica.base_url, "GET", f"/v1/streams/{rid}?last_event_id={rid}:3")
    assert rest == events[4:]
    _, everything = stream(replica.base_url, "GET", f"/v1/streams/{rid}")
    assert everything == events
    metrics = httpx.get(replica.base_url + "/metrics").text
    resumes = next(line for line in metrics.splitlines()
                   if line.startswith("tessera:stream_resumes_total{"))
    assert float(resumes.split()[-1]) >= 4, "each resume after an event seen counts"


def test_chat_resume_keeps_the_role_finish_and_usage_chunks(stack, replica) -> None:
    gateway, _, _ = stack
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "n": 2, "stop": ["fox"], "stream_options": {"include_usage": True}}
    rid, events = stream(gateway.base_url, "POST", "/v1/chat/completions", json=body)
    assert rid.startswith("chatcmpl-")
    assert [d["choices"][0]["delta"] for _, d in events[:2]] == [
        {"role": "assistant", "content": ""}] * 2
    ids = [e for e, _ in events if e is not None]
    assert ids == sorted(set(ids), key=lambda e: int(e.split(":")[1]))
    _, again = stream(replica.base_url, "GET", f"/v1/streams/{rid}")
    assert again == events
    third = events.index(next(ev for ev in events if ev[0] == ids[2]))
    _, rest = stream(replica.base_url, "GET", f"/v1/streams/{rid}",
                     headers={"Last-Event-ID": ids[2]})
    assert rest == events[third + 1:]


def test_a_finished_request_is_fetched_and_a_running_one_is_202(stack, replica) -> None:
    gateway, sched, _ = stack
    with httpx.Client(timeout=30) as c:
        r = c.post(gateway.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 7})
        rid = r.headers["x-request-id"]
        got = c.get(f"{replica.base_url}/v1/requests/{rid}")
        assert got.status_code == 200 and got.json() == r.json()
        chat = c.post(gateway.base_url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        got = c.get(f"{replica.base_url}/v1/requests/{chat.headers['x-request-id']}")
        assert got.json() == chat.json()
        sched.long_reply, sched.step_s = True, 0.05
        try:
            with c.stream("POST", gateway.base_url + "/v1/completions", json={
                    "prompt": "x", "max_tokens": 300, "stream": True}) as s:
                rid = s.headers["x-request-id"]
                # kept: a line iterator dropped at once closes the connection (a disconnect)
                lines = s.iter_lines()
                next(lines)
                running = c.get(f"{replica.base_url}/v1/requests/{rid}")
                assert running.status_code == 202 and running.json()["status"] == "running"
        finally:
            sched.long_reply, sched.step_s = False, 0.005
        assert c.get(f"{replica.base_url}/v1/requests/nope").status_code == 404


def test_bad_resume_cursors_are_400_and_unknown_requests_404(stack, replica) -> None:
    gateway, _, _ = stack
    rid, _ = stream(gateway.base_url, "POST", "/v1/completions",
                    json={"prompt": "x", "max_tokens": 2, "stream": True})
    with httpx.Client(base_url=replica.base_url, timeout=30) as c:
        for bad in ("other:1", f"{rid}:x", f"{rid}:{2**31}", f"{rid}:-2", f"{rid}:{2**63}"):
            r = c.get(f"/v1/streams/{rid}", headers={"Last-Event-ID": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID", bad
        r = c.get(f"/v1/streams/cmpl-{uuid.uuid4().hex}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"


def test_grpc_resume_on_another_replica_needs_no_prompt_or_params(stack, replica) -> None:
    gateway, _, _ = stack
    rid = f"grpc-{uuid.uuid4().hex}"
    with TesseraClient(gateway.grpc_address, timeout=30) as a:
        chunks = list(a.stream("resume me", max_tokens=8, n=2, stop=["fox"], request_id=rid))
    with TesseraClient(replica.grpc_address, timeout=30) as b:
        assert len(chunks) > 4
        for seen in (chunks[0].index, chunks[3].index, chunks[-1].index):
            rest = list(b.stream(None, request_id=rid, last_event_index=seen))
            assert rest == [ch for ch in chunks if ch.index > seen]


def test_continue_keeps_generating_for_the_resume_ttl_only(stack, replica) -> None:
    gateway, sched, _ = stack
    sched.long_reply, sched.step_s = True, 0.05
    try:
        with httpx.Client(timeout=30) as c:
            # Left without a resume: cancelled once the (2 s) resume TTL has passed.
            with c.stream("POST", replica.base_url + "/v1/completions", json={
                    "prompt": "go", "max_tokens": 1000, "stream": True,
                    "disconnect": "continue"}) as r:
                rid = r.headers["x-request-id"]
                next(r.iter_lines())
            assert rid not in sched.cancelled
            assert wait_until(lambda: rid in sched.cancelled, 30), "not cancelled after the TTL"
            # Resumed in time (on the other replica): it runs to its end.
            with c.stream("POST", replica.base_url + "/v1/completions", json={
                    "prompt": "go", "max_tokens": 60, "stream": True,
                    "disconnect": "continue"}) as r:
                rid = r.headers["x-request-id"]
                first = sse_first_id(r)
            with c.stream("GET", f"{gateway.base_url}/v1/streams/{rid}",
                          headers={"Last-Event-ID": first}) as r:
                rest = sse(r)
            assert rest[-1] == (None, "[DONE]") and rest[-2][1]["choices"][0]["finish_reason"]
            assert rid not in sched.cancelled
            with redis.Redis.from_url(stack[0].config.redis_url) as rc:
                assert rc.hget(schema.request_record(rid), "state") == b"finished"
    finally:
        sched.long_reply, sched.step_s = False, 0.005


def sse_first_id(response: httpx.Response) -> str:
    for line in response.iter_lines():
        if line.startswith("id: "):
            return line[4:]
    raise AssertionError("no event id")


class _ReplayingGateway(generate_pb2_grpc.GenerateServicer):
    """A SCRIPTED gRPC stand-in for a gateway that replays events (as a resume racing a live
    relay could): the client library must hand each index to its caller once."""

    async def GenerateStream(self, request, context):
        for index in (0, 1, 1, 2, 0, 3, 3):
            yield generate_pb2.GenerateStreamResponse(request_id="r", index=index, choices=[
                generate_pb2.ChoiceDelta(index=0, text=f"<{index}>")])


def test_the_client_library_drops_duplicate_events() -> None:
    import asyncio
    import threading

    port = free_port()
    ready, stop = threading.Event(), None

    async def serve() -> None:
        nonlocal stop
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerateServicer_to_server(_ReplayingGateway(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        ready.set()
        await stop.wait()
        await server.stop(None)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        with TesseraClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert [c.index for c in client.stream("x")] == [0, 1, 2, 3]
            assert [c.index for c in client.stream(None, request_id="r",
                                                   last_event_index=1)] == [2, 3]

        async def via_async() -> list[int]:
            async with AsyncTesseraClient(f"127.0.0.1:{port}", timeout=10) as client:
                return [c.index async for c in client.stream("x")]

        assert asyncio.run(via_async()) == [0, 1, 2, 3]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
