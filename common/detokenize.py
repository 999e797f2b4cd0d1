"""Incremental detokenization with stop strings (shared by the offline engine and the gateway).

The scheduler publishes token ids, never text; whoever relays them to a user turns them into
text here, one step's ids at a time. Two problems make that harder than ``decode(new_ids)``:

* A token is not a unit of text. Byte-level BPE tokens carry bytes, so a multi-byte character
  can be split across tokens, and SentencePiece-style decoders drop the leading space of the
  first token they see. We therefore use the prefix/read offset technique of vLLM's
  ``detokenize_incrementally`` (TGI's ``decode_token``): decode a small window that starts a
  few tokens back (so leading-space rules see context) and emit only what the window adds
  past its already-read part. Per-token cost is O(window), never O(output).
* Text ending in U+FFFD may be an incomplete UTF-8 sequence that a later token completes, so
  it is held back. Only the trailing run of U+FFFD is unstable: everything before the last
  incomplete sequence decodes the same whatever bytes follow (UTF-8 is self-synchronising), so
  it is released (and searched for stop strings) at once.

Invariant (byte-level BPE): without a stop string, the concatenation of every delta's text
plus ``flush()`` equals ``tokenizer.decode(all_output_ids, skip_special_tokens=...)``.

Stop strings: a stop may complete in a later token, so the longest tail of the text that is a
proper prefix of some stop string is held back (never more), and released as soon as it can no
longer start one. When several stop strings match, the one that completes first in the stream
wins (ties: the longer one); unlike "earliest start", that answer does not depend on how the
text happened to be split into tokens.

NOTE: this module never logs text: it is user content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.tokenizer import Tokenizer

__all__ = ["DetokenizerDelta", "IncrementalDetokenizer"]

# How many prompt tokens seed the first window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET):
# enough that a SentencePiece decoder does not treat the first output token as the start of text.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerDelta:
    """What one ``add_tokens`` call produced.

    ``text`` never contains (or goes past) a stop string unless ``include_stop_str_in_output``,
    in which case it ends right after the stop string. ``num_tokens`` counts the ids of this
    call that were consumed: all of them, unless a stop string completed in the text of one of
    them, in which case the ids after that one are ignored (trim the call's ids to it).
    """

    text: str
    stop: str | None = None
    num_tokens: int = 0


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, cutting at stop strings.

    One instance per sequence; not thread-safe. ``prompt_token_ids`` only seeds the decode
    window with context (prompt text is never emitted).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        # Every proper prefix of a stop string: the tail that must be held back is the longest
        # suffix of the text found here (a set lookup per length, not a scan over stops).
        self._stop_prefixes = {s[:i] for s in self._stops for i in range(1, len(s))}
        self._max_prefix = max((len(s) for s in self._stops), default=1) - 1

        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # A context ending inside a UTF-8 sequence would glue prompt bytes onto the first output
        # character, which a decode of the output alone would not do: drop it.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._tokens: list[int] = context  # context + output ids; windows index into it
        self._prefix_offset = 0  # window start: tokens decoded only for context
        self._read_offset = len(context)  # tokens before this are fully emitted into text
        self._prefix_text = self._decode(context)
        self._taken = 0  # chars of the current window, past prefix_text, already moved to _pending

        self._pending = ""  # decoded, stable text not yet emitted (stop-string hold-back)
        self._emitted: list[str] = []
        self._output_text: str | None = ""
        self._num_output_tokens = 0
        self.stopped: str | None = None
        self.num_tokens_to_stop: int | None = None  # output ids up to and including the stopping one
        self.finished = False

    # -- public ------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """Everything emitted so far (including what ``flush`` released)."""
        if self._output_text is None:
            self._output_text = "".join(self._emitted)
            self._emitted = [self._output_text]
        return self._output_text

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerDelta:
        """Consume newly generated ids; return the text that is now safe to show."""
        if self.finished:
            return DetokenizerDelta("", None, 0)
        out: list[str] = []
        for n, token_id in enumerate(token_ids, start=1):
            self._tokens.append(token_id)
            self._num_output_tokens += 1
            text = self._decode_window(final=False)
            if text and self._scan(text, out, final=False):
                self.num_tokens_to_stop = self._num_output_tokens
                return self._delta(out, self.stopped, n)
        return self._delta(out, None, len(token_ids))

    def flush(self) -> str:
        """End of generation (not by a stop string): release held-back text.

        Bytes of an unfinished character come out as U+FFFD, as a full decode writes them; a
        stop string completed by that final text is still honoured. Further calls return "".
        """
        if self.finished:
            return ""
        out: list[str] = []
        if self._scan(self._decode_window(final=True), out, final=True):
            self.num_tokens_to_stop = self._num_output_tokens
        self.finished = True
        return self._delta(out, self.stopped, 0).text

    # -- internals ---------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_window(self, final: bool) -> str:
        """New stable text of the window, advancing the offsets when the window ends cleanly."""
        window_text = self._decode(self._tokens[self._prefix_offset :])
        start = len(self._prefix_text) + self._taken
        if not final and window_text.endswith(_REPLACEMENT):
            # The last character may still be completed by the next token: take only what
            # precedes the trailing replacement characters, and keep the window open.
            stable = window_text.rstrip(_REPLACEMENT)
            if len(stable) <= start:
                return ""
            self._taken = len(stable) - len(self._prefix_text)
            return stable[start:]
        new = window_text[start:] if len(window_text) > start else ""
        if len(window_text) > len(self._prefix_text):
            # NOTE: advance only when the window produced text, as vLLM does: a token that
            # decodes to nothing (a skipped special token) keeps the old context.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
            self._taken = 0
        return new

    def _scan(self, text: str, out: list[str], final: bool) -> bool:
        """Add ``text`` to the held-back text, emit what cannot start a stop; True on a stop."""
        pending = self._pending + text
        if self._stops:
            # Every stop-string prefix that ends the old text is held back, so a new match
            # must lie within ``pending``: the search never looks at emitted text.
            match = self._find_stop(pending, len(self._pending))
            if match is not None:
                stop, start = match
                out.append(pending[: start + len(stop)] if self._include_stop else pending[:start])
                self._pending = ""
                self.stopped = stop
                self.finished = True
                return True
        hold = 0 if final else self._held_tail(pending)
        out.append(pending[: len(pending) - hold])
        self._pending = pending[len(pending) - hold :]
        return False

    def _find_stop(self, pending: str, old_len: int) -> tuple[str, int] | None:
        """The stop string that completes first in ``pending`` (ties: the longer), and its start.

        Text before ``old_len`` was already searched, so only matches ending past it count.
        """
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self._stops:
            at = pending.find(stop, max(0, old_len - len(stop) + 1))
            if at >= 0:
                key = (at + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        return None if best is None else (best[2], best[0] + best[1])

    def _held_tail(self, pending: str) -> int:
        """Length of the longest suffix of ``pending`` that is a proper prefix of a stop string."""
        for k in range(min(self._max_prefix, len(pending)), 0, -1):
            if pending[-k:] in self._stop_prefixes:
                return k
        return 0

    def _delta(self, out: list[str], stop: str | None, num_tokens: int) -> DetokenizerDelta:
        text = "".join(out)
        if text:
            self._emitted.append(text)
            self._output_text = None
        return DetokenizerDelta(text, stop, num_tokens)
