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
            "callers: 'soar\\n' is not a valid name",
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
