"""The one error hierarchy of token-broker.

    Exception
    ├── BrokerError                      (status, OAuth ``error`` code, description, typed context)
    │   ├── InvalidRequestError          400 invalid_request
    │   │   ├── PayloadTooLargeError     413 invalid_request
    │   │   ├── UnsupportedMediaTypeError 415 invalid_request
    │   │   └── RequestTimeoutError      408 invalid_request (the body did not arrive in time)
    │   ├── InvalidClientError           401 invalid_client (+ WWW-Authenticate)
    │   ├── AccessDeniedError            403 access_denied
    │   ├── ConsentRequiredError         403 consent_required (+ consent_url, aadsts)
    │   ├── InsufficientConsentError     403 insufficient_consent (+ missing_roles, consent_url)
    │   ├── UnknownTenantError           404 unknown_tenant (+ aadsts)
    │   ├── UpstreamError                502 upstream_error (+ aadsts)
    │   │   ├── CredentialRejectedError  502: Entra rejected the app's own credential (app-wide)
    │   │   ├── CredentialLoadError      502: a credential source could not be read, nothing loaded
    │   │   └── TenantRefusedError       502: a permanent per-tenant refusal (e.g. resource not provisioned)
    │   └── RetryLaterError              (+ retry_after, Retry-After)
    │       ├── RateLimitedError         429 rate_limited: the caller's acquisition budget is spent
    │       └── TemporarilyUnavailableError 503 temporarily_unavailable
    │           └── ThrottledError       503: Entra answered 429 (its Retry-After is shared by replicas)
    ├── SealError                        not an HTTP error: a cached value does not open (wrong key, tampered)
    ├── JwksError                        not an HTTP error: service-account signing keys cannot be fetched
    ├── SharedCacheError                 not an HTTP error: Redis cannot be reached (CLI maintenance)
    ├── ConsentLinkError                 not an HTTP error: an onboarding invite or state that does not
    │                                    verify (rendered as an HTML page, never as JSON)
    └── ConfigError                      not an HTTP error: a bad configuration (exit code 2)

Adapters translate SDK exceptions into these at their boundary. The rule for the chain: ``from exc``
where the SDK exception helps an operator reading the log (the traceback stays in the log, never in a
body), ``from None`` where the SDK's message could quote input, a secret or a response body.

Fields that code reads (``aadsts``, ``retry_after``, ``consent_url``, ``missing_roles``) are typed
attributes; ``details`` holds display-only context (allowed apps, say). Descriptions are written for
the caller and must never contain a token, a secret or a caller key.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

# The body fields a remembered failure may carry when it is read back from Redis: nothing else is
# replayed to callers (a consent_url, for one, is always rebuilt from the configuration).
REMEMBERED_FIELDS = ("error", "error_description", "aadsts")


class BrokerError(Exception):
    """A failure with a decided HTTP status and OAuth error code."""

    status: ClassVar[int] = 500
    error: ClassVar[str] = "server_error"

    def __init__(
        self,
        description: str,
        *,
        aadsts: str | None = None,
        consent_url: str | None = None,
        missing_roles: list[str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.aadsts = aadsts
        self.consent_url = consent_url
        self.missing_roles = missing_roles
        self.details = {key: value for key, value in details.items() if value is not None}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error requires."""
        return {}

    def to_body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error", "error_description", ...context}``."""
        body: dict[str, Any] = {"error": self.error, "error_description": self.description}
        if self.aadsts is not None:
            body["aadsts"] = self.aadsts
        if self.consent_url is not None:
            body["consent_url"] = self.consent_url
        if self.missing_roles is not None:
            body["missing_roles"] = self.missing_roles
        body.update(self.details)
        return body


class InvalidRequestError(BrokerError):
    status = 400
    error = "invalid_request"


class PayloadTooLargeError(InvalidRequestError):
    status = 413


class UnsupportedMediaTypeError(InvalidRequestError):
    status = 415


class RequestTimeoutError(InvalidRequestError):
    status = 408


class InvalidClientError(BrokerError):
    status = 401
    error = "invalid_client"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_client"'}


class AccessDeniedError(BrokerError):
    status = 403
    error = "access_denied"


class ConsentRequiredError(BrokerError):
    status = 403
    error = "consent_required"


class InsufficientConsentError(BrokerError):
    status = 403
    error = "insufficient_consent"


class UnknownTenantError(BrokerError):
    status = 404
    error = "unknown_tenant"


class UpstreamError(BrokerError):
    status = 502
    error = "upstream_error"


class CredentialRejectedError(UpstreamError):
    """Entra rejected the app's own credential (bad, expired, disabled): app-wide, not per tenant."""


class CredentialLoadError(UpstreamError):
    """A credential source could not be read and nothing was loaded before."""


class TenantRefusedError(UpstreamError):
    """A permanent per-tenant refusal other than consent, such as a resource not provisioned."""


class RetryLaterError(BrokerError):
    """Base of the answers that carry ``retry_after`` (body) and ``Retry-After`` (header)."""

    def __init__(self, description: str, *, retry_after: float, hinted: bool = False, **context: Any) -> None:
        super().__init__(description, **context)
        self.retry_after = max(1, math.ceil(retry_after))
        # True when the upstream itself said how long to wait (a Retry-After header).
        self.hinted = hinted

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def to_body(self) -> dict[str, Any]:
        return {**super().to_body(), "retry_after": self.retry_after}


class RateLimitedError(RetryLaterError):
    """The caller spent its budget of upstream acquisitions (cache hits are never limited)."""

    status = 429
    error = "rate_limited"


class TemporarilyUnavailableError(RetryLaterError):
    status = 503
    error = "temporarily_unavailable"


class ThrottledError(TemporarilyUnavailableError):
    """Entra answered 429: every replica should hold off this (app, tenant) for ``retry_after``."""


# Per-tenant failures that will not go away by retrying: remembered briefly (and shared across
# replicas) so a misconfigured caller cannot hammer Entra.
PERMANENT_TENANT_ERRORS: tuple[type[BrokerError], ...] = (
    ConsentRequiredError,
    UnknownTenantError,
    TenantRefusedError,
)
_BY_CODE: dict[str, type[BrokerError]] = {cls.error: cls for cls in PERMANENT_TENANT_ERRORS}


def error_from_body(body: dict[str, Any]) -> BrokerError:
    """Rebuild a remembered permanent error from its stored body: only ``REMEMBERED_FIELDS`` count."""
    cls = _BY_CODE.get(str(body.get("error")), UpstreamError)
    aadsts = body.get("aadsts")
    return cls(
        str(body.get("error_description", ""))[:512],
        aadsts=aadsts
        if isinstance(aadsts, str) and aadsts.startswith("AADSTS") and len(aadsts) < 16
        else None,
    )


def remembered_body(exc: BrokerError) -> dict[str, Any]:
    """What is stored of a permanent failure: the fields ``error_from_body`` reads back."""
    return {key: value for key, value in exc.to_body().items() if key in REMEMBERED_FIELDS}


class SealError(Exception):
    """A sealed value could not be opened (wrong key, tampered, or bound to another cache key)."""


class JwksError(Exception):
    """The service-account issuer's signing keys could not be fetched or parsed."""


class SharedCacheError(Exception):
    """Redis could not be reached for a maintenance command (requests fail open instead)."""


class ConsentLinkError(Exception):
    """An onboarding invite or consent ``state`` that is malformed, forged, expired or for another
    purpose. ``expired`` is True only for a genuine (signed) link whose time is up."""

    def __init__(self, description: str, *, expired: bool = False) -> None:
        super().__init__(description)
        self.description = description
        self.expired = expired


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""
