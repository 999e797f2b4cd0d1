"""Process-wide log setup for every service: text or JSON lines, request and trace ids.

``--log-format json`` writes one JSON object per line with ``time``, ``level``, ``logger``,
``message``, ``service`` and, where one applies, ``request_id``, ``trace_id`` and ``span_id``.
The ids come from the record's ``extra`` (``logger.info(..., extra={"request_id": rid,
"trace_id": tid})``), else from the ``request_id_var`` context variable and the current
OpenTelemetry span, so a line logged while a request is handled carries them without help.

Prompt and output text are user content: no code logs them unless ``--log-prompts`` is given,
and code that could must ask ``prompts_allowed()`` first.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import TextIO

from opentelemetry import trace

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("tessera_request_id", default=None)
_log_prompts = False


def prompts_allowed() -> bool:
    """Whether prompt and output text may be logged (``--log-prompts``; off by default)."""
    return _log_prompts


def _ids(record: logging.LogRecord) -> dict[str, str]:
    ids: dict[str, str] = {}
    rid = getattr(record, "request_id", None) or request_id_var.get()
    if rid:
        ids["request_id"] = str(rid)
    tid = getattr(record, "trace_id", None)
    if tid:
        ids["trace_id"] = str(tid)
    else:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            ids["trace_id"] = f"{ctx.trace_id:032x}"
            ids["span_id"] = f"{ctx.span_id:016x}"
    return ids


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.service:
            out["service"] = self.service
        out.update(_ids(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, plus ``[request_id=… trace_id=…]`` when a request applies."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _ids(record)
        ids.pop("span_id", None)
        if ids:
            line += " [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]"
        return line


def configure(log_format: str = "text", log_prompts: bool = False, service: str | None = None,
              level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Configure the root logger once for a service process (replaces logging.basicConfig)."""
    global _log_prompts
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    _log_prompts = log_prompts
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    if log_prompts:
        logging.getLogger(__name__).warning("--log-prompts: prompt and output text will be logged")
