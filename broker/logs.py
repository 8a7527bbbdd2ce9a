"""JSON logging: one object per line, the request id on every line logged while serving a request.

Callers pass context with ``extra={...}``; those fields are copied to the top level. Nothing here
knows about tokens: the rule that only fingerprints are logged is kept at each call site and checked
by the leak tests.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _ParserErrorFilter(logging.Filter):
    """aiohttp logs a malformed request with a traceback whose message quotes the offending bytes,
    which may be the start of an oversized Authorization header: keep one line, the class only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            kind = type(record.exc_info[1]).__name__
            record.msg, record.args, record.exc_info, record.exc_text = (
                "rejected a malformed HTTP request: %s",
                (kind,),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(level: str) -> None:
    """Route every logger to stderr as JSON at ``level``; quiet the chattiest SDK loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The Azure SDK logs request and response headers at INFO/DEBUG; MSAL logs token events at DEBUG
    # (it masks secrets, but we keep both at WARNING so nothing depends on that masking).
    for noisy in ("azure", "msal", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ParserErrorFilter) for f in server_log.filters):
        server_log.addFilter(_ParserErrorFilter())
