"""Token acquisition from Entra ID with MSAL, and the translation of its failures into BrokerErrors.

MSAL Python is synchronous: every call (including ``ConfidentialClientApplication`` construction, which
does a blocking OIDC discovery GET) runs in a bounded thread pool, never on the event loop. One
long-lived client per (app, tenant), bounded by an LRU, rebuilt when the app credential rotates.

MSAL's own caches are disabled on purpose (FIELD-NOTES #4, #5): the broker's cache is the only one,
so a refresh ahead of expiry really reaches Entra, and MSAL's replay of throttled or failed answers
does not hide a newly granted consent or distort our own backoff.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import msal
import requests

from broker.errors import (
    BrokerError,
    ConsentRequiredError,
    CredentialRejectedError,
    TemporarilyUnavailableError,
    TenantRefusedError,
    ThrottledError,
    UnknownTenantError,
    UpstreamError,
)
from broker.tokens import AccessToken, TokenKey

if TYPE_CHECKING:
    from broker.assertions import AssertionSource
    from broker.config import EntraOptions
    from broker.metrics import Metrics
    from broker.vault import AppCredential, CredentialStore

log = logging.getLogger(__name__)

CONSENT_CODES = frozenset({700016, 7000229, 65001, 650056, 90094})
UNKNOWN_TENANT_CODES = frozenset({90002})
TENANT_PERMANENT_CODES = frozenset({500011, 53003})
CREDENTIAL_CODES = frozenset({7000215, 7000222, 700027})
# Refusals of a federated or Key Vault-signed client assertion: app-wide credential errors too (reload
# once, then 502). What each means for the operator (the README lists the fix for each):
ASSERTION_CODES: Final[Mapping[int, str]] = {
    70021: "no federated identity credential on the app matches the presented token "
    "(issuer, subject and audience must match one exactly; a new one takes a few minutes to apply)",
    700211: "no federated identity credential on the app names the presented token's issuer",
    700212: "no federated identity credential on the app names the presented token's audience",
    700213: "no federated identity credential on the app names the presented token's subject",
    700236: "the managed identity is in another tenant than the app (a federated managed identity "
    "must share the app's home tenant)",
    70023: "the presented external token lives longer than Entra accepts (about a day)",
    700024: "the client assertion is outside its valid time range (expired or not yet valid: a stale "
    "projected token, or clock skew)",
    700027: "the client assertion's signature or certificate is not one registered on the app "
    "(upload the certificate's public part, or check its thumbprint)",
}
# The customer disabled the app's service principal (enterprise application) in *their* tenant: a state
# of that tenant which only its administrator can change. Reloading the app credential would not help
# and, for a partner with many customers, would turn one customer's choice into Key Vault traffic.
DISABLED_CODES = frozenset({7000112})
TRANSIENT_CODES = frozenset({90055, 50196})
DEFAULT_RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, slots=True)
class EntraFailure:
    """The parts of an Entra error worth acting on; never the raw description (it can quote input)."""

    error: str
    code: int | None
    http_status: int | None = None
    retry_after: int | None = None


def consent_url(
    authority_host: str,
    tenant: str,
    client_id: str,
    resource: str,
    redirect_uri: str | None = None,
    state: str | None = None,
) -> str:
    """The v2 admin-consent link for a tenant (FIELD-NOTES #9)."""
    params = {"client_id": client_id, "scope": f"{resource}/.default"}
    if redirect_uri:
        params["redirect_uri"] = redirect_uri
    if state:
        params["state"] = state
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return f"{authority_host}/{tenant}/v2.0/adminconsent?{query}"


def classify(failure: EntraFailure, *, tenant: str, consent_link: str) -> BrokerError:
    """Map an Entra failure to the broker's error table (FIELD-NOTES #8)."""
    aadsts = f"AADSTS{failure.code}" if failure.code else None
    code = failure.code or 0
    if code in CONSENT_CODES:
        return ConsentRequiredError(
            f"the app is not consented in tenant {tenant}: an administrator must grant consent",
            aadsts=aadsts,
            consent_url=consent_link,
        )
    if code in UNKNOWN_TENANT_CODES:
        return UnknownTenantError(f"Entra ID does not know tenant {tenant}", aadsts=aadsts)
    if code in DISABLED_CODES:
        return TenantRefusedError(
            f"the app is disabled in tenant {tenant}: its administrator must re-enable the enterprise "
            "application",
            aadsts=aadsts,
        )
    if code in CREDENTIAL_CODES or code in ASSERTION_CODES:
        meaning = ASSERTION_CODES.get(code)
        because = f": {meaning}" if meaning else ""
        return CredentialRejectedError(
            f"Entra ID rejected the app credential{because}; the operator must fix it", aadsts=aadsts
        )
    if code in TENANT_PERMANENT_CODES:
        return TenantRefusedError(
            f"Entra ID refused tokens for this resource in tenant {tenant}", aadsts=aadsts
        )
    transient = (
        code in TRANSIENT_CODES
        or failure.error in ("temporarily_unavailable", "server_error")
        or (failure.http_status is not None and (failure.http_status == 429 or failure.http_status >= 500))
    )
    if transient:
        return _unavailable(failure.http_status, failure.retry_after, aadsts=aadsts)
    return UpstreamError(f"Entra ID answered {failure.error or 'an unexpected response'}", aadsts=aadsts)


def _unavailable(
    status: int | None,
    retry_after: int | None,
    description: str = "Entra ID is throttling or unavailable; retry later",
    **context: Any,
) -> TemporarilyUnavailableError:
    """A transient failure: a 429 is a ``ThrottledError`` (its Retry-After is shared by replicas);
    ``hinted`` when Entra itself said how long to wait."""
    cls = ThrottledError if status == 429 else TemporarilyUnavailableError
    return cls(
        description,
        retry_after=retry_after or DEFAULT_RETRY_AFTER_SECONDS,
        hinted=retry_after is not None,
        **context,
    )


def _failure_from_result(result: dict[str, Any]) -> EntraFailure:
    codes = result.get("error_codes") or []
    code = (
        int(codes[0])
        if codes and str(codes[0]).isdigit()
        else _code_in(str(result.get("error_description", "")))
    )
    return EntraFailure(str(result.get("error", "")), code)


def _code_in(text: str) -> int | None:
    match = re.search(r"AADSTS(\d+)", text)
    return int(match.group(1)) if match else None


class _NoReplay(dict[str, Any]):
    """An ``http_cache`` that stores nothing: MSAL's replay of failures would mask recoveries."""

    def __setitem__(self, key: str, value: Any) -> None:
        return


class _NoTokenCache(msal.TokenCache):  # type: ignore[misc]  # msal ships no type hints
    """MSAL must not answer from its own cache: refreshes are ours to schedule (FIELD-NOTES #4)."""

    def add(self, event: Any, **kwargs: Any) -> None:  # noqa: ARG002 - msal.TokenCache.add's signature
        return


class _RecordingSession(requests.Session):
    """A requests session with a timeout and a memory of the last response's status and Retry-After."""

    def __init__(self, verify: str | bool, timeout_seconds: float) -> None:
        super().__init__()
        # trust_env=False: REQUESTS_CA_BUNDLE would silently override `verify` (FIELD-NOTES).
        self.trust_env = False
        self.verify = verify
        self._timeout_seconds = timeout_seconds
        # Per thread: each executor thread runs one MSAL call at a time.
        self._last = threading.local()

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout_seconds)
        response = super().request(method, url, *args, **kwargs)
        self._last.answer = (response.status_code, _parse_retry_after(response.headers.get("Retry-After")))
        return response

    def forget_last(self) -> None:
        """Start a new call: an answer seen by an earlier call on this thread must not be reported."""
        self._last.answer = (None, None)

    def last_answer(self) -> tuple[int | None, int | None]:
        """HTTP status and Retry-After seconds of this thread's last response in the current call."""
        answer: tuple[int | None, int | None] = getattr(self._last, "answer", (None, None))
        return answer


class _AssertionUnavailableError(Exception):
    """The client assertion could not be had (Key Vault, the managed identity, the token file): carries
    the ``BrokerError`` out of MSAL, which passes a callback's exception through untouched."""

    def __init__(self, error: BrokerError) -> None:
        super().__init__(error.description)
        self.error = error


class _AssertionCallback:
    """MSAL's ``client_assertion`` callable: MSAL (1.39+) calls it in an executor thread with
    ``{"client_id", "token_endpoint"}`` whenever it sends a token request; the assertion comes from the
    event loop (Key Vault and azure-identity are async), the thread waits for it, bounded."""

    def __init__(
        self, source: AssertionSource, loop: asyncio.AbstractEventLoop, timeout_seconds: float
    ) -> None:
        self._source = source
        self._loop = loop
        self._timeout_seconds = timeout_seconds

    def __call__(self, context: dict[str, str]) -> str:
        future = asyncio.run_coroutine_threadsafe(
            self._source.assertion(context["token_endpoint"]), self._loop
        )
        try:
            return future.result(self._timeout_seconds)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise _AssertionUnavailableError(
                TemporarilyUnavailableError("no client assertion could be had in time", retry_after=5)
            ) from None
        except BrokerError as exc:
            raise _AssertionUnavailableError(exc) from exc


def _parse_retry_after(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(1, int(float(value)))
    except (ValueError, OverflowError):  # "inf", "1e999": not a number of seconds (a broken proxy)
        return None


class EntraClient:
    """Acquires app tokens per (app, tenant, resource); translates every MSAL outcome."""

    def __init__(
        self, options: EntraOptions, metrics: Metrics, credentials: CredentialStore, ca_bundle: str | None
    ) -> None:
        self._options = options
        self._metrics = metrics
        self._credentials = credentials
        self._executor = ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="msal")
        self._session = _RecordingSession(ca_bundle or True, options.timeout_seconds)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=options.max_workers * 2)
        self._session.mount("https://", adapter)
        self._clients: OrderedDict[tuple[str, str], tuple[str, msal.ConfidentialClientApplication]] = (
            OrderedDict()
        )
        self._clients_lock = threading.Lock()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._session.close()

    def forget_tenant(self, tenant: str) -> None:
        """Drop the MSAL clients of ``tenant`` (offboarding): the next acquisition starts afresh,
        OpenID discovery of the tenant included."""
        with self._clients_lock:
            for key in [key for key in self._clients if key[1] == tenant]:
                del self._clients[key]

    def consent_url(self, key: TokenKey) -> str:
        return consent_url(
            self._options.authority_host, key.tenant, self._options.apps[key.app].client_id, key.resource
        )

    async def acquire(self, key: TokenKey) -> AccessToken:
        """One Entra token request; on a rejected credential, reload it once and retry."""
        app, tenant, resource = key.app, key.tenant, key.resource
        credential = await self._credentials.app_credential(app)
        try:
            token = await self._acquire_with(app, tenant, resource, credential)
        except CredentialRejectedError:
            # Rotation in Key Vault shows up as invalid_client here: re-read once, then fail loudly.
            log.warning("app credential rejected; reloading it once", extra={"app": app})
            fresh = await self._credentials.app_credential(app, force=True)
            try:
                token = await self._acquire_with(app, tenant, resource, fresh)
            except CredentialRejectedError as exc:
                self._metrics.credential_failures.labels(app=app).inc()
                self._credentials.mark_rejected(app, exc.aadsts or "")
                self._log_rejection(app, tenant, fresh, exc)
                raise
        self._credentials.mark_accepted(app)
        return token

    def _log_rejection(
        self, app: str, tenant: str, credential: AppCredential, exc: CredentialRejectedError
    ) -> None:
        """The operator's line: which source, what Entra said and means, and — for an assertion — the
        issuer, subject, audience and expiry that were presented, to compare with the app's federated
        credential or certificate (never the assertion itself)."""
        code = _code_in(exc.aadsts or "")
        presented = None
        if credential.assertion is not None:
            endpoint = f"{self._options.authority_host}/{tenant}/oauth2/v2.0/token"
            presented = credential.assertion.presented(endpoint) or None
        log.error(
            "Entra ID rejected the app credential after a reload: fix the credential",
            extra={
                "app": app,
                "tenant": tenant,
                "credential_source": credential.source or None,
                "aadsts": exc.aadsts,
                "meaning": ASSERTION_CODES.get(code or 0),
                "presented": presented,
            },
        )

    async def _acquire_with(
        self, app: str, tenant: str, resource: str, credential: AppCredential
    ) -> AccessToken:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        call = partial(self._acquire_sync, app, tenant, resource, credential, loop)
        try:
            result, status, retry_after = await asyncio.wait_for(
                loop.run_in_executor(self._executor, call),
                timeout=self._options.timeout_seconds * 2,
            )
        except _AssertionUnavailableError as exc:
            # Not an Entra answer: nothing reached Entra, so nothing is recorded as an upstream call.
            raise exc.error from exc.error.__cause__
        except BrokerError as exc:
            self._record(app, started, exc)
            raise
        except TimeoutError:
            exc2 = TemporarilyUnavailableError("Entra ID did not answer in time", retry_after=5)
            self._record(app, started, exc2)
            raise exc2 from None
        if "access_token" in result:
            self._record(app, started, None)
            return AccessToken.from_jwt(
                result["access_token"], expires_in=float(result.get("expires_in", 0)), resource=resource
            )
        failure = _failure_from_result(result)
        if status == 429 or (status is not None and status >= 500):
            failure = EntraFailure(failure.error, failure.code, status, retry_after)
        error = classify(
            failure, tenant=tenant, consent_link=self.consent_url(TokenKey(app, tenant, resource))
        )
        self._record(app, started, error)
        log.info(
            "entra refused a token",
            extra={
                "app": app,
                "tenant": tenant,
                "resource": resource,
                "entra_error": failure.error,
                "aadsts": failure.code,
                "trace_id": result.get("trace_id"),
                "correlation_id": result.get("correlation_id"),
            },
        )
        raise error

    def _record(self, app: str, started: float, error: BrokerError | None) -> None:
        outcome = "ok" if error is None else error.error
        aadsts = (error.aadsts or "") if error is not None else ""
        self._metrics.upstream_requests.labels(app=app, outcome=outcome, aadsts=aadsts).inc()
        self._metrics.upstream_request_seconds.labels(outcome=outcome).observe(time.monotonic() - started)

    # --- runs in the executor -------------------------------------------------------------------

    def _acquire_sync(
        self,
        app: str,
        tenant: str,
        resource: str,
        credential: AppCredential,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[dict[str, Any], int | None, int | None]:
        self._session.forget_last()
        client = self._client_sync(app, tenant, resource, credential, loop)
        try:
            result = client.acquire_token_for_client(scopes=[f"{resource}/.default"])
        except requests.RequestException as exc:
            raise self._transport_error(exc) from None
        except (msal.exceptions.MsalServiceError, ValueError) as exc:
            # MSAL raises for 5xx and for a 429 with a non-JSON body (FIELD-NOTES #5).
            status, retry_after = self._session.last_answer()
            if status is not None and status < 429:
                raise UpstreamError("Entra ID answered something unexpected") from exc
            raise _unavailable(status, retry_after) from exc
        return (result, *self._session.last_answer())

    def _client_sync(
        self,
        app: str,
        tenant: str,
        resource: str,
        credential: AppCredential,
        loop: asyncio.AbstractEventLoop,
    ) -> msal.ConfidentialClientApplication:
        key = (app, tenant)
        with self._clients_lock:
            entry = self._clients.get(key)
            if entry is not None and entry[0] == credential.fingerprint:
                self._clients.move_to_end(key)
                return entry[1]
        client = self._build_client(app, tenant, resource, credential, loop)
        with self._clients_lock:
            self._clients[key] = (credential.fingerprint, client)
            self._clients.move_to_end(key)
            while len(self._clients) > self._options.clients_max:
                self._clients.popitem(last=False)
        return client

    def _build_client(
        self,
        app: str,
        tenant: str,
        resource: str,
        credential: AppCredential,
        loop: asyncio.AbstractEventLoop,
    ) -> msal.ConfidentialClientApplication:
        settings = self._options.apps[app]
        client_credential: Any
        if credential.assertion is not None:
            client_credential = {
                "client_assertion": _AssertionCallback(
                    credential.assertion, loop, self._options.timeout_seconds
                )
            }
        elif credential.is_certificate:
            client_credential = {
                "private_key": credential.private_key_pem,
                "public_certificate": credential.certificate_pem,
            }
        else:
            client_credential = credential.client_secret
        try:
            return msal.ConfidentialClientApplication(
                settings.client_id,
                client_credential=client_credential,
                authority=f"{self._options.authority_host}/{tenant}",
                # Instance discovery asks login.microsoftonline.com about the host; the authority is
                # configured explicitly (sovereign clouds, the emulator), so skip it.
                instance_discovery=False,
                azure_region=None,  # never a region for a multi-tenant app (AADSTS100007)
                http_client=self._session,
                http_cache=_NoReplay(),
                token_cache=_NoTokenCache(),
            )
        except requests.RequestException as exc:
            raise self._transport_error(exc) from None
        except ValueError as exc:
            # An unknown tenant fails discovery with a ValueError whose context holds the status and
            # Entra's body (FIELD-NOTES #2). Parse the code out; never echo the text.
            inner = str(exc.__context__ or exc)
            status_match = re.search(r"HTTP status: (\d+)", inner)
            status = int(status_match.group(1)) if status_match else None
            code = _code_in(inner)
            failure = EntraFailure(_error_in(inner), code, status)
            raise classify(
                failure, tenant=tenant, consent_link=self.consent_url(TokenKey(app, tenant, resource))
            ) from None

    def _transport_error(self, exc: requests.RequestException) -> BrokerError:
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            retry_after = _parse_retry_after(exc.response.headers.get("Retry-After"))
            if status == 429 or status >= 500:
                return _unavailable(status, retry_after, f"Entra ID answered HTTP {status}; retry later")
            return UpstreamError(f"Entra ID answered HTTP {status}")
        cause, reason = unreachable_cause(exc)
        # Runs in an executor thread: prometheus_client's counters are thread-safe.
        self._metrics.upstream_unreachable.labels(cause=cause).inc()
        log.warning("cannot reach Entra ID", extra={"cause": cause, "reason": type(exc).__name__})
        return TemporarilyUnavailableError(
            f"cannot reach Entra ID: {reason}", retry_after=DEFAULT_RETRY_AFTER_SECONDS
        )


_UNREACHABLE = {
    "dns": "its host name does not resolve (DNS)",
    "connection_refused": "the connection was refused",
    "connection_reset": "the connection was reset",
    "tls": "the TLS handshake failed (is the certificate trusted? see outbound_ca_file)",
    "proxy": "the proxy refused or failed the connection",
    "timeout": "it did not answer in time",
    "connection_error": "the connection failed",
}


def unreachable_cause(exc: requests.RequestException) -> tuple[str, str]:
    """Why Entra could not be reached, as a bounded metric label and a sentence for callers: DNS,
    refused, reset, TLS, proxy, timeout (an egress policy shows as a timeout or a refusal)."""
    if isinstance(exc, requests.exceptions.SSLError):
        cause = "tls"
    elif isinstance(exc, requests.exceptions.ProxyError):
        cause = "proxy"
    elif isinstance(exc, requests.Timeout):
        cause = "timeout"
    else:
        text = repr(exc)
        if "NameResolution" in text or "Name or service not known" in text or "getaddrinfo" in text:
            cause = "dns"
        elif "Connection refused" in text or "ConnectionRefused" in text:
            cause = "connection_refused"
        elif "Connection reset" in text or "RemoteDisconnected" in text or "ConnectionReset" in text:
            cause = "connection_reset"
        else:
            cause = "connection_error"
    return cause, _UNREACHABLE[cause]


def _error_in(text: str) -> str:
    start = text.find("{")
    if start < 0:
        return ""
    try:
        body = json.loads(text[start:])
    except ValueError:
        return ""
    return str(body.get("error", "")) if isinstance(body, dict) else ""
