"""Reading an OpenAI-style server-sent-event stream, one way for every client we ship or test with.

Each event is `(id, data)`: `id` is the event's `id:` line (None when it had none: the usage
chunk), `data` the decoded JSON chunk, or the string DONE for the `data: [DONE]` sentinel.
`SseReader.feed` takes one line at a time, so the same parser serves sync (`iter_lines`) and
async (`aiter_lines`) readers; `events` is the sync form.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DONE = "[DONE]"


class SseReader:
    """Feed it the stream's lines; it returns an event for each `data:` line, else None."""

    def __init__(self) -> None:
        self._id: str | None = None

    def feed(self, line: str) -> tuple[str | None, Any] | None:
        if line.startswith("id:"):
            self._id = line[3:].strip()
            return None
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        eid, self._id = self._id, None
        return eid, data if data == DONE else json.loads(data)


def events(lines: Iterable[str]) -> Iterator[tuple[str | None, Any]]:
    """The events of a stream's lines, up to and including [DONE]."""
    reader = SseReader()
    for line in lines:
        event = reader.feed(line)
        if event is not None:
            yield event
            if event[1] == DONE:
                return
