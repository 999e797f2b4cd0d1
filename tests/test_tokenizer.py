"""The built tokenizer is real and deterministic; common.tokenizer.Tokenizer agrees with HF."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from common.tokenizer import Tokenizer
from tessera import tokenizer_build
from tessera.make_model import ARCHS

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello, world!",
    "",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n  indented",
    "unicode: café naïve Ωμέγα 漢字 русский текст",
    "emoji: 🙂👍🏽 🇫🇷 and a zero-width joiner 👩‍💻",
    "def square(x: int) -> int:\n    return x ** 2  # 1234567890\n",
    "numbers 3.14159 and 1,000,000 and 2024-01-01",
    "specials inline: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🙂"},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": "Done.", "tool_calls": None},
    ],
]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """(ours, HF's) tokenizers per arch, loaded once."""
    cache: dict[str, tuple[Tokenizer, object]] = {}

    def get(arch: str):
        if arch not in cache:
            d = tiny_model(arch)
            cache[arch] = (Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d))
        return cache[arch]

    return get


def test_building_twice_gives_identical_tokenizer_json():
    first = tokenizer_build.tokenizer_json(512, "llama")
    tokenizer_build._build_json.cache_clear()
    second = tokenizer_build.tokenizer_json(512, "llama")
    assert first == second
    assert first != tokenizer_build.tokenizer_json(512, "gpt2")


def test_bench_vocab_is_learned_not_padded():
    # The stdlib corpus must be large enough that a 32000-token vocab is nearly all merges.
    tok = tokenizer_build.build_tokenizer(32000, "llama")
    assert tok.get_vocab_size(with_added_tokens=True) == 32000
    reserved = [t for t in tok.get_added_tokens_decoder().values() if t.content.startswith("<|reserved_")]
    assert len(reserved) < 32
    # Real merges: common Python words are single tokens.
    assert len(tok.encode("return self", add_special_tokens=False).ids) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_size_equals_config(loaded, tiny_model, arch):
    ours, hf = loaded(arch)
    vocab = json.loads((tiny_model(arch) / "config.json").read_text())["vocab_size"]
    assert ours.vocab_size == len(hf) == vocab


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_round_trips_text(loaded, arch):
    _, hf = loaded(arch)
    for text in TEXTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert hf.decode(ids) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_and_decode_match_hf(loaded, arch):
    ours, hf = loaded(arch)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens(loaded, arch):
    ours, hf = loaded(arch)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    first = ours.encode("x")[0]
    if arch == "gpt2":
        assert ours.bos_token_id == ours.eos_token_id and first != ours.bos_token_id
    else:
        assert first == ours.bos_token_id != ours.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_matches_hf(loaded, arch):
    ours, hf = loaded(arch)
    for messages in CONVERSATIONS:
        for gen_prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True)
            assert ids == hf.apply_chat_template(
                messages, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False
            )
    text = ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system\nYou are terse.<|im_end|>\n" in text
    assert text.startswith("<|begin_of_text|>") == (arch != "gpt2")
    assert "Part one. Part two." in ours.apply_chat_template(CONVERSATIONS[2])


def _copy_tokenizer(src, dst, config: dict):
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_config_variants_hf_also_accepts(tiny_model, tmp_path):
    """AddedToken dicts, a list of named templates, and a separate chat_template.jinja file."""
    src = tiny_model("llama")
    base = json.loads((src / "tokenizer_config.json").read_text())
    template = base.pop("chat_template")
    named = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    listed = _copy_tokenizer(src, tmp_path / "listed", {
        **base,
        "bos_token": {"__type": "AddedToken", "content": base["bos_token"], "special": True},
        "eos_token": {"__type": "AddedToken", "content": base["eos_token"]},
        "chat_template": [{"name": "default", "template": template}, {"name": "plain", "template": named}],
    })
    jinja_file = _copy_tokenizer(src, tmp_path / "jinja", {**base, "chat_template": named})
    (jinja_file / "chat_template.jinja").write_text(template)  # the file wins over the config entry

    messages = CONVERSATIONS[1]
    for model_dir in (listed, jinja_file):
        ours = Tokenizer.from_dir(model_dir)
        hf = transformers.AutoTokenizer.from_pretrained(model_dir)
        assert ours.bos_token == base["bos_token"] and ours.eos_token_id == hf.eos_token_id
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert ours.apply_chat_template(messages).startswith("<|begin_of_text|><|im_start|>system")
    plain = Tokenizer.from_dir(listed).apply_chat_template(messages[:2], chat_template="plain")
    assert plain == "[system] You are terse.\n[user] What is 2+2?\n"


def test_missing_config_means_no_special_tokens_and_no_template(tiny_model, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(tiny_model("llama") / "tokenizer.json", d / "tokenizer.json")
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_id is None and tok.bos_token_id is None
    assert tok.vocab_size == 512
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_raise_exception_surfaces(tiny_model):
    tok = Tokenizer.from_dir(tiny_model("llama"))
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(jinja2.exceptions.TemplateError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], chat_template=strict)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=strict) == "ok"


def test_templates_render_in_a_sandbox(tiny_model):
    tok = Tokenizer.from_dir(tiny_model("llama"))
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=evil)


def test_missing_files_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty[/\\]tokenizer\.json"):
        Tokenizer.from_dir(empty)
