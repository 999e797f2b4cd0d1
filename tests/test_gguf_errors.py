"""Bad GGUF files fail at load time with one clear message naming the file and the field:
truncated, corrupt, an architecture, quantization or tokenizer we cannot serve, no chat
template. Through the CLI too: one line on stderr, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.gguf_file import GGUFError
from common.model_config import ModelConfig, ModelConfigError
from common.tokenizer import Tokenizer
from gguf_writer import write_gguf
from worker.loader import load_model


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory):
    return write_gguf(tiny_model("llama"), tmp_path_factory.mktemp("good") / "llama.gguf")


def test_truncated_file_is_named(good, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelConfigError, match=r"cut\.gguf.*truncated"):
        ModelConfig.from_dir(cut)


def test_corrupt_header_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelConfigError, match=r"bad\.gguf is not a readable GGUF file"):
        ModelConfig.from_dir(bad)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelConfigError, match=r"empty\.gguf"):
        ModelConfig.from_dir(tmp_path / "empty.gguf")


def test_unsupported_architecture_names_the_field(tmp_path):
    import gguf

    path = tmp_path / "bloom.gguf"
    w = gguf.GGUFWriter(str(path), "bloom")
    w.add_uint32("bloom.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelConfigError, match=r"bloom\.gguf: general\.architecture 'bloom'"):
        ModelConfig.from_dir(path)


def test_unsupported_quantization_fails_before_loading(tiny_model, tmp_path):
    path = write_gguf(tiny_model("llama"), tmp_path / "q81.gguf", "Q8_1")
    cfg = ModelConfig.from_dir(path)        # the metadata is fine
    with pytest.raises(GGUFError, match=r"q81\.gguf: unsupported quantization type.*Q8_1"):
        load_model(cfg)


def test_unknown_tokenizer_model_names_the_field(tiny_model, tmp_path):
    path = write_gguf(tiny_model("llama"), tmp_path / "bert.gguf", tokenizer_model="bert")
    with pytest.raises(GGUFError, match=r"bert\.gguf: tokenizer\.ggml\.model 'bert' cannot be built"):
        Tokenizer.from_dir(path)


def test_missing_chat_template_names_file_and_field(good):
    tok = Tokenizer.from_dir(good)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"llama\.gguf \(metadata field tokenizer\.chat_template\)"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_cli_prints_one_line_not_a_traceback(good, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "tessera.cli", "generate", "--model", str(cut),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "cut.gguf" in proc.stderr, proc.stderr
