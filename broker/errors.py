"""The one error hierarchy of token-broker.

    BrokerError                      (status, OAuth ``error`` code, description, context)
    ├── InvalidRequestError          400 invalid_request
    │   ├── PayloadTooLargeError     413 invalid_request
    │   └── UnsupportedMediaTypeError 415 invalid_request
    ├── InvalidClientError           401 invalid_client (+ WWW-Authenticate)
    ├── AccessDeniedError            403 access_denied
    ├── ConsentRequiredError         403 consent_required (+ consent_url, aadsts)
    ├── InsufficientConsentError     403 insufficient_consent (+ missing_roles, consent_url)
    ├── UnknownTenantError           404 unknown_tenant (+ aadsts)
    ├── UpstreamError                502 upstream_error (+ aadsts)
    │   ├── CredentialRejectedError  502: Entra rejected the app's own credential (app-wide)
    │   └── TenantRefusedError       502: a permanent per-tenant refusal (e.g. resource not provisioned)
    └── TemporarilyUnavailableError  503 temporarily_unavailable (+ retry_after, Retry-After)
        └── ThrottledError           503: Entra answered 429 (its Retry-After is shared by replicas)
    ConfigError                      not an HTTP error: a bad configuration file (exit code 2)

Adapters translate SDK exceptions into these at their boundary (``raise ... from exc``); the HTTP layer
renders them. Descriptions are written for the caller and must never contain a token, a secret or a
caller key: the constructors take only the context fields listed above.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    """A failure with a decided HTTP status and OAuth error code."""

    status: ClassVar[int] = 500
    error: ClassVar[str] = "server_error"

    def __init__(self, description: str, **context: Any) -> None:
        super().__init__(description)
        self.description = description
        self.context = {key: value for key, value in context.items() if value is not None}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error requires."""
        return {}

    def to_body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error", "error_description", ...context}``."""
        return {"error": self.error, "error_description": self.description, **self.context}


class InvalidRequestError(BrokerError):
    status = 400
    error = "invalid_request"


class PayloadTooLargeError(InvalidRequestError):
    status = 413


class UnsupportedMediaTypeError(InvalidRequestError):
    status = 415


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


class TenantRefusedError(UpstreamError):
    """A permanent per-tenant refusal other than consent, such as a resource not provisioned."""


class TemporarilyUnavailableError(BrokerError):
    status = 503
    error = "temporarily_unavailable"

    def __init__(self, description: str, *, retry_after: int, hinted: bool = False, **context: Any) -> None:
        super().__init__(description, retry_after=max(1, int(retry_after)), **context)
        # True when the upstream itself said how long to wait (a Retry-After header).
        self.hinted = hinted

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.context["retry_after"])}


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
    """Rebuild a remembered permanent error from its JSON body."""
    cls = _BY_CODE.get(str(body.get("error")), UpstreamError)
    context = {k: v for k, v in body.items() if k not in ("error", "error_description")}
    return cls(str(body.get("error_description", "")), **context)


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""
