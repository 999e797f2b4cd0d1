"""Mutual TLS inside a real `tessera serve` stack (redis-server, worker, scheduler, gateway as
processes), with HTTPS and gRPC TLS on the public faces: every certificate is made here (one
CA for the internal services, another that nobody trusts). The stack serves a generation
equal to the offline engine's greedy one; the worker's gRPC port answers only a client that
presents a certificate signed by the internal CA."""

from __future__ import annotations

import json
import os
import ssl

import grpc
import httpx
import openai
import pytest
import redis
from cli_procs import listed, start_serve
from tls_certs import make_ca, make_leaf, need_openssl

from common import redis_schema as schema
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from tessera import LLM, SamplingParams
from tessera.client import TesseraClient
from tessera.procs import free_port

PROMPT = "The quick brown fox"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    need_openssl()
    d = tmp_path_factory.mktemp("mtls")
    internal_ca = make_ca(d, "internal")
    public_ca = make_ca(d, "public")
    rogue_ca = make_ca(d, "rogue")
    return {"internal_ca": internal_ca[0], "internal": make_leaf(d, "internal", internal_ca),
            "public_ca": public_ca[0], "public": make_leaf(d, "gateway", public_ca),
            "rogue": make_leaf(d, "rogue", rogue_ca)}


@pytest.fixture(scope="module")
def stack(tiny_model, certs):
    model_dir = str(tiny_model("llama"))
    http, grpc_port = free_port(), free_port()
    (cert, key), (icert, ikey) = certs["public"], certs["internal"]
    proc, lines = start_serve([
        "--model", model_dir, "--http-port", str(http), "--grpc-port", str(grpc_port),
        "--kv-cache-memory-gb", "0.02", "--max-num-batched-tokens", "128",
        "--scheduler-replicas", "1", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
        "--internal-tls-certfile", str(icert), "--internal-tls-keyfile", str(ikey),
        "--internal-tls-ca", str(certs["internal_ca"])], timeout=240)
    try:
        yield proc, lines, model_dir, http, grpc_port
    finally:
        proc.stop(30)


def _worker_address(lines: list[str], model_dir: str) -> str:
    r = redis.Redis.from_url(listed(lines, "Redis"))
    entries = r.hgetall(schema.workers_registry(os.path.basename(model_dir)))
    assert len(entries) == 1, entries
    return json.loads(next(iter(entries.values())))["address"]


def test_a_stack_with_internal_mtls_and_public_tls_serves_a_generation(stack, certs) -> None:
    _, lines, model_dir, http, grpc_port = stack
    # The launcher's readiness wait (the gateway's ready line) held with TLS on both faces.
    assert listed(lines, "OpenAI") == f"HTTP  https://127.0.0.1:{http}/v1"
    assert "mutual TLS" in listed(lines, "Internal")
    expected = LLM(model_dir, num_kv_blocks=32).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    verify = ssl.create_default_context(cafile=str(certs["public_ca"]))
    with httpx.Client(verify=verify, timeout=120) as h:
        sdk = openai.OpenAI(base_url=f"https://127.0.0.1:{http}/v1", api_key="none",
                            http_client=h)
        out = sdk.completions.create(model=os.path.basename(model_dir), prompt=PROMPT,
                                     max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == MAX_TOKENS
    with TesseraClient(f"127.0.0.1:{grpc_port}", timeout=120,
                       root_certificates=certs["public_ca"].read_bytes()) as client:
        result = client.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert list(result.choices[0].token_ids) == list(expected)
    assert result.choices[0].text == out.choices[0].text


def _info(address: str, credentials: grpc.ChannelCredentials | None) -> worker_pb2.InfoResponse:
    channel = (grpc.insecure_channel(address) if credentials is None
               else grpc.secure_channel(address, credentials))
    with channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)


def test_the_worker_port_refuses_a_peer_without_a_certificate_of_the_internal_ca(
        stack, certs) -> None:
    _, lines, model_dir, _, _ = stack
    address = _worker_address(lines, model_dir)
    ca = certs["internal_ca"].read_bytes()

    def creds(leaf) -> grpc.ChannelCredentials:
        cert, key = leaf
        return grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())

    # The scheduler's own kind of credentials get an answer: the port serves, over mTLS.
    assert _info(address, creds(certs["internal"])).vocab_size > 0
    refused = [None,                                   # plaintext
               grpc.ssl_channel_credentials(ca),       # TLS, but no client certificate
               creds(certs["rogue"])]                  # a certificate of another CA
    for credentials in refused:
        with pytest.raises(grpc.RpcError) as e:
            _info(address, credentials)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN), e.value
