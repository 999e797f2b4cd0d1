"""Incremental detokenization: exact agreement with a full decode, and stop-string cutting.

The oracle is ``Tokenizer.decode`` of all output ids at once; the tokenizers are the real
byte-level BPE files ``make-model`` writes (vocab 512, so most characters outside ASCII span
several tokens: a good stress of the UTF-8 hold-back).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.detokenize import IncrementalDetokenizer
from common.tokenizer import Tokenizer

FFFD = "\ufffd"
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tok(request: pytest.FixtureRequest, tiny_model: Callable[..., pathlib.Path]) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model(request.param))


def feed(det: IncrementalDetokenizer, ids: Sequence[int], sizes: Sequence[int] = (1,)) -> list[str]:
    """Feed ``ids`` in groups whose sizes cycle through ``sizes``; return every delta's text."""
    deltas, i, n = [], 0, 0
    while i < len(ids):
        k = max(1, sizes[n % len(sizes)])
        deltas.append(det.add_tokens(ids[i : i + k]).text)
        i, n = i + k, n + 1
    return deltas


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# -- equality with the full decode ---------------------------------------------------------


@_SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_random_ids_match_full_decode(tok: Tokenizer, data: st.DataObject, skip: bool) -> None:
    # Random ids are mostly invalid UTF-8: the replacement characters must land exactly where
    # a full decode puts them, whatever the grouping and prompt context.
    token = st.integers(0, tok.vocab_size - 1)
    ids = data.draw(st.lists(token, max_size=60))
    prompt = data.draw(st.lists(token, max_size=8))
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    text = "".join(feed(det, ids, sizes)) + det.flush()
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert det.output_text == text
    assert det.stopped is None


@_SETTINGS
@given(text=st.text(max_size=40), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4))
@example(text="a\ufffd", sizes=[1])
@example(text="\ufffd b", sizes=[1])
def test_any_text_round_trips_and_never_emits_half_a_character(tok: Tokenizer, text: str, sizes: list[int]) -> None:
    ids = encode(tok, text)
    assert tok.decode(ids) == text  # byte-level BPE is lossless: the oracle is the text itself
    for group_sizes in ([1], sizes):
        det = IncrementalDetokenizer(tok, encode(tok, "Prompt: "))
        deltas = feed(det, ids, group_sizes)
        if FFFD not in text:
            assert not any(FFFD in d for d in deltas)
        tail = det.flush()
        assert "".join(deltas) + tail == text
        # The text ends on a whole character, so flush has nothing left, except a literal
        # U+FFFD at the very end: it looks like an unfinished character until the end.
        assert tail == text[len(text.rstrip(FFFD)):]


def test_multibyte_characters_split_across_tokens(tok: Tokenizer) -> None:
    text = "Café naïve Ünïcödé — 你好，世界! 😀🎉👍🏽 fin"
    ids = encode(tok, text)
    # Precondition: characters really are split (else the test proves nothing).
    assert sum(FFFD in tok.decode([i]) for i in ids) >= 10
    det = IncrementalDetokenizer(tok)
    deltas = feed(det, ids)
    assert not any(FFFD in d for d in deltas)
    assert "".join(deltas) + det.flush() == text
    assert "😀" in deltas and "你" in deltas  # whole characters, released by their last token


def test_flush_releases_an_unfinished_character_as_a_full_decode_does(tok: Tokenizer) -> None:
    ids = encode(tok, "ok 你")[:-1]  # cut inside the last character
    det = IncrementalDetokenizer(tok)
    assert "".join(feed(det, ids)) == "ok "
    tail = det.flush()
    assert tail.startswith(FFFD) and "ok " + tail == tok.decode(ids)
    assert det.flush() == ""


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    eos = tok.eos_token_id
    assert eos is not None
    ids = encode(tok, "Hello") + [eos] + encode(tok, " world")
    for skip, expected in ((True, "Hello world"), (False, f"Hello{tok.eos_token} world")):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(feed(det, ids)) + det.flush() == expected == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_context_is_never_emitted(tok: Tokenizer) -> None:
    prompt = encode(tok, "The prompt ends here.")
    det = IncrementalDetokenizer(tok, prompt)
    assert "".join(feed(det, encode(tok, " And the output."))) == " And the output."


# -- stop strings -----------------------------------------------------------------------


def run(tok: Tokenizer, text: str, stop: Sequence[str], include: bool = False, sizes: Sequence[int] = (1,),
        extra: str = "") -> tuple[IncrementalDetokenizer, list[str], list[int]]:
    ids = encode(tok, text + extra)
    det = IncrementalDetokenizer(tok, stop=stop, include_stop_str_in_output=include)
    return det, feed(det, ids, sizes), ids


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    text, stop = "Hello world, this is the end. More text after.", "is the en"
    ids = encode(tok, text)
    assert not any(stop in tok.decode([i]) for i in ids)  # precondition: no single token holds it
    det = IncrementalDetokenizer(tok, stop=[stop])
    deltas = []
    for n, token_id in enumerate(ids, start=1):
        delta = det.add_tokens([token_id])
        deltas.append(delta.text)
        if delta.stop is not None:
            break
    assert det.stopped == stop == delta.stop
    assert det.output_text == "".join(deltas) == text[: text.index(stop)]
    # The stop completed in token n's text: ids before it hold less than the whole stop.
    assert det.num_tokens_to_stop == n and delta.num_tokens == 1
    assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[: n - 1])
    # Later tokens are ignored, and there is nothing left to flush.
    assert det.add_tokens(ids[n:]).text == "" and det.flush() == ""
    assert det.output_text == text[: text.index(stop)]


def test_stop_string_inside_one_tokens_text(tok: Tokenizer) -> None:
    text = "Hello world, the end."
    ids = encode(tok, text)
    # Pick a token of four or more characters (" the") and a stop strictly inside it ("th").
    pos = next(n for n, i in enumerate(ids) if len(tok.decode([i])) >= 4)
    piece = tok.decode([ids[pos]])
    stop = piece[1:-1]
    before = tok.decode(ids[:pos])
    assert (before + piece).find(stop) == len(before) + 1  # first seen strictly inside the token
    det = IncrementalDetokenizer(tok, stop=[stop])
    deltas = feed(det, ids[:pos])
    delta = det.add_tokens(ids[pos:])  # the rest in one call: the ids after the stop are ignored
    assert delta.stop == stop and delta.num_tokens == 1 and det.num_tokens_to_stop == pos + 1
    assert det.output_text == "".join(deltas) + delta.text == before + piece[0]


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    text, stop = "Hello world, this is the end. More text after.", "the end"
    for sizes in ([1], [3], [100]):
        det, deltas, _ = run(tok, text, [stop], include=True, sizes=sizes)
        assert det.stopped == stop
        assert "".join(deltas) == det.output_text == text[: text.index(stop) + len(stop)]


def test_earliest_stop_wins(tok: Tokenizer) -> None:
    text = "Hello world, this is the end. More text after."
    for sizes in ([1], [4], [100]):
        det, _, _ = run(tok, text, ["More", "the", "world, t"], sizes=sizes)
        assert det.stopped == "world, t" and det.output_text == "Hello "
    # Overlapping stops: the one that completes first in the stream wins, however the text is
    # grouped ("is" completes inside "this", before "this is" can).
    for sizes in ([1], [100]):
        det, _, _ = run(tok, text, ["this is", "is"], sizes=sizes)
        assert det.stopped == "is" and det.output_text == "Hello world, th"


def test_no_false_stop_on_a_diverging_prefix(tok: Tokenizer) -> None:
    text, stop = "the enemy is the end", "the end"
    ids = encode(tok, text)
    det = IncrementalDetokenizer(tok, stop=[stop])
    seen = []
    for token_id in ids:
        det.add_tokens([token_id])
        seen.append(det.output_text)
    assert det.stopped == stop and det.output_text == "the enemy is "
    # "the e" and "the en" were held back while they could start the stop, then released.
    assert "the e" not in seen and "the en" not in seen
    assert any(s.startswith("the ene") for s in seen)


def test_flush_releases_held_back_tail(tok: Tokenizer) -> None:
    det, deltas, _ = run(tok, "hello ST", ["STOP"])
    assert "".join(deltas) == det.output_text == "hello "
    assert det.flush() == "ST" and det.output_text == "hello ST" and det.stopped is None


def test_stop_on_a_kept_special_token(tok: Tokenizer) -> None:
    eos = tok.eos_token
    ids = encode(tok, "Hi there") + [tok.eos_token_id] + encode(tok, " more")
    det = IncrementalDetokenizer(tok, skip_special_tokens=False, stop=[eos])
    assert "".join(feed(det, ids)) == "Hi there" and det.stopped == eos


def test_empty_stop_string_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, stop=[""])


def _reference(tok: Tokenizer, ids: list[int], stops: list[str]) -> tuple[list[str], str | None, str]:
    """Brute force over prefixes: expected output_text after each token, the stop and the final text."""
    shown = []
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
        if hits:
            end, neg_len, s = min(hits)
            return shown, s, text[: end + neg_len]
        hold = max((j for j in range(1, len(text) + 1) for s in stops if len(s) > j and s.startswith(text[-j:])),
                   default=0)
        shown.append(text[: len(text) - hold])
    return shown, None, tok.decode(ids)


@_SETTINGS
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_strings_against_brute_force(tok: Tokenizer, text: str, stops: list[str]) -> None:
    # ASCII only, so every token's text is final at once and the brute force stays simple.
    ids = encode(tok, text)
    shown, stop, final = _reference(tok, ids, stops)
    det = IncrementalDetokenizer(tok, stop=stops)
    for k, token_id in enumerate(ids):
        det.add_tokens([token_id])
        if det.stopped is not None:
            break
        assert det.output_text == shown[k]
    det.flush()
    assert det.stopped == stop and det.output_text == final
    grouped = IncrementalDetokenizer(tok, stop=stops)  # grouping never changes the answer
    feed(grouped, ids, [3])
    grouped.flush()
    assert grouped.stopped == stop and grouped.output_text == final
