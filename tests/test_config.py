"""Configuration loading: valid files load, and every mistake names the key at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import is_tenant, load_settings, parse_settings
from broker.errors import ConfigError

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
HASH = "a" * 64
ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - a setting under test; nothing binds it here


def minimal(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "apps": {
            "defender": {
                "client_id": CLIENT_ID,
                "credential": {"env": "X"},
                "resources": ["https://api.security.microsoft.com/"],
            }
        },
        "callers": {"soar": {"api_key_sha256": HASH, "tenants": ["*"], "apps": ["defender"]}},
    }
    raw.update(overrides)
    return raw


def error_for(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, environ={})
    return str(info.value)


def test_minimal_config_loads_with_defaults() -> None:
    """A file with only apps and callers is complete; resources are normalised."""
    settings = parse_settings(minimal(), environ={})
    assert ["https://api.security.microsoft.com"] == settings.apps["defender"].resources
    assert settings.redis_url is None
    assert "https://login.microsoftonline.com" == settings.authority_host


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["apps"]["defender"].update(client_id="nope"), "apps.defender.client_id"),
        (lambda r: r["apps"]["defender"].update(colour="red"), "apps.defender.colour: unknown key"),
        (lambda r: r["apps"]["defender"].update(credential={}), "apps.defender.credential"),
        (
            lambda r: r["apps"]["defender"].update(credential={"env": "A", "file": "/b"}),
            "apps.defender.credential",
        ),
        (lambda r: r["callers"]["soar"].update(api_key_sha256="xyz"), "callers.soar.api_key_sha256"),
        (lambda r: r["callers"]["soar"].update(apps=["ghost"]), "callers.soar.apps: unknown app 'ghost'"),
        (lambda r: r["callers"]["soar"].update(tenants=["not a tenant"]), "callers.soar.tenants"),
        (lambda r: r.update(redis_url="redis://x:6379"), "cache_encryption_key: required"),
        (lambda r: r.update(authority_host="http://login.example"), "authority_host: must be an https://"),
        (lambda r: r.update(listen={"port": 70000}), "listen.port"),
        (lambda r: r.update(surprise=1), "surprise: unknown key"),
        (lambda r: r["apps"]["defender"].update(credential={"secret": "s"}), "key_vault_url: required"),
    ],
)
def test_errors_name_the_key(mutate: Any, expected: str) -> None:
    """Each invalid setting is reported with its dotted path."""
    raw = minimal()
    mutate(raw)
    assert expected in error_for(raw)


def test_env_overrides_top_level_scalars() -> None:
    """BROKER_REDIS_URL replaces redis_url (a password can then come from a Secret)."""
    raw = minimal(cache_encryption_key={"env": "K"})
    settings = parse_settings(raw, environ={"BROKER_REDIS_URL": "rediss://:pw@cache:6380/0"})
    assert "rediss://:pw@cache:6380/0" == settings.redis_url


def test_load_settings_reports_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    """Unreadable or non-mapping files are config errors, not tracebacks."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(bad, environ={})
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(minimal()))
    assert "defender" in load_settings(good, environ={}).apps


def test_embedded_defaults_need_client_id_and_caller_hash() -> None:
    """Without a file, the defaults are built from BROKER_CLIENT_ID and BROKER_CALLER_KEY_SHA256."""
    with pytest.raises(ConfigError, match=r"apps\.default\.client_id"):
        load_settings(None, environ={})
    settings = load_settings(None, environ={"BROKER_CLIENT_ID": CLIENT_ID, "BROKER_CALLER_KEY_SHA256": HASH})
    assert CLIENT_ID == settings.apps["default"].client_id
    assert "env" == settings.apps["default"].credential.kind


@pytest.mark.parametrize(
    "value",
    [
        "contoso.onmicrosoft.com\n",
        "11111111-2222-3333-4444-555555555555\n",
        "contoso.onmicrosoft.com\nevil.example.com",
        "\ncontoso.onmicrosoft.com",
    ],
)
def test_is_tenant_refuses_a_trailing_newline(value: str) -> None:
    """`$` also matches before a final newline; a tenant is the whole string or nothing, so a GUID or
    domain followed by a newline is no tenant (it would become a second cache key and a log line)."""
    assert (False, True) == (is_tenant(value), is_tenant(value.strip().split("\n")[0]))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["apps"]["defender"].update(client_id=CLIENT_ID + "\n"), "apps.defender.client_id"),
        (lambda r: r["callers"]["soar"].update(api_key_sha256=HASH + "\n"), "callers.soar.api_key_sha256"),
        (lambda r: r["callers"]["soar"].update(tenants=["contoso.com\n"]), "callers.soar.tenants"),
        (
            lambda r: r["callers"].update({"soar\n": r["callers"].pop("soar")}),
            "callers: not a valid name: 'soar\\n'",
        ),
        (
            lambda r: r["callers"]["soar"].update(
                api_key_sha256=None, service_account="system:serviceaccount:ns:name\n"
            ),
            "callers.soar.service_account",
        ),
        (lambda r: r.update(authority_host="https://login.example\n"), "authority_host"),
        (lambda r: r.update(key_vault_url="https://kv.vault.azure.net\n"), "key_vault_url"),
        (
            lambda r: r.update(service_account_auth={"issuer": "https://issuer.example\n"}),
            "service_account_auth.issuer",
        ),
    ],
)
def test_patterns_match_the_whole_value(mutate: Any, expected: str) -> None:
    """Every pattern-checked setting (GUID, hash, tenant, name, service account, URL) refuses a value
    with a trailing newline, naming the key: patterns are full matches, not `^...$`."""
    raw = minimal()
    mutate(raw)
    assert expected in error_for(raw)


def test_every_problem_is_reported_at_once_with_did_you_mean() -> None:
    """One ConfigError lists every problem: misspelt keys at any depth (each with the closest key the
    model has there), field errors, and every cross-field problem, even alongside field errors."""
    raw = minimal(log_levle="DEBUG", listen={"prot": 8080}, redis_url="redis://cache:6379/0")
    raw["apps"]["defender"]["credential"] = {"secert": "defender-app-secret"}
    raw["callers"]["soar"]["apps"] = ["defnder"]
    raw["callers"]["copy"] = {"api_key_sha256": HASH.upper(), "tenants": ["*"], "apps": ["defender"]}
    raw["service_account_auth"] = {"issuer": "https://issuer.example", "jwks_flie": "/x"}
    message = error_for(raw)
    expected = [
        "log_levle: unknown key (did you mean 'log_level'?)",
        "listen.prot: unknown key (did you mean 'port'?)",
        "apps.defender.credential.secert: unknown key (did you mean 'secret'?)",
        "service_account_auth.jwks_flie: unknown key (did you mean 'jwks_file'?)",
        "callers.soar.apps: unknown app 'defnder' (did you mean 'defender'?)",
        "cache_encryption_key: required when redis_url is set",
        "callers: soar and copy share one api_key_sha256",
    ]
    assert [] == [line for line in expected if line not in message]
    assert message.startswith(f"{len(expected)} problems in the configuration:\n")


def test_files_the_config_names_must_exist(tmp_path: Path) -> None:
    """outbound_ca_file, {file: PATH} credential sources and service_account_auth.jwks_file must name
    existing, readable files; each missing one is named by its key (all at once). Static checks (e.g.
    of a rendered Helm chart, whose files exist only in the pod) can skip the file checks."""
    present = tmp_path / "present.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n")
    raw = minimal(
        outbound_ca_file=str(tmp_path / "absent-ca.pem"),
        cache_encryption_key={"file": str(tmp_path)},  # a directory
        service_account_auth={"issuer": "https://issuer.example", "jwks_file": str(tmp_path / "jwks.json")},
    )
    raw["apps"]["defender"]["credential"] = {"file": str(tmp_path / "absent-secret")}
    message = error_for(raw)
    expected = [
        f"outbound_ca_file: file {tmp_path / 'absent-ca.pem'} does not exist",
        f"apps.defender.credential.file: file {tmp_path / 'absent-secret'} does not exist",
        f"cache_encryption_key.file: {tmp_path} is not a file",
        f"service_account_auth.jwks_file: file {tmp_path / 'jwks.json'} does not exist",
    ]
    assert [] == [line for line in expected if line not in message]
    assert "defender" in parse_settings(raw, environ={}, check_files=False).apps
    raw.update(outbound_ca_file=str(present), cache_encryption_key={"file": str(present)})
    raw["apps"]["defender"]["credential"] = {"file": str(present)}
    raw["service_account_auth"]["jwks_file"] = str(present)
    assert present == parse_settings(raw, environ={}).outbound_ca_file


# (URL, the parts of it that must never be echoed, whether the advice to percent-encode applies)
BAD_REDIS_URLS = [
    pytest.param("redis://:pa/ss-w0rd@cache:6379/0", ["pa/ss", "ss-w0rd"], True, id="slash-in-password"),
    pytest.param("redis://:1234/hunter2@cache:6379/0", ["1234", "hunter2"], True, id="slash-digits-password"),
    pytest.param("redis://:pa55?w0rd@cache:6379/0", ["pa55", "w0rd"], True, id="question-mark-in-password"),
    pytest.param("rediss://:pa55#w0rd@cache:6380/0", ["pa55", "w0rd"], True, id="hash-in-password"),
    pytest.param("redis://user:s3cret@cache:p0rt/0", ["s3cret", "p0rt"], True, id="port-not-a-number"),
    pytest.param("redis://user:s3cret@cache:70000/0", ["s3cret", "70000"], True, id="port-out-of-range"),
    pytest.param("redis://user:s3cret@cache:6379/zero", ["s3cret", "zero"], True, id="db-not-a-number"),
    pytest.param("http://user:s3cret@cache:6379/0", ["s3cret"], False, id="wrong-scheme"),
    pytest.param("redis://:s3cret@cache/0?socket_timeout=soon", ["s3cret", "soon"], False, id="bad-query"),
    pytest.param("redis://:s3cret@cache:6379/0\n", ["s3cret"], False, id="trailing-newline"),
    pytest.param("unix://", [], False, id="unix-without-path"),
]


@pytest.mark.parametrize(("url", "secret_parts", "advice"), BAD_REDIS_URLS)
def test_unparsable_redis_url_is_named_but_never_echoed(
    url: str, secret_parts: list[str], advice: bool
) -> None:
    """A redis_url redis-py would refuse or misread (a raw '/', '?' or '#' in the password moves the rest
    into the path, query or fragment) is a config error naming redis_url (and advising to percent-encode
    the password where that is the likely cause); the message quotes no part of the URL, whether it came
    from the file or from BROKER_REDIS_URL."""
    for raw, environ in [
        (minimal(redis_url=url, cache_encryption_key={"env": "K"}), {}),
        (minimal(cache_encryption_key={"env": "K"}), {"BROKER_REDIS_URL": url}),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_settings(raw, environ=environ)
        message = str(info.value)
        assert message.startswith("redis_url: ")
        assert [] == [part for part in [url.strip(), *secret_parts] if part in message]
        assert advice == ("percent-encode the password" in message)
    assert "BROKER_REDIS_URL" in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://cache",
        "redis://cache:6379",
        "redis://cache:6379/",
        "rediss://:p%2Fss%3Fw%23rd@cache.redis.cache.windows.net:6380/0",
        "rediss://user:pw@[::1]:6380/2?socket_timeout=1.5&health_check_interval=10",
        "unix:///run/redis/redis.sock?db=1",
    ],
)
def test_parsable_redis_urls_are_accepted(url: str) -> None:
    """Percent-encoded passwords, IPv6 hosts, TLS, query options and unix sockets are all accepted."""
    raw = minimal(redis_url=url, cache_encryption_key={"env": "K"})
    assert url == parse_settings(raw, environ={}).redis_url


def test_yaml_errors_do_not_echo_the_offending_line(tmp_path: Path) -> None:
    """A YAML syntax error names the line and column but does not quote the line (it may hold a Redis
    password)."""
    path = tmp_path / "broker.yaml"
    path.write_text("apps: {}\nredis_url: redis://:s3cret@cache:6379/0: [\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "line 2" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_env_overrides_listen_and_metrics_addresses() -> None:
    """BROKER_LISTEN_HOST/PORT and BROKER_METRICS_HOST/PORT set the listeners whatever the file says (a
    Helm chart mounting a user's whole config from a Secret still binds where its probes look); the
    rest of a listen/metrics section in the file is kept, and a bad value is named with its variable."""
    environ = {
        "BROKER_LISTEN_HOST": ANY_ADDRESS,
        "BROKER_LISTEN_PORT": "8443",
        "BROKER_METRICS_HOST": ANY_ADDRESS,
        "BROKER_METRICS_PORT": "9443",
    }
    settings = parse_settings(minimal(), environ=environ)
    assert (ANY_ADDRESS, 8443, ANY_ADDRESS, 9443) == (
        settings.listen.host,
        settings.listen.port,
        settings.metrics.host,
        settings.metrics.port,
    )
    kept = parse_settings(minimal(listen={"host": "10.0.0.1", "port": 8081}), {"BROKER_LISTEN_PORT": "8082"})
    assert ("10.0.0.1", 8082) == (kept.listen.host, kept.listen.port)
    with pytest.raises(ConfigError) as info:
        parse_settings(minimal(), environ={"BROKER_LISTEN_PORT": "http"})
    assert str(info.value).startswith("listen.port: ")
    assert str(info.value).endswith("(set by BROKER_LISTEN_PORT)")


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A configuration file that is not UTF-8 text is a ConfigError naming the file (exit 2), not a
    UnicodeDecodeError traceback."""
    path = tmp_path / "broker.yaml"
    path.write_bytes(b"log_level: INFO\nredis_url: redis://:\xff\xfe@cache:6379/0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert f"{path}: not UTF-8 text" == str(info.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not a certificate\n", "holds no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\n\xff\xfe\n-----END CERTIFICATE-----\n", "is not ASCII PEM text"),
    ],
)
def test_outbound_ca_file_must_hold_a_pem_certificate(tmp_path: Path, content: bytes, problem: str) -> None:
    """outbound_ca_file is read into the outbound CA bundle at start: a file that is not ASCII PEM
    holding a certificate is a config error naming the key, not a crash of `serve`."""
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    assert f"outbound_ca_file: {path} {problem}" == error_for(minimal(outbound_ca_file=str(path)))
