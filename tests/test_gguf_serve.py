"""`tessera serve --model x.gguf` with the official openai client: SmolLM2's chat answers equal
HF's greedy answer on the same GGUF, streaming and not; a GGUF without a chat template still
serves completions and answers chat with a 400 that names the file and the field."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from cli_procs import start_serve
from gguf_writer import write_gguf
from tessera.procs import free_port

QUESTION = "What is the capital of France?"
MAX_TOKENS = 32


def _serve(model: str):
    http = free_port()
    proc, _ = start_serve(["--model", model, "--http-port", str(http), "--grpc-port",
                           str(free_port()), "--kv-cache-memory-gb", "0.2",
                           "--max-num-batched-tokens", "256"], timeout=300)
    return proc, f"http://127.0.0.1:{http}/v1"


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def smollm2_served(smollm2_gguf):
    proc, base = _serve(str(smollm2_gguf))
    yield os.path.basename(smollm2_gguf), base
    _stop(proc)


def _hf_answer(smollm2_hf, messages) -> tuple[str, int]:
    model, tok = smollm2_hf
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_TOKENS, pad_token_id=2)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_chat_through_openai_client_matches_hf(smollm2_served, smollm2_hf):
    from openai import OpenAI

    name, base = smollm2_served
    client = OpenAI(base_url=base, api_key="none")
    messages = [{"role": "user", "content": QUESTION}]
    expected, n = _hf_answer(smollm2_hf, messages)
    assert expected == "The capital of France is Paris."
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0)
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason == "stop"       # the real EOS (<|im_end|>)
    assert chat.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(model=name, messages=messages, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_completions_through_openai_client_match_hf(smollm2_served, smollm2_hf):
    from openai import OpenAI

    name, base = smollm2_served
    model, tok = smollm2_hf
    prompt = "The three primary colors are"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=None, pad_token_id=2)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    client = OpenAI(base_url=base, api_key="none")
    got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == expected
    stream = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


def test_gguf_without_chat_template_serves_completions_and_explains_chat(tiny_model, tmp_path):
    from openai import BadRequestError, OpenAI

    path = write_gguf(tiny_model("llama"), tmp_path / "notemplate.gguf")
    proc, base = _serve(str(path))
    try:
        client = OpenAI(base_url=base, api_key="none")
        out = client.completions.create(model=path.name, prompt="hello", max_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model=path.name, max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])
        message = str(err.value)
        assert "notemplate.gguf" in message and "tokenizer.chat_template" in message
    finally:
        _stop(proc)


def test_bench_serve_chat_stops_at_the_real_eos(smollm2_served, tmp_path):
    import json
    import subprocess
    import sys

    name, base = smollm2_served
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tessera.cli", "bench", "serve", "--chat",
                           "--base-url", base[:-len("/v1")], "--model", name, "--num-prompts", "4",
                           "--random-output-len", "32", "--json", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["summary"]["completed"] == 4
    lengths = [r["output_tokens"] for r in result["requests"]]
    assert all(0 < n <= 32 for n in lengths) and min(lengths) < 32, lengths
