"""Runtime tokenizer: HF ``tokenizer.json`` + ``tokenizer_config.json`` without transformers.

The gateway tokenizes prompts, renders chat templates and detokenizes outputs; it must agree
with HF transformers token for token (HF is our oracle) while depending only on the
``tokenizers`` library and jinja2. Chat templates are untrusted code from model
repositories, so they render in jinja2's immutable sandbox with the same environment
options and helpers HF gives them.

Known limit: transformers 5 replaces the pipeline in tokenizer.json by a hardcoded one for a
few model types (e.g. Qwen2Tokenizer, LlamaTokenizer for SentencePiece-style files). We always
honour tokenizer.json, which matches HF whenever the file agrees with that class, as the
files published with those models do.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from common.gguf_file import is_gguf, open_gguf
from common.gguf_tokenizer import build_gguf_tokenizer

# Named special tokens HF exposes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encode, decode and chat-template rendering for one model directory."""

    def __init__(
        self,
        backend: _Backend,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        template_source: str = "tokenizer_config.json or chat_template.jinja",
    ) -> None:
        self._backend = backend
        # Where a chat template would have come from: named when there is none.
        self.template_source = template_source
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> Tokenizer:
        """Load ``tokenizer.json`` and (if present) ``tokenizer_config.json`` from ``model_dir``."""
        root = pathlib.Path(model_dir)
        if is_gguf(root):
            return cls.from_gguf(root)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory not found: {root}")
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_path} (only fast tokenizer.json files are supported)")
        backend = _Backend.from_file(str(tok_path))
        config = _read_json(root / "tokenizer_config.json")
        # Older repositories keep the special tokens in special_tokens_map.json; the
        # tokenizer config wins where both name one.
        legacy = _read_json(root / "special_tokens_map.json")
        special = {}
        for name in _NAMED_SPECIAL_TOKENS:
            value = _token_content(config.get(name, legacy.get(name)))
            if value is not None:
                special[name] = value
        return cls(
            backend,
            special_tokens=special,
            chat_template=_load_chat_template(root, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            template_source=f"{root / 'tokenizer_config.json'} (chat_template) or "
                            f"{root / 'chat_template.jinja'}",
        )

    @classmethod
    def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
        """The tokenizer a GGUF file's metadata describes (`common/gguf_tokenizer.py`)."""
        built = build_gguf_tokenizer(open_gguf(path))
        return cls(built.backend(), special_tokens=built.special_tokens,
                   chat_template=built.chat_template,
                   template_source=f"{path} (metadata field tokenizer.chat_template)")

    # -- ids <-> text ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; ``add_special_tokens`` runs tokenizer.json's post-processor (e.g. adds bos)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``.

        NOTE: the default is ``skip_special_tokens=True`` (what a server returns to users);
        HF's own default is False.
        """
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # HF ignores clean_up_tokenization_spaces for BPE models: the cleanup exists for
        # WordPiece and would delete real spaces before punctuation.
        if self._clean_up and type(self._backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Token strings (byte-level symbols, not text) for one id or a list of ids."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -- special tokens -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the id space including added tokens (HF's ``len(tokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._backend.token_to_id(self.eos_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens, as HF passes them to chat templates."""
        return dict(self._special)

    # -- chat -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` as HF's ``apply_chat_template`` does.

        ``chat_template`` may be a template or the name of one of the model's templates.
        With ``tokenize=True`` the rendered text is encoded without special tokens, because
        the template already wrote them (HF does the same).
        """
        template = self._select_template(chat_template, tools)
        # HF drops None-valued keys: OpenAI-style messages carry content=None / tool_calls=None.
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {**self._special, **kwargs}
        text = _compile(template).render(
            messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, name_or_template: str | None, tools: list[dict] | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template is not None:
                return templates.get(name_or_template, name_or_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"the model has several chat templates and none is 'default': {sorted(templates)}")
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise ValueError(f"the model has no chat template: none in {self.template_source}")
        return templates


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """Special tokens are saved as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _load_chat_template(root: pathlib.Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """Template files take priority over tokenizer_config.json entries, as in transformers."""
    templates: dict[str, str] = {}
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    value = config.get("chat_template")
    if value is None:
        # Processor-style repositories keep it in chat_template.json.
        value = _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(value, (list, tuple)):
        return {t["name"]: t["template"] for t in value}
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF overrides jinja's tojson, which would HTML-escape characters like < and &.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HF's ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) and renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template text, in the environment HF uses (trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _clean_up_tokenization(text: str) -> str:
    """HF's legacy WordPiece cleanup (spaces before punctuation and contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
