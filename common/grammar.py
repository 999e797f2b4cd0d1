"""Compiling structured-output specs with xgrammar, for one tokenizer: an LRU cache.

The gateway compiles every spec before enqueue, so a bad one is a 400 naming the field; the
workers compile the same spec (usually a cache hit) to build their matchers. xgrammar is
imported on first use only: it imports transformers, which a service without structured
requests never needs. Where it is missing (e.g. a machine with no package registry),
structured requests fail with `StructuredOutputUnavailable` and everything else works.

NOTE on what xgrammar accepts but does not enforce: it silently ignores a few JSON Schema
keywords (`not`, `uniqueItems`, `dependentRequired`, ...; see _UNENFORCED), so an output
could break the schema the user gave. Those are refused here, by name, instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from common.ebnf_check import root_can_end
from common.structured_outputs import StructuredOutputs
from common.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_SIZE = 256            # compiled grammars per tokenizer (each holds per-token tables)
MAX_SCHEMA_DEPTH = 64       # nesting of a JSON schema: deeper ones recurse in C++ code

# Keywords xgrammar 0.2 accepts but does not enforce (checked against its matcher): refused.
_UNENFORCED = frozenset({"not", "dependentRequired", "dependentSchemas", "dependencies",
                         "minContains", "maxContains", "$dynamicRef", "$recursiveRef",
                         "unevaluatedItems"})
# Keywords whose value is a schema, a list of schemas or a map of name -> schema.
_SUB_ONE = ("items", "additionalProperties", "contains", "propertyNames", "if", "then",
            "else", "additionalItems")
_SUB_LIST = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions")


class StructuredOutputUnavailable(RuntimeError):
    """xgrammar cannot be imported here: structured output is off on this machine."""


class GrammarError(ValueError):
    """A spec that does not compile; the message starts with the field it names."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except Exception as e:   # ImportError, or a broken binding / transformers underneath
        raise StructuredOutputUnavailable(
            f"structured output is not available on this server (xgrammar: {e})") from None
    return xgrammar


def check_schema_keywords(schema: Any) -> None:
    """Refuse keywords xgrammar would silently ignore, and schemas nested past
    MAX_SCHEMA_DEPTH. Raises GrammarError naming the keyword's path."""
    stack: list[tuple[Any, str, int]] = [(schema, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, dict):
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError("structured_outputs.json",
                               f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        for key in node:
            if key in _UNENFORCED or (key == "uniqueItems" and node[key] is True) or (
                    key == "allOf" and isinstance(node[key], list) and len(node[key]) > 1):
                raise GrammarError("structured_outputs.json",
                                   f"unsupported JSON Schema keyword {key!r} at "
                                   f"{path or '/'} (it cannot be enforced)")
        for key in _SUB_ONE:
            if key in node:
                stack.append((node[key], f"{path}/{key}", depth + 1))
        for key in _SUB_LIST:
            if isinstance(node.get(key), list):
                stack.extend((s, f"{path}/{key}/{i}", depth + 1) for i, s in enumerate(node[key]))
        for key in _SUB_MAP:
            if isinstance(node.get(key), dict):
                stack.extend((s, f"{path}/{key}/{k}", depth + 1) for k, s in node[key].items())


def _choice_ebnf(choices: Sequence[str]) -> str:
    # JSON string escapes (\" \\ \n \uXXXX) are also EBNF string escapes in xgrammar.
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompiler:
    """Compiles specs for one tokenizer and keeps the last CACHE_SIZE compiled grammars (an
    LRU keyed by (spec, tokenizer fingerprint)). Thread-safe: the gateway compiles in worker
    threads, a worker compiles off its step thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self._compiler: Any = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.fingerprint = ""

    def _ensure(self) -> Any:
        if self._compiler is None:
            xgr = import_xgrammar()
            with self._lock:
                if self._compiler is None:
                    info = tokenizer_info(xgr, self.tokenizer, self.vocab_size,
                                          self.stop_token_ids)
                    self.fingerprint = hashlib.sha256(
                        info.dump_metadata().encode() + repr(self.stop_token_ids).encode()
                    ).hexdigest()[:16]
                    # Our own LRU caches (bounded by entries); xgrammar's would be a second copy.
                    self._compiler = xgr.GrammarCompiler(info, max_threads=1,
                                                         cache_enabled=False)
        return self._compiler

    def prepare(self) -> None:
        """Import xgrammar and build the tokenizer's tables (what a first compile would)."""
        self._ensure()

    def compile(self, spec: StructuredOutputs) -> Any:
        """The xgrammar CompiledGrammar of a spec. Raises GrammarError (a bad spec) or
        StructuredOutputUnavailable."""
        compiler = self._ensure()
        key = (spec.key, self.fingerprint)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(compiler, spec)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(compiler: Any, spec: StructuredOutputs) -> Any:
        kind, value = spec.key
        field = f"structured_outputs.{kind}"
        try:
            if kind in ("json", "json_object"):
                if kind == "json":
                    check_schema_keywords(json.loads(value))
                # any_whitespace=False: fixed separators, no newlines or runs of spaces (a
                # weak model would otherwise spend its budget there: vLLM's
                # disable_any_whitespace trap). strict_mode: no properties the schema lacks.
                grammar = import_xgrammar().Grammar.from_json_schema(
                    value if kind == "json" else '{"type": "object"}', any_whitespace=False,
                    strict_mode=kind == "json")
                return compiler.compile_grammar(_fix_counted_strings(str(grammar)))
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(value))
            grammar = import_xgrammar().Grammar.from_ebnf(value)
            if not root_can_end(str(grammar)):
                raise GrammarError(field, "the grammar accepts no finite output (its root "
                                   "rule can never end)")
            return compiler.compile_grammar(grammar)
        except GrammarError:
            raise
        except RecursionError:
            raise GrammarError(field, "nested too deeply") from None
        except Exception as e:   # xgrammar raises RuntimeError / ValueError with its reason
            raise GrammarError(field, _reason(e)) from None


# NOTE: xgrammar 0.2.9 writes the characters of a string with minLength / maxLength as
# [^"\\\r\n], which admits raw control characters (invalid JSON: a random model emitted
# "\x11" inside a string); its unbounded strings exclude \0-\x1f as JSON requires.
_COUNTED_CHAR = r'[^\"\\\r\n]'
_JSON_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _fix_counted_strings(ebnf: str) -> str:
    return ebnf.replace(_COUNTED_CHAR, _JSON_CHAR)


def _reason(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix ("[time] file.cc:N: ")."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("[") and ": " in text:
        parts = text.split(": ", 1)
        if ".cc:" in parts[0]:
            text = parts[1]
    return text[:500]


def tokenizer_info(xgr: Any, tokenizer: Tokenizer, vocab_size: int,
                   stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's TokenizerInfo for our tokenizer (tokenizers' backend, no transformers
    object): the vocabulary by id, padded to the model's vocab_size (the logits' width), and
    the vocab type read from the serialized tokenizer as xgrammar's HF path does."""
    backend = tokenizer._backend
    vocab = backend.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, idx in vocab.items():
        if 0 <= idx < vocab_size:
            encoded[idx] = token
    # NOTE: special tokens (bos, chat markers) must never match grammar text: the detokenizer
    # drops them, so a "<|begin_of_text|>" counted as 17 characters of a string would leave
    # it short of its minLength. xgrammar never allows a token whose text is empty (the stop
    # tokens are allowed by id, where the grammar may end).
    for idx, added in backend.get_added_tokens_decoder().items():
        if added.special and 0 <= idx < vocab_size:
            encoded[idx] = ""
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    from_vocab = xgr.TokenizerInfo._detect_vocab_type_from_vocab(vocab)
    vocab_type = from_vocab if from_vocab is not None else meta["vocab_type"]
    return xgr.TokenizerInfo(encoded, vocab_type=vocab_type, vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids) or None,
                             add_prefix_space=meta["add_prefix_space"])
