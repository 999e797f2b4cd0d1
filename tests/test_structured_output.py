"""Structured output through `tessera serve` on a random-weight model, whose free text is
gibberish: only the grammar makes its output valid.

- 50 seeded temperature-1.0 requests with a JSON schema (nested objects, enums, integer
  bounds, arrays with maxItems, required fields), through the official `openai` SDK's
  response_format, vLLM's structured_outputs and the older guided_json: all parse and
  validate (`jsonschema`); regex and choice outputs always match (choice with ignore_eos
  too: the grammar's end is the request's end); json_object parses; a budget that runs out
  first is finish_reason "length".
- Bad specs are a 400 naming the field (both endpoints) and gRPC INVALID_ARGUMENT.
- Seeded structured requests that are preempted (a tiny KV cache), whose worker is SIGKILLed,
  or whose active scheduler is SIGKILLed mid-output finish with valid output equal to the
  fault-free run: the workers rebuild each matcher from the sequence's tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import jsonschema
import openai
import pytest
import redis

from cli_procs import listed, start_serve
from common import redis_schema as schema
from common.tokenizer import Tokenizer
from fault_harness import metric
from scheduler.fence import holder_pid
from tessera.client import TesseraClient, TesseraError
from tessera.procs import free_port
from test_supervision import child_list, children, wait_for

NAME = "structured"
# 32 blocks of 16 tokens: eight LONG requests at once (5-6 blocks each) must preempt.
KV_GB = "0.00025"

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog", "bird"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "pos": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "ok": {"type": "boolean"}},
        "required": ["x", "ok"]}},
    "required": ["name", "age", "kind", "pos"]}
# Long enough to be mid-output when a fault strikes, bounded so it always ends.
LONG = {"type": "object", "properties": {
    "text": {"type": "string", "minLength": 120, "maxLength": 128},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["text", "n"]}
LONG_SEEDS = list(range(100, 108))


@dataclass
class Serve:
    base: str
    grpc: str
    redis_url: str
    scheduler_ports: list[int]
    pid: int
    model: str


@pytest.fixture(scope="module")
def serve(tiny_model):
    http, grpc_port = free_port(), free_port()
    proc, lines = start_serve(["--model", str(tiny_model("llama")), "--served-model-name",
                               NAME, "--http-port", str(http), "--grpc-port", str(grpc_port),
                               "--kv-cache-memory-gb", KV_GB])
    try:
        metrics = listed(lines, "Metrics").split(", ")
        ports = [int(re.search(r":(\d+)/metrics", m).group(1)) for m in metrics
                 if "(scheduler" in m]
        yield Serve(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}",
                    listed(lines, "Redis"), ports, proc.pid, str(tiny_model("llama")))
    finally:
        proc.stop()


def _completion(base: str, body: dict) -> dict:
    with httpx.Client(timeout=300) as c:
        r = c.post(base + "/v1/completions", json={"model": NAME, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]


def _long_body(seed: int) -> dict:
    return {"prompt": f"Record {seed}:", "max_tokens": 400, "temperature": 1.0, "seed": seed,
            "structured_outputs": {"json": LONG}}


def _valid(text: str, against: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, against)
    return value


def test_50_seeded_json_schema_requests_all_validate(serve: Serve) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA,
                                                  "strict": True}}

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        common = dict(model=NAME, max_tokens=200, temperature=1.0, seed=i)
        if i % 3 == 0:   # OpenAI's own field, through the SDK
            r = await client.chat.completions.create(
                messages=[{"role": "user", "content": f"Pet {i}?"}], response_format=fmt,
                **common)
            return r.choices[0].message.content, r.choices[0].finish_reason
        extra = {"structured_outputs": {"json": SCHEMA}} if i % 3 == 1 else {"guided_json": SCHEMA}
        r = await client.completions.create(prompt=f"Pet {i}:", extra_body=extra, **common)
        return r.choices[0].text, r.choices[0].finish_reason

    async def run() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=serve.base + "/v1", api_key="none",
                                      timeout=600, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(run())
    for text, finish in results:
        assert finish == "stop", (finish, text)
        _valid(text, SCHEMA)
    assert len({t for t, _ in results}) > 10, "temperature 1.0 with 50 seeds: varied output"


def test_regex_choice_and_json_object_always_match(serve: Serve) -> None:
    pattern = r"[a-z]{3,8}-[0-9]{2}"
    choices = ["yes", "no", "maybe so"]
    bodies = ([{"prompt": f"Code {i}:", "structured_outputs": {"regex": pattern}}
               for i in range(8)]
              + [{"prompt": f"Answer {i}:", "guided_choice": choices, "ignore_eos": True}
                 for i in range(8)])
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda ib: _completion(serve.base, {
            "max_tokens": 150, "temperature": 1.0, "seed": ib[0], **ib[1]}),
            enumerate(bodies)))
    for c in out[:8]:
        assert re.fullmatch(pattern, c["text"]) and c["finish_reason"] == "stop", c
    # ignore_eos cannot run past the grammar's end: EOS is all it allows there.
    for c in out[8:16]:
        assert c["text"] in choices and c["finish_reason"] == "stop", c
    # gRPC and the chat endpoint take the same specs.
    with TesseraClient(serve.grpc, timeout=300) as client:
        r = client.generate("Pick:", max_tokens=20, temperature=1.0, seed=3,
                            structured_outputs={"choice": choices})
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
    with httpx.Client(timeout=300) as c:
        r = c.post(serve.base + "/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "code?"}], "seed": 1,
            "temperature": 1.0, "max_tokens": 50, "guided_regex": pattern})
        assert re.fullmatch(pattern, r.json()["choices"][0]["message"]["content"]), r.text


def test_json_object_parses_and_the_mask_comes_before_logit_bias(serve: Serve) -> None:
    """Any JSON object: free keys and numbers, which a random model can extend past any
    budget, so a logit_bias towards '"' and '}' makes it close. The bias applies after the
    grammar's mask: '}' first, or a bare '"', would be invalid and never appears."""
    tok = Tokenizer.from_dir(serve.model)
    bias = {str(tok.token_to_id('"')): 6, str(tok.token_to_id("}")): 6}
    for seed in range(6):
        c = _completion(serve.base, {"prompt": "Data:", "max_tokens": 100, "seed": seed,
                                     "temperature": 1.0, "logit_bias": bias,
                                     "response_format": {"type": "json_object"}})
        assert c["finish_reason"] == "stop" and isinstance(json.loads(c["text"]), dict), c


def test_a_budget_that_runs_out_first_is_length(serve: Serve) -> None:
    c = _completion(serve.base, {**_long_body(1), "max_tokens": 8})
    assert c["finish_reason"] == "length" and c["text"].startswith('{"')


@pytest.mark.parametrize("field,value,param", [
    ("response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}, "response_format.json_schema.schema"),
    ("response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "response_format.json_schema.schema"),
    ("guided_regex", "a((", "guided_regex"),
    ("guided_choice", [], "guided_choice"),
    ("structured_outputs", {"grammar": 'root ::= "a" missing'}, "structured_outputs.grammar"),
    ("guided_grammar", 'root ::= "a" root', "guided_grammar"),   # can never end
    ("structured_outputs", {"json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
     "structured_outputs.json"),
    ("structured_outputs", {"regex": "x", "choice": ["y"]}, "structured_outputs"),
])
def test_bad_specs_are_a_400_naming_the_field(serve: Serve, field, value, param) -> None:
    with httpx.Client(timeout=120) as c:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}]})):
            r = c.post(serve.base + path, json={"model": NAME, "max_tokens": 4, field: value,
                                                **body})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param, r.text


def test_bad_specs_are_invalid_argument_over_grpc(serve: Serve) -> None:
    with TesseraClient(serve.grpc, timeout=120) as client:
        for spec, field in (({"regex": "(("}, "structured_outputs.regex"),
                            ({"json": {"not": {}}}, "structured_outputs.json"),
                            ({"grammar": "x ::= \"a\""}, "structured_outputs.grammar")):
            with pytest.raises(TesseraError) as e:
                client.generate("hi", max_tokens=4, structured_outputs=spec)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(e.value)


@pytest.fixture(scope="module")
def reference(serve: Serve) -> dict[int, str]:
    """The fault-free run of the LONG requests, two at a time (no preemption in 32 blocks)."""
    with ThreadPoolExecutor(2) as pool:
        out = dict(zip(LONG_SEEDS, pool.map(lambda s: _completion(serve.base, _long_body(s)),
                                            LONG_SEEDS)))
    for c in out.values():
        assert c["finish_reason"] == "stop"
        _valid(c["text"], LONG)
    return {s: c["text"] for s, c in out.items()}


def _scheduler_metric(serve: Serve, name: str, **labels: str) -> float:
    """Summed over the schedulers that answer (a killed one does not, until restarted)."""
    total = 0.0
    for port in serve.scheduler_ports:
        try:
            total += metric(port, name, **labels)
        except httpx.HTTPError:
            pass
    return total


def _preemptions(serve: Serve) -> float:
    return _scheduler_metric(serve, "tessera:num_preemptions_total")


def test_preempted_mid_output_equals_the_fault_free_run(serve: Serve, reference) -> None:
    before = _preemptions(serve)
    with ThreadPoolExecutor(len(LONG_SEEDS)) as pool:
        out = dict(zip(LONG_SEEDS, pool.map(lambda s: _completion(serve.base, _long_body(s)),
                                            LONG_SEEDS)))
    assert _preemptions(serve) > before, "eight requests in 32 blocks must preempt"
    assert {s: c["text"] for s, c in out.items()} == reference


class _Stream:
    """One streamed LONG request; `started` is set after its third event."""

    def __init__(self, base: str, seed: int) -> None:
        self.base, self.seed = base, seed
        self.text, self.finish, self.events = "", None, 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=300) as c, c.stream(
                    "POST", self.base + "/v1/completions",
                    json={"model": NAME, "stream": True, **_long_body(self.seed)}) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    self.text += choice["text"]
                    self.finish = choice.get("finish_reason") or self.finish
                    self.events += 1
                    if self.events == 3:
                        self.started.set()
        finally:
            self.started.set()

    def result(self) -> tuple[str, str | None]:
        self.thread.join(300)
        assert not self.thread.is_alive()
        return self.text, self.finish


def _recovered(serve: Serve, reason: str) -> float:
    return _scheduler_metric(serve, "tessera:requests_recovered_total", reason=reason)


def _faulted(serve: Serve, reference: dict[int, str], kill) -> None:
    streams = [_Stream(serve.base, s) for s in LONG_SEEDS[:3]]
    assert all(s.started.wait(120) for s in streams)
    kill()
    for s in streams:
        text, finish = s.result()
        assert finish == "stop" and text == reference[s.seed]
        _valid(text, LONG)


def test_worker_killed_mid_output_equals_the_fault_free_run(serve: Serve, reference) -> None:
    before = _recovered(serve, "worker")
    worker = children(serve.pid)["worker"]
    _faulted(serve, reference, lambda: os.kill(worker, signal.SIGKILL))
    assert _recovered(serve, "worker") > before, "the requests were in flight"
    wait_for(lambda: children(serve.pid).get("worker") not in (None, worker), 60,
             "the worker restarted")


def test_scheduler_killed_mid_output_equals_the_fault_free_run(serve: Serve,
                                                               reference) -> None:
    with redis.Redis.from_url(serve.redis_url) as r:
        holder = wait_for(lambda: r.get(schema.group_lease(NAME, "0")), 60, "a lease holder")
    active = holder_pid(holder)
    assert active in [pid for role, pid in child_list(serve.pid) if role == "scheduler"]
    before = _recovered(serve, "scheduler")
    _faulted(serve, reference, lambda: os.kill(active, signal.SIGKILL))
    assert _recovered(serve, "scheduler") > before, "a successor took the requests over"

