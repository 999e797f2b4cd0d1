"""A `tokenizers` tokenizer built from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, scores, token types
and special ids as metadata. We rebuild the pipeline transformers builds from the same
fields (its `integrations/gguf/gguf_tokenizer_mapping.py`, with `GPT2Tokenizer` for
`tokenizer.ggml.model == "gpt2"` and `LlamaTokenizer` for `"llama"`), because HF is our
oracle: the tests compare ids on the real SmolLM2 file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from common.gguf_file import GGUFError, GGUFFile

# llama.cpp token types (gguf-py `TokenType`)
CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# `tokenizer.ggml.pre` -> the split regex its merges were learned with; other values keep
# GPT-2's own ByteLevel split (what transformers does too).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
SUPPORTED_MODELS = ("gpt2", "llama")


@dataclass(frozen=True)
class GGUFTokenizer:
    """The backend tokenizer and what tokenizer_config.json would hold."""

    backend_json: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False

    def backend(self) -> Tokenizer:
        return Tokenizer.from_str(self.backend_json)

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json for `tessera convert` (HF reads it beside tokenizer.json)."""
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                               "add_bos_token": self.add_bos_token,
                               "add_eos_token": self.add_eos_token,
                               "clean_up_tokenization_spaces": False, **self.special_tokens}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg


@functools.lru_cache(maxsize=4)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_gguf_tokenizer(f: GGUFFile) -> GGUFTokenizer:
    """Build the tokenizer; a clear `GGUFError` naming the field if the file's kind is unknown."""
    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{f.path} has no tokenizer (metadata field tokenizer.ggml.model)")
    if kind not in SUPPORTED_MODELS:
        raise GGUFError(f"{f.path}: tokenizer.ggml.model {kind!r} cannot be built; "
                        f"supported are {list(SUPPORTED_MODELS)}")
    tokens: list[str] = list(f.require("tokenizer.ggml.tokens"))
    types: list[int] = list(f.get("tokenizer.ggml.token_type") or [])
    merges = f.get("tokenizer.ggml.merges")
    if merges is None:
        # HF derives merges from scores then; files written by llama.cpp's converters have them.
        raise GGUFError(f"{f.path}: tokenizer.ggml.merges is missing (a BPE tokenizer needs it)")
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    special = {name: tokens[int(i)] for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        if (i := f.get(f"tokenizer.ggml.{key}")) is not None and 0 <= int(i) < len(tokens)}
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))

    if kind == "gpt2":
        tok, spelled = _byte_level(tokens, merge_pairs, f.get("tokenizer.ggml.pre"))
    else:
        tok, spelled = _sentencepiece(tokens, merge_pairs), None
    vocab = tok.get_vocab()
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types)
               if ty == CONTROL and (spelled is None or set(t) <= spelled)]
    # transformers also registers the named ones (bos, eos, unk, pad) as special tokens,
    # whatever type the file gives them (SentencePiece's <unk> is UNKNOWN, not CONTROL).
    named = [AddedToken(t, normalized=False, special=True) for t in special.values()
             if t in vocab and t not in {c.content for c in control}]
    if control or named:
        tok.add_special_tokens(control + list({t.content: t for t in named}.values()))
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    tok.post_processor = _post_processor(special, add_bos, add_eos, tok)
    template = f.get("tokenizer.chat_template")
    return GGUFTokenizer(tok.to_str(), special, template, add_bos, add_eos)


def _byte_level(tokens: list[str], merges: list[tuple], pre: str | None
                ) -> tuple[Tokenizer, set[str]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(tokens: list[str], merges: list[tuple]) -> Tokenizer:
    """transformers' LlamaTokenizer: byte-fallback BPE behind a Metaspace pre-tokenizer."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return tok


def _post_processor(special: dict[str, str], add_bos: bool, add_eos: bool, tok: Tokenizer):
    """HF's `update_post_processor`: bos / eos around each sequence as the flags say."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    ids = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=list(dict.fromkeys(ids)))
