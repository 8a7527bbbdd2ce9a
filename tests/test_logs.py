"""JSON log lines and the audit trail: one parseable object per line, context at the top level, the
request id on every line of a request, and no token even when a token object is logged."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.logs import AuditLog, JsonFormatter, TokenAudit, _ParserErrorFilter, request_id_var
from broker.tokens import AccessToken, fingerprint

SECRET_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJ0aWQiOiJ0In0.c2lnbmF0dXJl"
TOKEN = AccessToken(
    token=SECRET_TOKEN,
    expires_on=2_000_000_000.0,
    tenant_id="t",
    resource="https://r",
    fingerprint=fingerprint(SECRET_TOKEN),
)


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through ``JsonFormatter`` into a buffer (the root logger is left alone)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("broker.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_context_at_top_level(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    """A record is one JSON line: time, level, logger, message, and each ``extra`` field."""
    logger, stream = json_log
    logger.info("token acquired for %s", "tenant-a", extra={"app": "defender", "expires_in": 3599})
    logger.warning("second line")
    first, second = lines(stream)
    assert {"level", "logger", "message", "time", "app", "expires_in"} == set(first)
    assert ("INFO", "broker.test-logs", "token acquired for tenant-a") == (
        first["level"],
        first["logger"],
        first["message"],
    )
    assert ("defender", 3599) == (first["app"], first["expires_in"])
    assert first["time"].endswith("Z")
    assert "WARNING" == second["level"]


def test_request_id_is_on_every_line_of_a_request(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    """While a request id is set, each line carries it; outside a request, none does."""
    logger, stream = json_log
    reset = request_id_var.set("req-123")
    try:
        logger.info("inside")
    finally:
        request_id_var.reset(reset)
    logger.info("outside")
    inside, outside = lines(stream)
    assert "req-123" == inside["request_id"]
    assert "request_id" not in outside


def test_a_logged_token_object_shows_no_token(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    """An AccessToken passed as context (by mistake) is rendered by its repr, which hides the token;
    an exception's traceback is kept as text."""
    logger, stream = json_log
    error = ValueError("boom")
    logger.error("failed", exc_info=(ValueError, error, None), extra={"token": TOKEN})
    text = stream.getvalue()
    assert SECRET_TOKEN not in text
    (line,) = lines(stream)
    assert TOKEN.fingerprint in line["token"]
    assert "ValueError: boom" in line["exception"]


def test_audit_line_is_one_json_line_per_write_and_hides_tokens(tmp_path: Path) -> None:
    """Each audit write is one newline-terminated JSON object from ``broker.audit`` with the given
    fields and the request id; a token object among the fields is not revealed."""
    path = tmp_path / "audit.log"
    with path.open("wb") as sink:
        audit = AuditLog(sink.fileno())
        reset = request_id_var.set("req-9")
        try:
            audit.write({"caller": "soar", "outcome": "ok", "cache_layer": "l1", "token": TOKEN})
        finally:
            request_id_var.reset(reset)
        audit.write({"caller": "soar", "outcome": "access_denied"})
    raw = path.read_text(encoding="utf-8")
    assert SECRET_TOKEN not in raw
    assert raw.endswith("\n")
    first, second = (json.loads(line) for line in raw.splitlines())
    assert ("broker.audit", "token request", "INFO", "req-9") == (
        first["logger"],
        first["message"],
        first["level"],
        first["request_id"],
    )
    assert ("soar", "ok", "l1") == (first["caller"], first["outcome"], first["cache_layer"])
    assert "access_denied" == second["outcome"]
    assert "request_id" not in second


_TIME = re.compile(rb'^\{"time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",')


def _audit_lines(path: Path) -> list[bytes]:
    """The file's lines with their (valid) timestamps blanked, so lines written apart compare."""
    lines = path.read_bytes().splitlines(keepends=True)
    assert all(_TIME.match(line) for line in lines)
    return [_TIME.sub(b'{"time":"-",', line) for line in lines]


SAID = [
    TokenAudit("soar", "v1", "t-guid", "Contoso.COM", "defender", "https://r", "ok", "l1", "fp", "uti"),
    TokenAudit("soar", "v1", "t-guid", "t-guid", "defender", "https://r", "ok", "redis", "fp", None),
    TokenAudit(
        'we"ird\\ caller \u00e9\u2028',
        "oauth-v2",
        None,
        "x.example",
        None,
        "https://r",
        "access_denied",
        None,
        None,
        None,
    ),
    TokenAudit("-", "managed-identity", None, None, None, None, "invalid_client", None, None, None),
]


@pytest.mark.parametrize("request_id", [None, "req-9"])
def test_a_token_request_line_is_byte_for_byte_the_generic_line(
    tmp_path: Path, request_id: str | None
) -> None:
    """``token_request`` writes exactly what ``write`` writes for the same fields with ``latency_ms``
    after ``cache_layer``: same keys, order, escaping and newline."""
    fast, generic = tmp_path / "fast.log", tmp_path / "generic.log"
    with fast.open("wb") as fast_sink, generic.open("wb") as generic_sink:
        audit, reference = AuditLog(fast_sink.fileno()), AuditLog(generic_sink.fileno())
        for latency in (0.0, 0.123, 12.5, 30000.001):
            for said in SAID:
                audit.token_request(said, latency, request_id)
                fields = said._asdict()
                ordered = (
                    dict(list(fields.items())[:8]) | {"latency_ms": latency} | dict(list(fields.items())[8:])
                )
                reference.write(ordered, request_id=request_id)
    assert _audit_lines(fast) == _audit_lines(generic)
    assert len(_audit_lines(fast)) == 16


def test_malformed_request_log_keeps_only_the_exception_class() -> None:
    """Aiohttp's log of a malformed request quotes the offending bytes (maybe an Authorization
    header): the filter rewrites it to one WARNING line naming the exception class only."""
    exc = ValueError("Bad header: Authorization: Bearer tbk_secretcallerkey")
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", None, (ValueError, exc, None)
    )
    assert _ParserErrorFilter().filter(record)
    assert ("WARNING", "rejected a malformed HTTP request: ValueError") == (
        record.levelname,
        record.getMessage(),
    )
    assert record.exc_info is None
    assert "tbk_secretcallerkey" not in JsonFormatter().format(record)
