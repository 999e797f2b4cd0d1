"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a list
of strings, or an EBNF grammar (vLLM's `structured_outputs` shape).

A plain value type, validated on construction (exactly one kind, sizes bounded), with no
dependency on the grammar engine: the gateway compiles a spec with the model's tokenizer to
refuse a bad one before enqueue (common/grammar.py), the workers compile it again for their
matchers (worker/structured.py). A JSON schema is kept as canonical JSON text, so equal
schemas are equal specs (one compiled grammar in every cache) and the spec stays hashable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SPEC_CHARS = 64 * 1024       # schema / regex / grammar text: compile time grows with it
MAX_CHOICES, MAX_CHOICE_CHARS = 256, 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of the fields is set. `json` is a JSON schema (a dict, or its JSON text);
    `json_object`: any JSON object; `regex`; `choice`: the output is one of these strings;
    `grammar`: an EBNF grammar in xgrammar's (GBNF-like) dialect with a `root` rule.

    JSON output has no free whitespace (`", "` and `": "` separators, no newlines), so a
    weak model cannot spend its tokens on whitespace; `maxLength` / `maxItems` bound strings
    and arrays."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):
            object.__setattr__(self, "json", canonical_json(self.json))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError("structured_outputs must set exactly one of "
                             f"{', '.join(KINDS)}, got {set_kinds or 'none'}")
        if self.json is not None:
            _check(isinstance(self.json, str) and len(self.json) <= MAX_SPEC_CHARS,
                   "structured_outputs.json", f"a JSON schema of at most {MAX_SPEC_CHARS} "
                   "characters")
            try:
                schema = json.loads(self.json)
            except (ValueError, RecursionError):
                raise ValueError("structured_outputs.json must be a JSON schema: "
                                 "it is not valid JSON") from None
            _check(isinstance(schema, (dict, bool)), "structured_outputs.json",
                   "a JSON schema (an object)")
            object.__setattr__(self, "json", canonical_json(schema))
        _check(isinstance(self.json_object, bool), "structured_outputs.json_object",
               "true or false")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and 0 < len(v) <= MAX_SPEC_CHARS),
                   f"structured_outputs.{name}", f"a non-empty string of at most "
                   f"{MAX_SPEC_CHARS} characters")
        if self.choice is not None:
            _check(isinstance(self.choice, tuple) and 0 < len(self.choice) <= MAX_CHOICES
                   and all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS
                           for c in self.choice), "structured_outputs.choice",
                   f"a list of 1 to {MAX_CHOICES} non-empty strings of at most "
                   f"{MAX_CHOICE_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, Any]:
        """(kind, value): what a compiled grammar is cached under (with the tokenizer)."""
        kind = self.kind
        return kind, getattr(self, kind)

    def to_json(self) -> dict[str, Any]:
        """The one set field, JSON-ready (Redis records, logs of the kind only)."""
        kind, value = self.key
        return {kind: list(value) if kind == "choice" else value}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StructuredOutputs:
        return cls(**d)


def canonical_json(value: Any) -> str:
    """Sorted keys, compact separators: equal schemas give equal text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"structured_outputs.json must be a JSON schema: {e}") from None


def _check(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}")
