"""broker.client without a broker: scope rules, argument checks, token-file rotation, error fields,
and that neither reprs nor errors show the caller's key (end to end: functional/test_client_flow.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests
from aiohttp import web
from azure.core.credentials import SupportsTokenInfo, TokenCredential
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from broker.client import (
    AsyncBrokerCredential,
    BrokerAuthenticationError,
    BrokerCredential,
    TokenFile,
    app_scope,
)
from tests.support import free_port, serve_in_thread

DEFENDER = "https://api.security.microsoft.com"
KEY = "tbk_unit-test-key-that-must-never-be-shown"


def test_credentials_implement_azure_core_protocols() -> None:
    """Both credentials, and their tenant views, satisfy azure-core's runtime-checkable protocols
    (so BearerTokenCredentialPolicy uses get_token_info and its refresh_on)."""
    sync = BrokerCredential("http://127.0.0.1:8080", api_key=KEY)
    asynchronous = AsyncBrokerCredential("http://127.0.0.1:8080", api_key=KEY)
    for credential in (sync, sync.for_tenant("contoso.onmicrosoft.com")):
        assert isinstance(credential, TokenCredential)
        assert isinstance(credential, SupportsTokenInfo)
    for async_credential in (asynchronous, asynchronous.for_tenant("contoso.onmicrosoft.com")):
        assert isinstance(async_credential, AsyncTokenCredential)
        assert isinstance(async_credential, AsyncSupportsTokenInfo)
    sync.close()


def test_app_scope_is_one_resource_with_default_suffix() -> None:
    """A `/.default` scope is kept, a bare resource (with or without a trailing slash) gains the suffix."""
    for given in (f"{DEFENDER}/.default", DEFENDER, f"{DEFENDER}/"):
        assert f"{DEFENDER}/.default" == app_scope(given)


@pytest.mark.parametrize(
    "scopes",
    [(), (f"{DEFENDER}/.default", "https://graph.microsoft.com/.default"), ("User.Read",), ("openid",)],
)
def test_app_scope_refuses_what_the_broker_cannot_issue(scopes: tuple[str, ...]) -> None:
    """No scope, several scopes, or a delegated scope is a ValueError."""
    with pytest.raises(ValueError, match=r"scope|resource"):
        app_scope(*scopes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"api_key": KEY, "token_file": "token"},
        {"api_key": "  "},
        {"api_key": KEY, "min_ttl": 3001},
        {"api_key": KEY, "refresh_margin_seconds": -1},
    ],
)
def test_constructor_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    """Exactly one caller credential, and min_ttl / refresh margin in range."""
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        BrokerCredential("http://127.0.0.1:8080", **kwargs)  # type: ignore[arg-type]


def test_a_tenant_is_required_before_anything_is_sent() -> None:
    """Without tenant_id, default_tenant_id or for_tenant(), get_token is a ValueError (no request:
    the broker URL points nowhere, which would be a ClientAuthenticationError)."""
    with (
        BrokerCredential(f"http://127.0.0.1:{free_port()}", api_key=KEY) as credential,
        pytest.raises(ValueError, match="no tenant"),
    ):
        credential.get_token(f"{DEFENDER}/.default")


def test_token_file_follows_a_kubelet_style_rotation(tmp_path: Path) -> None:
    """Token -> ..data/token, ..data -> a timestamped directory: swapping ..data (what kubelet does)
    is seen on the next read, and so is an in-place rewrite."""
    first = tmp_path / "..2025_01_01"
    first.mkdir()
    (first / "token").write_text("first-token\n")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "token").symlink_to("..data/token")
    token_file = TokenFile(tmp_path / "token")
    assert "first-token" == token_file.read()

    second = tmp_path / "..2025_01_02"
    second.mkdir()
    (second / "token").write_text("second-token\n")
    (tmp_path / "..data_tmp").symlink_to(second.name)
    (tmp_path / "..data_tmp").replace(tmp_path / "..data")
    assert "second-token" == token_file.read()

    (second / "token").write_text("third-token, longer\n")
    assert "third-token, longer" == token_file.read()


def test_token_file_is_not_reread_while_its_stat_is_unchanged(tmp_path: Path) -> None:
    """Same inode, size and mtime: the remembered value is served (one stat per call, no read)."""
    path = tmp_path / "token"
    path.write_text("aaaa")
    token_file = TokenFile(path)
    assert "aaaa" == token_file.read()
    before = path.stat()
    path.write_text("bbbb")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "aaaa" == token_file.read()


def test_token_file_missing_or_empty_is_an_authentication_error(tmp_path: Path) -> None:
    """An unreadable file is a chained ClientAuthenticationError naming the path; an empty one too."""
    missing = TokenFile(tmp_path / "absent")
    with pytest.raises(ClientAuthenticationError, match="absent") as raised:
        missing.read()
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClientAuthenticationError, match="empty"):
        TokenFile(tmp_path / "empty").read()


def test_broker_error_carries_the_brokers_fields() -> None:
    """error, error_description, status_code and body are attributes; the message names the error,
    its description, the consent link and the request id."""
    body = {
        "error": "consent_required",
        "error_description": "the app is not consented in this tenant",
        "request_id": "r-1",
        "consent_url": "https://login.example/adminconsent",
    }
    exc = BrokerAuthenticationError(403, body)
    assert isinstance(exc, ClientAuthenticationError)
    assert ("consent_required", "the app is not consented in this tenant", 403, body) == (
        exc.error,
        exc.error_description,
        exc.status_code,
        exc.body,
    )
    for part in ("consent_required", "not consented", "https://login.example/adminconsent", "r-1", "403"):
        assert part in str(exc)


def test_repr_and_transport_errors_never_show_the_key() -> None:
    """The repr says how the caller authenticates, never the key; an unreachable broker is a
    ClientAuthenticationError chained to the requests error, without the key."""
    credential = BrokerCredential(f"http://127.0.0.1:{free_port()}", api_key=KEY, timeout=2)
    view = credential.for_tenant("contoso.onmicrosoft.com")
    assert KEY not in repr(credential)
    assert "api_key=<hidden>" in repr(view)
    assert "'contoso.onmicrosoft.com'" in repr(view)
    with pytest.raises(ClientAuthenticationError, match="unreachable") as raised:
        view.get_token(DEFENDER)
    assert isinstance(raised.value.__cause__, requests.ConnectionError)
    assert KEY not in str(raised.value)
    credential.close()


async def test_async_transport_error_is_an_authentication_error() -> None:
    """The asyncio credential turns a refused connection into a chained ClientAuthenticationError."""
    async with AsyncBrokerCredential(f"http://127.0.0.1:{free_port()}", api_key=KEY, timeout=2) as credential:
        with pytest.raises(ClientAuthenticationError, match="unreachable") as raised:
            await credential.get_token(DEFENDER, tenant_id="contoso.onmicrosoft.com")
    assert raised.value.__cause__ is not None
    assert KEY not in str(raised.value) + repr(credential)


def test_expires_on_is_the_brokers_not_recomputed_at_receipt() -> None:
    """The token's expires_on is the one the broker sent, whatever expires_in says: deriving it from
    expires_in at receipt gave one cached token two expiries across a second boundary (a flaky CI)."""
    expires_on = 4_102_444_800  # far beyond now + expires_in

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t0k", "expires_on": expires_on, "expires_in": 3599})

    app = web.Application()
    app.router.add_post("/v1/token", token)
    port = free_port()
    with (
        serve_in_thread(app, port),
        BrokerCredential(
            f"http://127.0.0.1:{port}", api_key=KEY, default_tenant_id="contoso.onmicrosoft.com"
        ) as credential,
    ):
        first = credential.get_token(f"{DEFENDER}/.default")
    assert expires_on == first.expires_on
