"""The Redis settings: each mode's configuration derives the client options, and every combination
that cannot work is refused at start, naming the key and never quoting a password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import parse_settings
from tests.test_config import error_for, minimal

KEY = {"env": "K"}


def redis(**overrides: Any) -> dict[str, Any]:
    return minimal(cache_encryption_key=KEY, **overrides)


def test_each_mode_derives_its_client_options(tmp_path: Path) -> None:
    """Cluster, Sentinel (addresses parsed), TLS files, a password file and Entra ID reach RedisOptions;
    the connect timeout is separate from the command timeout."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", encoding="ascii")
    password = tmp_path / "password"
    password.write_text("s3cret\n", encoding="utf-8")
    raw = redis(redis_url="rediss://cache:10000", redis_mode="cluster", redis_auth="entra")
    cluster = parse_settings(raw, {})
    options = cluster.redis_options()
    assert options is not None
    assert ("cluster", True, 2.0, 0.5) == (
        options.mode,
        options.entra,
        options.connect_timeout_seconds,
        options.timeout_seconds,
    )
    sentinel = parse_settings(
        redis(
            redis_url="rediss://mymaster/0",
            redis_mode="sentinel",
            redis_sentinels=["s0:26379", "[::1]:26380"],
            redis_sentinel_service="mymaster",
            redis_username="broker",
            redis_password={"file": str(password)},
            redis_ca_file=str(ca),
            redis_connect_timeout_seconds=5,
        ),
        {},
    ).redis_options()
    assert sentinel is not None
    assert (("s0", 26379), ("::1", 26380)) == sentinel.sentinels
    assert ("mymaster", "broker", password, ca, 5.0) == (
        sentinel.sentinel_service,
        sentinel.username,
        sentinel.password_file,
        sentinel.ca_file,
        sentinel.connect_timeout_seconds,
    )
    assert "s3cret" not in repr(sentinel)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"redis_mode": "sentinel"}, "redis_sentinels: required when redis_mode is sentinel"),
        ({"redis_mode": "sentinel", "redis_sentinels": ["s:26379"]}, "redis_sentinel_service: required"),
        ({"redis_sentinels": ["s:26379"]}, "redis_sentinels: only used when redis_mode is sentinel"),
        ({"redis_mode": "sentinel", "redis_sentinels": ["x"], "redis_sentinel_service": "m"}, "host:port"),
        ({"redis_mode": "cluster", "redis_url": "redis://c:6379/3"}, "Redis Cluster has database 0 only"),
        ({"redis_mode": "cluster", "redis_url": "unix:///r.sock"}, "a unix socket cannot reach a cluster"),
        ({"redis_ca_file": "/ca.pem"}, "redis_ca_file: needs a rediss:// redis_url (TLS)"),
        ({"redis_url": "rediss://c", "redis_client_cert_file": "/c.pem"}, "give redis_client_cert_file and"),
        ({"redis_auth": "entra", "redis_url": "rediss://:pw@c:6380"}, "entra authenticates with tokens"),
        ({"redis_password": {"env": "P"}, "redis_url": "rediss://:pw@c"}, "redis_url holds a password too"),
        ({"redis_password": {"secret": "p"}}, "redis_password: give {env: VAR} or {file: PATH}"),
        ({"redis_password": {"env": "P"}, "redis_url": "rediss://u@c"}, "ACL user in redis_username"),
        ({"redis_username": "broker"}, "redis_username: used with redis_password or redis_auth: entra"),
        ({"redis_mode": "bogus"}, "redis_mode: Input should be 'standalone', 'cluster' or 'sentinel'"),
        ({"redis_connect_timeout_seconds": 0}, "redis_connect_timeout_seconds: Input should be greater"),
    ],
)
def test_impossible_redis_settings_are_named(overrides: dict[str, Any], expected: str) -> None:
    """Each combination that cannot work is a config error naming its key (exit 2 at start)."""
    raw = redis(redis_url="redis://cache:6379/0")
    raw.update(overrides)
    assert expected in error_for(raw)


def test_redis_settings_without_redis_url_are_named() -> None:
    """A Redis mode or credential without redis_url is a mistake, not silently ignored."""
    message = error_for(minimal(redis_mode="cluster", redis_username="broker"))
    assert "redis_mode: needs redis_url" in message
    assert "redis_username: needs redis_url" in message


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    """The CA and client certificate files must exist (and the CA be PEM) at start; no password is quoted."""
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82")
    raw = redis(
        redis_url="rediss://:hunter2@cache:6380/0",
        redis_ca_file=str(not_pem),
        redis_client_cert_file=str(tmp_path / "missing.pem"),
        redis_client_key_file=str(tmp_path / "missing-key.pem"),
    )
    message = error_for(raw)
    assert "redis_ca_file:" in message
    assert f"redis_client_cert_file: file {tmp_path / 'missing.pem'} does not exist" in message
    assert "redis_client_key_file: file" in message
    assert "hunter2" not in message
