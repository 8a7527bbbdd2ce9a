"""Configuration of app credentials with no secret: the three new shapes load, and every mistake in
them names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import parse_settings
from broker.entra import ASSERTION_CODES, EntraFailure, classify
from broker.errors import ConfigError, CredentialRejectedError

CLIENT_ID = "11111111-2222-3333-4444-555555555555"


def config(credential: Any, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "apps": {
            "defender": {
                "client_id": CLIENT_ID,
                "credential": credential,
                "resources": ["https://api.security.microsoft.com"],
            }
        },
        "callers": {"soar": {"api_key_sha256": "a" * 64, "tenants": ["*"], "apps": ["defender"]}},
    }
    raw.update(overrides)
    return raw


def error_for(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, environ={})
    return str(info.value)


def test_the_three_sources_load(tmp_path: Path) -> None:
    """managed_identity, a token file and a Key Vault key: each is an assertion source, names no
    secret, and only the last needs Key Vault."""
    token = tmp_path / "token"
    token.write_text("x", encoding="utf-8")
    vault = {"key_vault_url": "https://contoso.vault.azure.net"}
    sources = [
        (config({"federated": "managed_identity"}), "federated:managed_identity"),
        (config({"federated": {"token_file": str(token)}}), f"federated:token_file:{token}"),
        (config({"key_vault_key": {"certificate": "app-cert"}}, **vault), "key_vault_key:app-cert"),
    ]
    for raw, label in sources:
        credential = parse_settings(raw, environ={}).apps["defender"].credential
        assert (True, label) == (credential.is_assertion, credential.describe())
    assert parse_settings(sources[2][0], environ={}).apps["defender"].credential.uses_key_vault


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            config({"federated": "workload_identity"}),
            "apps.defender.credential.federated: must be managed_identity",
        ),
        (config({"federated": {}}), "apps.defender.credential.federated: must be managed_identity"),
        (config({"federated": {"token_fil": "/x"}}), "did you mean 'token_file'"),
        (
            config({"federated": {"token_file": "/no/such/token"}}),
            "apps.defender.credential.federated.token_file: file /no/such/token does not exist",
        ),
        (
            config({"key_vault_key": {"certificate": "c"}}),
            "key_vault_url: required by apps.defender.credential",
        ),
        (config({"key_vault_key": "c"}), "apps.defender.credential.key_vault_key"),
        (
            config({"federated": "managed_identity", "secret": "s"}),
            "give exactly one of secret, certificate, env, file, federated, key_vault_key",
        ),
        (
            config(
                {"env": "X"},
                redis_url="redis://r:6379/0",
                cache_encryption_key={"federated": "managed_identity"},
            ),
            "cache_encryption_key.federated: only an app credential can be federated or Key Vault-signed",
        ),
    ],
)
def test_mistakes_name_the_key(raw: dict[str, Any], expected: str) -> None:
    """A wrong shape, a missing token file, a Key Vault key without a vault, an assertion where a
    key is read: each is reported with the key to fix."""
    assert expected in error_for(raw)


@pytest.mark.parametrize("code", sorted(ASSERTION_CODES))
def test_assertion_refusals_are_credential_errors(code: int) -> None:
    """Entra's refusals of a federated or signed assertion are app-wide credential errors (reload
    once, then 502), described in words an operator can act on."""
    error = classify(EntraFailure("invalid_client", code), tenant="t", consent_link="https://x")
    assert isinstance(error, CredentialRejectedError)
    assert (502, f"AADSTS{code}") == (error.status, error.aadsts)
    assert ASSERTION_CODES[code] in error.description
