"""Does an EBNF grammar accept any finite output? (`root ::= "a" root` does not: a request
under it could only run out of tokens.) xgrammar compiles such grammars without complaint,
so the gateway asks this of xgrammar's normalized print of the grammar and refuses a
grammar whose root can never end.

The normalized form is one rule per line, `name ::= body`, the body built from string
literals, character classes, rule names, parenthesised alternatives, repetitions `{m, n}`
(and `* + ?`) and lookaheads `(= ...)`. A rule "ends" when one of its alternatives is made of
items that all end; a fixed point over the rules answers for `root`. Lookaheads are assumed
satisfiable (they only restrict what follows), so the check never refuses a good grammar.
"""

from __future__ import annotations

# An item: ("end",) always ends; ("ref", name) ends if the rule does; ("alt", [[item]]) if
# one of its sequences does.
Item = tuple


class _Parser:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def _peek(self) -> str:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1
        return self.s[self.i] if self.i < len(self.s) else ""

    def alternatives(self, close: str = "") -> list[list[Item]]:
        alts, seq = [], []
        while True:
            c = self._peek()
            if c == "" or c == close:
                alts.append(seq)
                return alts
            if c == "|":
                self.i += 1
                alts.append(seq)
                seq = []
                continue
            item = self._item()
            if item is not None:
                seq.append(item)

    def _item(self) -> Item | None:
        s, c = self.s, self._peek()
        if c == '"' or c == "[":
            end = '"' if c == '"' else "]"
            self.i += 1
            while self.i < len(s) and s[self.i] != end:
                self.i += 2 if s[self.i] == "\\" else 1
            self.i += 1
            item: Item | None = ("end",)
        elif c == "(":
            self.i += 1
            lookahead = self._peek() == "="
            if lookahead:
                self.i += 1
            inner = self.alternatives(")")
            self.i += 1
            item = ("end",) if lookahead else ("alt", inner)
        else:
            start = self.i
            while self.i < len(s) and (s[self.i].isalnum() or s[self.i] in "_-."):
                self.i += 1
            if self.i == start:   # an unexpected character: skip it, stay permissive
                self.i += 1
                return None
            item = ("ref", s[start:self.i])
        return self._repeat(item)

    def _repeat(self, item: Item) -> Item:
        c = self._peek()
        if c and c in "*?":
            self.i += 1
            return ("end",)
        if c == "+":
            self.i += 1
            return item
        if c == "{":
            close = self.s.find("}", self.i)
            low = self.s[self.i + 1:close].split(",")[0].strip()
            self.i = close + 1
            return ("end",) if low == "0" else item
        return item


def root_can_end(normalized_ebnf: str, root: str = "root") -> bool:
    rules: dict[str, list[list[Item]]] = {}
    for line in normalized_ebnf.splitlines():
        name, sep, body = line.partition(" ::= ")
        if sep:
            rules[name.strip()] = _Parser(body).alternatives()
    ends: set[str] = set()

    def item_ends(item: Item) -> bool:
        if item[0] == "end":
            return True
        if item[0] == "ref":
            return item[1] in ends or item[1] not in rules
        return any(all(item_ends(x) for x in seq) for seq in item[1])

    changed = True
    while changed:
        changed = False
        for name, alts in rules.items():
            if name not in ends and item_ends(("alt", alts)):
                ends.add(name)
                changed = True
    return root in ends or root not in rules
