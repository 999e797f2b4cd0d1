"""Build a real byte-level BPE tokenizer for random-weight demo and test checkpoints.

There is no model hub here, yet tests and demos need a tokenizer that behaves like a real
one (merges, special tokens, a chat template, a bos post-processor). We train one locally
from text every Python installation ships: the standard library's own ``.py`` sources.
Training is deterministic: files are taken in sorted order, the trainer has no random
state, and the result is cached per (vocab size, family) because tests build many models.
"""

from __future__ import annotations

import functools
import pathlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

Family = Literal["llama", "qwen2", "gpt2"]

# Qwen2's pre-tokenizer split (digits one at a time, letters with one leading non-letter).
# NOTE: transformers 5 ignores the pipeline in tokenizer.json for model_type "qwen2" and
# rebuilds Qwen2Tokenizer's hardcoded one (NFC + this split + ByteLevel without its regex),
# so our qwen2 checkpoints must use exactly that pipeline to tokenize as HF does.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML: one template for both families; the Llama family's starts with the bos token,
# as Llama 3's own template does (its tokenizer does not add bos inside apply_chat_template
# because HF encodes rendered chats with add_special_tokens=False).
_CHATML_BODY = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_CHAT_TEMPLATE = "{{ bos_token }}" + _CHATML_BODY
GPT2_CHAT_TEMPLATE = _CHATML_BODY


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of one tokenizer family (bos may equal eos, as in GPT-2)."""

    bos: str
    eos: str
    chat: tuple[str, ...]
    add_bos: bool
    chat_template: str

    @property
    def all(self) -> tuple[str, ...]:
        """Distinct special tokens in id order (dict.fromkeys keeps first occurrences)."""
        return tuple(dict.fromkeys((self.bos, self.eos, *self.chat)))


_LLAMA_SPECIALS = SpecialTokens(
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    chat=("<|im_start|>", "<|im_end|>"),
    add_bos=True,
    chat_template=LLAMA_CHAT_TEMPLATE,
)
FAMILIES: dict[str, SpecialTokens] = {
    "llama": _LLAMA_SPECIALS,
    "qwen2": _LLAMA_SPECIALS,
    "gpt2": SpecialTokens(
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        chat=("<|im_start|>", "<|im_end|>"),
        add_bos=False,
        chat_template=GPT2_CHAT_TEMPLATE,
    ),
}

# Characters of training text per vocabulary entry: enough text that BPE can find that many
# merges, small enough that the 512-token vocab trains in a fraction of a second and the
# 32000-token one in a few seconds.
_CHARS_PER_TOKEN = 160
_MIN_CHARS = 200_000


def _sorted_sources(directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """``.py`` files under ``directory`` in sorted-name order, lazily (we stop early)."""
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and entry.name not in ("site-packages", "dist-packages", "__pycache__"):
            yield from _sorted_sources(entry)
        elif entry.suffix == ".py" and entry.is_file():
            yield entry


def training_corpus(num_chars: int) -> list[str]:
    """Standard-library sources in sorted path order until ``num_chars`` characters.

    site-packages lives under the stdlib directory; it is skipped so installed packages
    cannot change the corpus.
    """
    texts: list[str] = []
    total = 0
    for path in _sorted_sources(pathlib.Path(sysconfig.get_paths()["stdlib"])):
        text = path.read_bytes().decode("utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= num_chars:
            break
    return texts


@functools.lru_cache(maxsize=16)
def _build_json(vocab_size: int, family: str) -> str:
    specials = FAMILIES[family]
    num_special = len(specials.all)
    base_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(base_alphabet) + num_special:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (minimum {len(base_alphabet) + num_special})")

    tok = Tokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_special,
        initial_alphabet=base_alphabet,
        show_progress=False,
    )
    corpus = training_corpus(max(_MIN_CHARS, vocab_size * _CHARS_PER_TOKEN))
    tok.train_from_iterator(corpus, trainer=trainer)

    # Special tokens go after the learned vocabulary (as in GPT-2 and Llama 3); reserved
    # fillers make the total exactly vocab_size, so the embedding matrix and the tokenizer agree.
    tok.add_special_tokens(list(specials.all))
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - tok.get_vocab_size(with_added_tokens=True))]
    if reserved:
        tok.add_special_tokens(reserved)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size

    if specials.add_bos:
        bos_id = tok.token_to_id(specials.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials.bos}:0 $A:0",
            pair=f"{specials.bos}:0 $A:0 {specials.bos}:1 $B:1",
            special_tokens=[(specials.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str(pretty=True)


def build_tokenizer(vocab_size: int, family: Family) -> Tokenizer:
    """A trained byte-level BPE with exactly ``vocab_size`` tokens (a fresh object each call)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(FAMILIES)}")
    return Tokenizer.from_str(_build_json(vocab_size, family))


def tokenizer_json(vocab_size: int, family: Family) -> str:
    """The serialized ``tokenizer.json`` text (byte-identical across builds in one environment)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(FAMILIES)}")
    return _build_json(vocab_size, family)
