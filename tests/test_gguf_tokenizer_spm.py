"""A SentencePiece-style GGUF tokenizer (`tokenizer.ggml.model == "llama"`: byte-fallback BPE
over ▁-marked pieces, <0xNN> byte tokens, BOS added) against transformers building it from the
same metadata."""

from __future__ import annotations

import json

import pytest

from common.tokenizer import Tokenizer
from gguf_writer import write_metadata_only
from tessera.tokenizer_build import training_corpus
from tokenizer_strings import tokenizer_strings

SPECIALS = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(training_corpus(200_000), vocab_size=800, special_tokens=SPECIALS,
                                show_progress=False)
    model = json.loads(trainer.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])
               if t not in SPECIALS]
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)   # UNKNOWN, CONTROL, BYTE, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return write_metadata_only(path, "llama", {
        "llama.block_count": 1, "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.feed_forward_length": 128, "llama.context_length": 256,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [float(-i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] "
                                   "{{ m['content'] }}{{ eos_token }}{% endfor %}"})


def test_spm_ids_and_text_match_hf(spm_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    ours = Tokenizer.from_dir(spm_gguf)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == ("<s>", "</s>")
    for s in tokenizer_strings(300, specials=SPECIALS):
        ids = ours.encode(s)
        assert ids == hf(s)["input_ids"], repr(s)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), repr(s)
    chat = [{"role": "user", "content": "hi there"}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False,
                                                                    add_generation_prompt=True)
