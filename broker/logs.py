"""JSON logging: one object per line, the request id on every line logged while serving a request.

Callers pass context with ``extra={...}``; those fields are copied to the top level. Nothing here
knows about tokens: the rule that only fingerprints are logged is kept at each call site and checked
by the leak tests.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from typing import Any, NamedTuple

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
# Dataclasses, datetimes and str/int subclasses go through str() as with json.dumps(default=str):
# orjson would otherwise serialise a dataclass field by field (an AccessToken's token included).
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_NON_STR_KEYS
)


_AUDIT_OPTIONS = _ORJSON_OPTIONS | orjson.OPT_APPEND_NEWLINE


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds: strftime once a second, the string once a
    millisecond (busy replicas write several lines in one)."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""
        self._millisecond = -1
        self._iso = ""

    def iso(self, created: float) -> str:
        millisecond = int(created * 1000)
        if millisecond != self._millisecond:
            second, fraction = divmod(millisecond, 1000)
            if second != self._second:
                self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._millisecond, self._iso = millisecond, f"{self._stamp}.{fraction:03d}Z"
        return self._iso


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _RESERVED and not key.startswith("_")
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str, option=_ORJSON_OPTIONS).decode()


class TokenAudit(NamedTuple):
    """What the audit line of a token request says besides its time, request id and latency: who
    asked for what, through which surface, and what happened (never the token). ``tenant`` is the
    tenant's GUID when known, ``tenant_requested`` the spelling the caller sent."""

    caller: str
    surface: str
    tenant: str | None
    tenant_requested: str | None
    app: str | None
    resource: str | None
    outcome: str
    cache_layer: str | None
    token_fingerprint: str | None
    uti: str | None


class AuditLog:
    """The audit trail: one JSON line per token request, in the same shape and on the same stream as
    the ``broker.audit`` logger would write it, but without the ``logging`` machinery (record objects,
    handler locks, the formatter's attribute scan), which costs more than the rest of a cache hit.

    Always on, whatever ``log_level`` says: an audit trail that a log level can switch off is not one.
    Each line is one ``write(2)`` on stderr, as the log handler's flushed lines are, so the two
    interleave whole and in order, and a crash loses nothing that was answered.
    """

    def __init__(self, fd: int = 2) -> None:
        self._fd = fd
        self._clock = _Clock()

    def write(
        self, fields: dict[str, Any], message: str = "token request", request_id: str | None = None
    ) -> None:
        """One line: ``fields`` after the usual head, with ``request_id`` (by default the one being
        served, from the context)."""
        if request_id is None:
            request_id = request_id_var.get()
        head = {
            "time": self._clock.iso(time.time()),
            "level": "INFO",
            "logger": "broker.audit",
            "message": message,
        }
        if request_id is not None:
            head["request_id"] = request_id
        self._write_line(orjson.dumps({**head, **fields}, default=str, option=_AUDIT_OPTIONS))

    def token_request(self, said: TokenAudit, latency_ms: float, request_id: str | None) -> None:
        """The line of one token request: what ``write`` makes of ``said``'s fields with ``latency_ms``
        after ``cache_layer`` (byte for byte), built as one dict."""
        line = {
            "time": self._clock.iso(time.time()),
            "level": "INFO",
            "logger": "broker.audit",
            "message": "token request",
            "request_id": request_id,
            "caller": said.caller,
            "surface": said.surface,
            "tenant": said.tenant,
            "tenant_requested": said.tenant_requested,
            "app": said.app,
            "resource": said.resource,
            "outcome": said.outcome,
            "cache_layer": said.cache_layer,
            "latency_ms": latency_ms,
            "token_fingerprint": said.token_fingerprint,
            "uti": said.uti,
        }
        if request_id is None:
            del line["request_id"]
        self._write_line(orjson.dumps(line, default=str, option=_AUDIT_OPTIONS))

    def _write_line(self, line: bytes) -> None:
        written = os.write(self._fd, line)
        if written < len(line):  # a pipe or file full for a moment: finish the line, never interleave
            rest = memoryview(line)[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]


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
    # Record attributes the JSON lines never show: skip computing them for every record
    # (the "Optimization" table of the logging HOWTO).
    logging._srcfile = None  # noqa: SLF001 - the documented switch: no caller frame walk (findCaller)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
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
