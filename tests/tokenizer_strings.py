"""Deterministic test strings for tokenizer equivalence: unicode, code, whitespace runs and
special tokens, mixed (a seeded generator, so a failure names a string that reproduces)."""

from __future__ import annotations

import pathlib
import random
import sysconfig

_UNICODE = ("héllo wörld", "naïve café", "Ελληνικά", "русский текст", "日本語のテキスト",
            "中文分词测试", "한국어", "עברית", "العربية", "हिन्दी", "🙂🚀👩‍💻", "∑∫√∞≠",
            "ﬁ ligature", "e\u0301 combining", "\u00a0nbsp", "zero\u200bwidth", "tab\tsep",
            "emoji 🇫🇷 flag", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇")
_WS = (" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t  ", "    ")
_PIECES = ("Hello", "world", "The", " quick", "brown", "fox", "123", "4567", "3.14159", "don't",
           "I'm", "we'll", "it's", "URL https://example.com/a?b=c", "foo_bar", "CamelCase",
           "snake_case_name", "x+=1;", "{}", "[]", "()", "<>", "==", "!=", "#", "@", "$5.00",
           "'quoted'", '"double"', "...", "--", "—", "e.g.", "A", "a", "I")


def _code_lines(n: int) -> list[str]:
    """Lines of the standard library's own sources (deterministic: sorted files)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.glob("*.py"))[:40]:
        lines.extend(l for l in path.read_text(encoding="utf-8", errors="ignore").splitlines()
                     if l.strip())
        if len(lines) >= n:
            break
    return lines[:n]


def tokenizer_strings(n: int, specials: list[str], seed: int = 0) -> list[str]:
    """`n` strings: a quarter each of unicode, code, whitespace runs and special-token mixes."""
    rng = random.Random(seed)
    code = _code_lines(400)
    out: list[str] = []
    while len(out) < n:
        kind = len(out) % 4
        if kind == 0:
            s = rng.choice(_UNICODE) + rng.choice(_WS) + rng.choice(_UNICODE + _PIECES)
            if rng.random() < 0.3:
                s = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 12)))
        elif kind == 1:
            start = rng.randrange(len(code) - 4)
            s = "\n".join(code[start:start + rng.randrange(1, 4)])
        elif kind == 2:
            s = "".join(rng.choice(_WS) + rng.choice(_PIECES) for _ in range(rng.randrange(1, 6)))
            s += rng.choice(_WS) * rng.randrange(0, 3)
        else:
            parts = [rng.choice(specials), rng.choice(_PIECES), rng.choice(_WS),
                     rng.choice(specials), rng.choice(_UNICODE), rng.choice(specials) + "x"]
            rng.shuffle(parts)
            s = "".join(parts[:rng.randrange(2, len(parts) + 1)])
        out.append(s)
    return out
