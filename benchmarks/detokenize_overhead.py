"""Per-token cost of incremental detokenization (prints only; never asserted anywhere).

The gateway detokenizes every generated token of every stream on its CPU, so this cost bounds
how many tokens per second one gateway replica can relay. Baselines in the same run: one
decode of the whole output (the floor) and re-decoding the whole output after every token
(the O(n^2) approach the incremental window avoids).

    python benchmarks/detokenize_overhead.py [--tokens 1000] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections.abc import Callable

from common.detokenize import IncrementalDetokenizer
from common.tokenizer import Tokenizer
from tessera.tokenizer_build import training_corpus, tokenizer_json

_TEXT_EXTRA = " Café naïve — 你好，世界! 😀🎉 "  # multi-byte characters split across tokens


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs, in seconds: the least disturbed by a noisy machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "tokenizer.json").write_text(tokenizer_json(args.vocab, "llama"), encoding="utf-8")
        tok = Tokenizer.from_dir(tmp)

    text = ""
    for chunk in training_corpus(200_000):
        text += chunk + _TEXT_EXTRA
        if len(tok.encode(text, add_special_tokens=False)) >= args.tokens:
            break
    ids = tok.encode(text, add_special_tokens=False)[: args.tokens]
    n = len(ids)
    prompt = ids[:16]

    def incremental(stop: tuple[str, ...] = ()) -> None:
        det = IncrementalDetokenizer(tok, prompt, stop=stop)
        for token_id in ids:
            det.add_tokens((token_id,))
        det.flush()

    def redecode_each_step() -> None:
        for k in range(1, n + 1):
            tok.decode(ids[:k])

    rows = [
        ("one full decode (floor)", _best_of(lambda: tok.decode(ids), args.repeats)),
        ("incremental, no stop strings", _best_of(incremental, args.repeats)),
        ("incremental, 4 stop strings", _best_of(lambda: incremental(("###", "\n\nUser:", "</s>", "STOP")),
                                                   args.repeats)),
        ("re-decode all output per token", _best_of(redecode_each_step, max(1, args.repeats // 2))),
    ]
    base = rows[1][1]
    print(f"{n} tokens, vocab {tok.vocab_size}, one token per add_tokens call")
    for name, seconds in rows:
        print(f"  {name:<34} {seconds / n * 1e6:8.2f} us/token   x{seconds / base:6.2f} of incremental")


if __name__ == "__main__":
    main()
