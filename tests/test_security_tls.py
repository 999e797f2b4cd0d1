"""TLS on both public faces of a real gateway (the official openai client over HTTPS, our gRPC
client over TLS), with a key, and Redis reached as ``rediss://`` with an ACL user and
password: a redis-server started with TLS only. The scheduler side is the SCRIPTED STAND-IN
of tests/gateway_harness.py, connected through the same ``rediss://`` URL."""

from __future__ import annotations

import pathlib
import shutil
import ssl
import subprocess
import time
import uuid

import httpx
import openai
import pytest
import redis
from gateway_harness import GatewayThread, ScriptedScheduler, wait_until
from tessera.procs import free_port

from common import redis_schema as schema
from common.tokenizer import Tokenizer
from gateway.service import GatewayConfig
from tessera.client import TesseraClient, TesseraError

KEY = "sk-tls-test-key"


def _ca(cert: pathlib.Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def _self_signed(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, tiny_model):
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs openssl and redis-server")
    d = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(d)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(d),
         "--user", "default", "off", "--user", "tessera", "on", ">s3cret", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://tessera:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        def up() -> bool:
            try:
                return redis.Redis.from_url(url, socket_timeout=1).ping()
            except (redis.RedisError, OSError):
                return False
        assert wait_until(up, 15), "the TLS redis-server did not answer"
        model_dir = tiny_model("llama")
        name = f"tls-{uuid.uuid4().hex[:6]}"
        config = GatewayConfig(model=str(model_dir), served_model_name=name, redis_url=url,
                               http_port=free_port(), grpc_port=free_port(), api_key=KEY,
                               ssl_certfile=str(cert), ssl_keyfile=str(key))
        gateway = GatewayThread(config)
        gateway.base_url = f"https://127.0.0.1:{config.http_port}"
        super(GatewayThread, gateway).start()   # the harness's own wait speaks plain HTTP

        def serving() -> bool:
            if gateway.error is not None:
                raise gateway.error
            try:
                return httpx.get(f"{gateway.base_url}/health", verify=_ca(cert),
                                 timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(serving, 30), "the TLS gateway did not start"
        sched = ScriptedScheduler(redis_url=url, model=name,
                                  tokenizer=Tokenizer.from_dir(model_dir))
        sched.start()
        yield gateway, cert, url
        sched.stop()
        gateway.stop()
    finally:
        server.terminate()
        server.wait(10)


def test_https_with_the_official_client_and_a_key(tls_stack) -> None:
    gateway, cert, _ = tls_stack
    with httpx.Client(verify=_ca(cert)) as http:
        sdk = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, http_client=http)
        out = sdk.completions.create(model=gateway.config.served_model_name, prompt="hi",
                                     max_tokens=3)
        assert out.usage.completion_tokens == 3
        text = "".join(c.choices[0].text for c in sdk.completions.create(
            model=gateway.config.served_model_name, prompt="hi", max_tokens=4, stream=True))
        assert text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="nope",
                          http_client=http).models.list()
    # Plain HTTP on the TLS port gets no answer of ours, and an unknown CA fails the handshake.
    with pytest.raises(httpx.HTTPError):
        httpx.get(gateway.base_url.replace("https", "http", 1) + "/health", timeout=3)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{gateway.base_url}/health", timeout=3)   # system CAs: not ours


def test_grpc_over_tls_with_a_key(tls_stack) -> None:
    gateway, cert, _ = tls_stack
    roots = pathlib.Path(cert).read_bytes()
    with TesseraClient(gateway.grpc_address, timeout=20, api_key=KEY,
                       root_certificates=roots) as client:
        assert client.generate("hi", max_tokens=2).completion_tokens == 2
        chunks = list(client.stream("hi", max_tokens=3))
        assert chunks[-1].usage[1] == 3
    with TesseraClient(gateway.grpc_address, timeout=5, root_certificates=roots) as keyless:
        with pytest.raises(TesseraError) as e:
            keyless.list_models()
        assert "UNAUTHENTICATED" in str(e.value.code)
    with TesseraClient(gateway.grpc_address, timeout=3, api_key=KEY) as plaintext:
        with pytest.raises(TesseraError):
            plaintext.list_models()


def test_redis_acl_user_over_tls_holds_the_requests(tls_stack) -> None:
    gateway, cert, url = tls_stack
    r = redis.Redis.from_url(url)
    assert r.acl_whoami() == "tessera"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace("s3cret", "wrong")).ping()
    started = time.time()
    resp = httpx.post(f"{gateway.base_url}/v1/completions", verify=_ca(cert), timeout=20,
                      json={"prompt": "hi", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200
    rid = resp.headers["x-request-id"]
    record = schema.request_record(rid)
    assert r.exists(record) and float(r.hget(record, "queued_at")) >= started - 1
