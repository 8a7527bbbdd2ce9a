"""Caller authentication by API-key hash, and the tenant/app policy."""

from __future__ import annotations

import pytest

from broker.callers import CallerRegistry, hash_api_key, new_api_key
from broker.config import parse_settings
from broker.errors import AccessDeniedError, InvalidClientError

KEY, HASH = new_api_key()


def registry() -> CallerRegistry:
    settings = parse_settings({
        "apps": {
            "a": {"client_id": "11111111-2222-3333-4444-555555555555", "credential": {"env": "X"},
                  "resources": ["https://api.security.microsoft.com"]},
            "b": {"client_id": "11111111-2222-3333-4444-555555555556", "credential": {"env": "X"},
                  "resources": ["https://api.security.microsoft.com"]},
        },
        "callers": {"soar": {"api_key_sha256": HASH, "tenants": ["Contoso.onmicrosoft.com"],
                             "apps": ["a"]}},
    }, environ={})
    return CallerRegistry(settings)


def test_known_key_authenticates() -> None:
    """The caller whose hash matches the presented key is returned."""
    assert "soar" == registry().authenticate(f"Bearer {KEY}").name
    assert HASH == hash_api_key(KEY)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer wrong", "Bearer " + "x" * 600])
def test_bad_credentials_are_invalid_client(header: str | None) -> None:
    """Missing, malformed, unknown or oversized credentials are 401 invalid_client."""
    with pytest.raises(InvalidClientError) as info:
        registry().authenticate(header)
    assert 401 == info.value.status
    assert "WWW-Authenticate" in info.value.headers()


def test_policy_limits_tenants_and_apps() -> None:
    """A caller reaches its tenants (any case) through its apps, and nothing else."""
    caller = registry().authenticate(f"Bearer {KEY}")
    caller.check(tenant="contoso.onmicrosoft.com", app="a")
    with pytest.raises(AccessDeniedError):
        caller.check(tenant="fabrikam.onmicrosoft.com", app="a")
    with pytest.raises(AccessDeniedError):
        caller.check(tenant="contoso.onmicrosoft.com", app="b")
