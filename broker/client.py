"""The Python client of token-broker: azure-core credentials that get tokens from ``POST /v1/token``.

:class:`BrokerCredential` (threads, requests) and :class:`AsyncBrokerCredential` (asyncio, aiohttp)
implement azure-core's ``TokenCredential`` / ``SupportsTokenInfo`` and their async twins, so any Azure
SDK client or ``BearerTokenCredentialPolicy`` can use them to call a customer tenant's API with the
broker's app-only tokens.

- The caller proves who it is with an API key (``api_key=``) or a Kubernetes service-account token
  file (``token_file=``), re-read whenever the file changes (kubelet rotates projected tokens by
  swapping a symlink), so a rotated token is used at once.
- Tokens are cached per (tenant, scope, app) and reused until less than
  ``max(refresh_margin_seconds, min_ttl)`` remains; concurrent requests for one key share one broker
  request and its outcome (a future per key in threads, a task per key in asyncio).
- ``for_tenant(tenant)`` is a view bound to one tenant, sharing its parent's connection and cache: what
  a policy needs, since policies call ``get_token(scope)`` without naming a tenant.
- A broker error is a :class:`BrokerAuthenticationError` (an azure-core ``ClientAuthenticationError``)
  carrying the broker's ``error``, ``error_description``, HTTP status and JSON body; an unreachable
  broker or a malformed answer is a plain ``ClientAuthenticationError`` chained to its cause. Neither
  the caller's credential nor a token ever appears in a message or a repr.

Callers import this module without the server: it needs only the standard library, azure-core,
requests and aiohttp.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import aiohttp
import requests
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import ClientAuthenticationError

from broker import __version__

__all__ = [
    "AsyncBrokerCredential",
    "BrokerAuthenticationError",
    "BrokerCredential",
    "TokenFile",
    "app_scope",
]

DEFAULT_MIN_TTL_SECONDS = 300
MAX_MIN_TTL = 3000  # seconds, as the broker accepts
DEFAULT_REFRESH_MARGIN_SECONDS = 300
DEFAULT_TIMEOUT_SECONDS = 10.0
_USER_AGENT = f"token-broker-client/{__version__}"
_DEFAULT_SUFFIX = "/.default"


class BrokerAuthenticationError(ClientAuthenticationError):
    """The broker refused a token request.

    ``error`` is the broker's code (``consent_required``, ``invalid_client``, ...), ``error_description``
    its explanation, ``status_code`` the HTTP status and ``body`` the whole JSON error object (with
    ``request_id`` and, where they apply, ``consent_url``, ``missing_roles``, ``retry_after``).
    """

    # HttpResponseError declares `error` as a parsed OData error; a broker error is an OAuth-style code.
    error: str  # type: ignore[assignment]

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        error = str(body.get("error") or "unexpected_response")
        description = str(body.get("error_description") or f"HTTP {status_code} without a broker error body")
        message = f"token broker refused the request: {error} (HTTP {status_code}): {description}"
        if body.get("consent_url"):
            message += f"; admin consent: {body['consent_url']}"
        if body.get("request_id"):
            message += f" [request_id {body['request_id']}]"
        super().__init__(message=message)
        self.error = error
        self.error_description = description
        self.status_code = status_code
        self.body = body


def app_scope(*scopes: str) -> str:
    """The one ``{resource}/.default`` scope the broker serves, from ``get_token``'s scopes.

    A bare resource URI gets ``/.default`` appended; several scopes, or a delegated scope such as
    ``User.Read``, are a ``ValueError`` (the broker issues app-only tokens, one resource at a time).
    """
    if len(scopes) != 1:
        raise ValueError("a token-broker credential takes exactly one scope, '{resource}/.default'")
    scope = scopes[0].strip()
    resource = scope.removesuffix(_DEFAULT_SUFFIX).rstrip("/")
    if "://" not in resource or any(c.isspace() for c in resource):
        raise ValueError(
            f"{scope!r} is neither '{{resource}}/.default' nor a resource URI"
            " (the broker issues app-only tokens)"
        )
    return resource + _DEFAULT_SUFFIX


class TokenFile:
    """A credential kept in a file (a projected service-account token), re-read when the file changes.

    The file is stat'ed on every :meth:`read` and read again only when its device, inode, size or
    mtime differ from the last read: kubelet replaces the token by swapping a symlink, which changes
    the inode, and an in-place rewrite changes the mtime.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._value = ""

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    def read(self) -> str:
        """The file's current content, stripped; ``ClientAuthenticationError`` if unreadable or empty."""
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if stamp != self._stamp:
                    self._value = self.path.read_text(encoding="utf-8").strip()
                    self._stamp = stamp
            except (OSError, UnicodeDecodeError) as exc:
                self._stamp = None
                raise ClientAuthenticationError(
                    message=f"cannot read the caller token file {str(self.path)!r}: {type(exc).__name__}"
                ) from exc
            if not self._value:
                raise ClientAuthenticationError(message=f"the caller token file {str(self.path)!r} is empty")
            return self._value


class _Key(NamedTuple):
    tenant: str
    scope: str
    app: str | None


class _Core:
    """What a credential and its tenant views share: settings, the caller's credential, cached tokens."""

    def __init__(
        self,
        broker_url: str,
        api_key: str | None,
        token_file: str | os.PathLike[str] | None,
        min_ttl: int,
        refresh_margin_seconds: float,
        timeout: float,
    ) -> None:
        if not broker_url.startswith(("http://", "https://")):
            raise ValueError("broker_url must be an http:// or https:// URL")
        self._secret: str | TokenFile
        if api_key is not None and token_file is None and api_key.strip():
            self._secret = api_key.strip()
        elif token_file is not None and api_key is None:
            self._secret = TokenFile(token_file)
        else:
            raise ValueError("give exactly one of api_key= (not empty) or token_file=")
        if isinstance(min_ttl, bool) or not isinstance(min_ttl, int) or not 0 <= min_ttl <= MAX_MIN_TTL:
            raise ValueError(f"min_ttl must be an integer from 0 to {MAX_MIN_TTL}")
        if refresh_margin_seconds < 0:
            raise ValueError("refresh_margin_seconds must not be negative")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.broker_url = broker_url.rstrip("/")
        self.token_url = self.broker_url + "/v1/token"
        self.min_ttl = min_ttl
        # A cached token is served while more than this remains: the refresh margin, and never less
        # than the min_ttl the caller asked the broker to guarantee.
        self.keep_seconds = max(float(refresh_margin_seconds), float(min_ttl))
        self.timeout = timeout
        self.tokens: dict[_Key, AccessToken] = {}

    def describe_auth(self) -> str:
        if isinstance(self._secret, TokenFile):
            return f"token_file={str(self._secret.path)!r}"
        return "api_key=<hidden>"

    def cached(self, key: _Key) -> AccessToken | None:
        token = self.tokens.get(key)
        if token is not None and token.expires_on - time.time() > self.keep_seconds:
            return token
        return None

    def request(self, key: _Key) -> tuple[dict[str, str], dict[str, Any]]:
        """Headers and JSON body of the token request for ``key``."""
        bearer = self._secret.read() if isinstance(self._secret, TokenFile) else self._secret
        headers = {"Authorization": f"Bearer {bearer}", "User-Agent": _USER_AGENT}
        body: dict[str, Any] = {"tenant": key.tenant, "scope": key.scope, "min_ttl": self.min_ttl}
        if key.app is not None:
            body["app"] = key.app
        return headers, body

    def accept(self, key: _Key, status: int, raw: bytes) -> AccessToken:
        """The token in the broker's answer, now cached, or the error the answer describes."""
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if status != 200:
            raise BrokerAuthenticationError(status, payload if isinstance(payload, dict) else {})
        if not (
            isinstance(payload, dict)
            and isinstance(payload.get("access_token"), str)
            and isinstance(payload.get("expires_on"), int | float)
        ):
            raise ClientAuthenticationError(message="the token broker answered 200 without a usable token")
        # The broker's own expires_on: deriving it from expires_in at receipt would give the same
        # token a different expiry on either side of a second boundary.
        token = AccessToken(payload["access_token"], int(payload["expires_on"]))
        self.tokens[key] = token
        return token

    def unreachable(self, exc: BaseException) -> ClientAuthenticationError:
        return ClientAuthenticationError(
            message=f"token broker at {self.broker_url} unreachable: {type(exc).__name__}: {exc}"
        )

    def info(self, token: AccessToken) -> AccessTokenInfo:
        return AccessTokenInfo(
            token.token, token.expires_on, refresh_on=int(token.expires_on - self.keep_seconds)
        )


class _Credential:
    """The tenant/app binding and argument handling shared by the sync and async credentials."""

    _core: _Core
    _tenant: str | None
    _app: str | None
    _owner: bool

    def _bind(self, tenant_id: str | None, app: str | None) -> None:
        if tenant_id is not None and (not isinstance(tenant_id, str) or not tenant_id.strip()):
            raise ValueError("a tenant must be a non-empty tenant GUID or domain")
        if app is not None and (not isinstance(app, str) or not app):
            raise ValueError("app must be the name of an app configured in the broker")
        self._tenant = tenant_id.strip() if tenant_id is not None else None
        self._app = app

    def _view(self, tenant_id: str, app: str | None) -> Self:
        view = copy.copy(self)  # shares _core: one connection and one cache
        view._bind(tenant_id, app if app is not None else self._app)  # noqa: SLF001 - same class
        view._owner = False  # noqa: SLF001 - same class
        return view

    def _key(self, scopes: tuple[str, ...], tenant_id: str | None) -> _Key:
        scope = app_scope(*scopes)
        tenant = tenant_id or self._tenant
        if not tenant:
            raise ValueError("no tenant: pass tenant_id=, give default_tenant_id= or use for_tenant(tenant)")
        return _Key(tenant.strip(), scope, self._app)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(broker_url={self._core.broker_url!r}, {self._core.describe_auth()}, "
            f"tenant={self._tenant!r}, app={self._app!r})"
        )


class _SyncCore(_Core):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._session = requests.Session()
        self._guard = threading.Lock()
        self._flights: dict[_Key, Future[AccessToken]] = {}

    def get(self, key: _Key) -> AccessToken:
        token = self.cached(key)
        if token is not None:
            return token
        with self._guard:
            token = self.cached(key)  # landed while this thread waited for the guard
            if token is not None:
                return token
            flight = self._flights.get(key)
            if flight is not None:
                leader = False
            else:
                leader, flight = True, Future()
                self._flights[key] = flight
        if not leader:
            return flight.result()  # single flight: the leader's token, or its error
        try:
            token = self._fetch(key)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._guard:
                del self._flights[key]
        flight.set_result(token)
        return token

    def _fetch(self, key: _Key) -> AccessToken:
        headers, body = self.request(key)
        try:
            response = self._session.post(
                self.token_url, json=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise self.unreachable(exc) from exc
        return self.accept(key, response.status_code, response.content)

    def close(self) -> None:
        self._session.close()


class BrokerCredential(_Credential):
    """An azure-core ``TokenCredential`` (and ``SupportsTokenInfo``) whose tokens come from token-broker.

    :param broker_url: the broker's base URL, e.g. ``http://token-broker.token-broker:8080``.
    :param api_key: the caller's API key; or
    :param token_file: a file holding the caller's service-account token, re-read when it changes.
    :param app: the broker app to ask for (needed when the broker has several).
    :param default_tenant_id: the tenant when ``get_token`` is not given ``tenant_id``.
    :param min_ttl: seconds a returned token stays valid at least (0-3000).
    :param refresh_margin_seconds: a cached token with less than this left is fetched again.
    :param timeout: seconds for one broker request.

    ``claims`` and ``enable_cae`` are accepted for the protocol and ignored: the broker's app-only
    tokens are not issued against claims challenges. Use it as a context manager, or ``close()`` it.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        api_key: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        app: str | None = None,
        default_tenant_id: str | None = None,
        min_ttl: int = DEFAULT_MIN_TTL_SECONDS,
        refresh_margin_seconds: float = DEFAULT_REFRESH_MARGIN_SECONDS,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._bind(default_tenant_id, app)
        self._core: _SyncCore = _SyncCore(
            broker_url, api_key, token_file, min_ttl, refresh_margin_seconds, timeout
        )
        self._owner = True

    def for_tenant(self, tenant_id: str, *, app: str | None = None) -> BrokerCredential:
        """A view of this credential bound to ``tenant_id`` (and ``app``, else this one's), sharing its
        connection and cache; closing the view does nothing (close the credential it came from)."""
        return self._view(tenant_id, app)

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,  # noqa: ARG002 - azure-core's get_token signature; the broker issues no CAE tokens
        tenant_id: str | None = None,
        enable_cae: bool = False,  # noqa: ARG002 - same
        **kwargs: Any,  # noqa: ARG002 - same
    ) -> AccessToken:
        """A token for ``{resource}/.default`` in ``tenant_id`` (or the bound/default tenant)."""
        return self._core.get(self._key(scopes, tenant_id))

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        """As :meth:`get_token`, with ``refresh_on`` set to when this credential would refresh it."""
        token = self._core.get(self._key(scopes, (options or {}).get("tenant_id")))
        return self._core.info(token)

    def close(self) -> None:
        if self._owner:
            self._core.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _AsyncCore(_Core):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._session: aiohttp.ClientSession | None = None
        self._flights: dict[_Key, asyncio.Task[AccessToken]] = {}

    async def get(self, key: _Key) -> AccessToken:
        token = self.cached(key)
        if token is not None:
            return token
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._fly(key))
            self._flights[key] = flight
            flight.add_done_callback(_retrieve)
        # Shielded: a caller that gives up does not cancel the request the others are waiting for.
        return await asyncio.shield(flight)

    async def _fly(self, key: _Key) -> AccessToken:
        try:
            headers, body = self.request(key)
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            try:
                async with self._session.post(
                    self.token_url, json=body, headers=headers, allow_redirects=False
                ) as response:
                    status, raw = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self.unreachable(exc) from exc
            return self.accept(key, status, raw)
        finally:
            self._flights.pop(key, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retrieve(flight: asyncio.Task[AccessToken]) -> None:
    """Mark a flight's exception as seen, for when every caller awaiting it has given up."""
    if not flight.cancelled():
        flight.exception()


class AsyncBrokerCredential(_Credential):
    """An azure-core ``AsyncTokenCredential`` (and ``AsyncSupportsTokenInfo``) backed by token-broker.

    The same parameters and behaviour as :class:`BrokerCredential`; use it in one event loop, as an
    async context manager or with ``await close()``.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        api_key: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        app: str | None = None,
        default_tenant_id: str | None = None,
        min_ttl: int = DEFAULT_MIN_TTL_SECONDS,
        refresh_margin_seconds: float = DEFAULT_REFRESH_MARGIN_SECONDS,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._bind(default_tenant_id, app)
        self._core: _AsyncCore = _AsyncCore(
            broker_url, api_key, token_file, min_ttl, refresh_margin_seconds, timeout
        )
        self._owner = True

    def for_tenant(self, tenant_id: str, *, app: str | None = None) -> AsyncBrokerCredential:
        """A view of this credential bound to ``tenant_id`` (and ``app``, else this one's), sharing its
        connection and cache; closing the view does nothing (close the credential it came from)."""
        return self._view(tenant_id, app)

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,  # noqa: ARG002 - azure-core's get_token signature; the broker issues no CAE tokens
        tenant_id: str | None = None,
        enable_cae: bool = False,  # noqa: ARG002 - same
        **kwargs: Any,  # noqa: ARG002 - same
    ) -> AccessToken:
        """A token for ``{resource}/.default`` in ``tenant_id`` (or the bound/default tenant)."""
        return await self._core.get(self._key(scopes, tenant_id))

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """As :meth:`get_token`, with ``refresh_on`` set to when this credential would refresh it."""
        token = await self._core.get(self._key(scopes, (options or {}).get("tenant_id")))
        return self._core.info(token)

    async def close(self) -> None:
        if self._owner:
            await self._core.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.close()
