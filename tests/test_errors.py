"""The one error tree: each class's status and OAuth code, the bodies and headers it renders, and
what a remembered failure keeps (``remembered_body``) and gives back (``error_from_body``)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import (
    PERMANENT_TENANT_ERRORS,
    REMEMBERED_FIELDS,
    AccessDeniedError,
    BrokerError,
    ConsentRequiredError,
    CredentialLoadError,
    CredentialRejectedError,
    InsufficientConsentError,
    InvalidClientError,
    InvalidRequestError,
    PayloadTooLargeError,
    TemporarilyUnavailableError,
    TenantRefusedError,
    ThrottledError,
    UnknownTenantError,
    UnsupportedMediaTypeError,
    UpstreamError,
    error_from_body,
    remembered_body,
)


@pytest.mark.parametrize(
    ("cls", "status", "error"),
    [
        (InvalidRequestError, 400, "invalid_request"),
        (PayloadTooLargeError, 413, "invalid_request"),
        (UnsupportedMediaTypeError, 415, "invalid_request"),
        (InvalidClientError, 401, "invalid_client"),
        (AccessDeniedError, 403, "access_denied"),
        (ConsentRequiredError, 403, "consent_required"),
        (InsufficientConsentError, 403, "insufficient_consent"),
        (UnknownTenantError, 404, "unknown_tenant"),
        (UpstreamError, 502, "upstream_error"),
        (CredentialRejectedError, 502, "upstream_error"),
        (CredentialLoadError, 502, "upstream_error"),
        (TenantRefusedError, 502, "upstream_error"),
    ],
)
def test_status_and_code_follow_the_contract(cls: type[BrokerError], status: int, error: str) -> None:
    """Each error class answers the status and OAuth code of PRODUCT.md's table."""
    raised = cls("described")
    assert (status, error) == (raised.status, raised.error)
    assert {"error": error, "error_description": "described"} == raised.to_body()


def test_body_carries_typed_context_and_details() -> None:
    """Typed fields and display-only details appear in the body; absent ones do not."""
    error = InsufficientConsentError(
        "lacks roles", missing_roles=["Machine.Isolate"], consent_url="https://consent", tenant=None
    )
    assert {
        "error": "insufficient_consent",
        "error_description": "lacks roles",
        "missing_roles": ["Machine.Isolate"],
        "consent_url": "https://consent",
    } == error.to_body()
    assert {"allowed_resources": ["r"]} == AccessDeniedError("no", allowed_resources=["r"]).details


def test_invalid_client_asks_for_bearer_authentication() -> None:
    """401 carries WWW-Authenticate: Bearer."""
    assert {"WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_client"'} == (
        InvalidClientError("who are you").headers()
    )


@pytest.mark.parametrize(("given", "expected"), [(30, 30), (0.2, 1), (0, 1), (-5, 1), (2.9, 3)])
def test_retry_after_is_a_whole_number_of_seconds_at_least_one(given: float, expected: int) -> None:
    """503s always tell the caller to wait at least a second, in the header and the body, rounded
    up (2.9 s is 3: a caller told 2 would come back before the wait is over)."""
    error = ThrottledError("throttled", retry_after=given)
    assert (503, expected) == (error.status, error.retry_after)
    assert {"Retry-After": str(expected)} == error.headers()
    assert expected == error.to_body()["retry_after"]
    assert isinstance(error, TemporarilyUnavailableError)


@pytest.mark.parametrize("cls", PERMANENT_TENANT_ERRORS)
def test_remembered_failure_round_trips_its_documented_fields(cls: type[BrokerError]) -> None:
    """A permanent failure stored and read back is the same class with the same description and
    AADSTS code; only REMEMBERED_FIELDS are stored, so a consent_url never is."""
    original = cls("the tenant said no", aadsts="AADSTS65001", consent_url="https://consent")
    body = remembered_body(original)
    assert {"error", "error_description", "aadsts"} == set(body) == set(REMEMBERED_FIELDS)
    restored = error_from_body(body)
    assert cls is type(restored)
    assert (original.description, original.aadsts, None) == (
        restored.description,
        restored.aadsts,
        restored.consent_url,
    )
    assert body == remembered_body(restored)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": "consent_required", "error_description": "x", "aadsts": "65001"}, None),
        ({"error": "consent_required", "error_description": "x", "aadsts": "AADSTS" + "9" * 20}, None),
        ({"error": "consent_required", "error_description": "x", "aadsts": ["AADSTS1"]}, None),
        ({"error": "consent_required", "error_description": "x", "aadsts": "AADSTS65001"}, "AADSTS65001"),
    ],
)
def test_only_well_formed_aadsts_codes_are_replayed(body: dict[str, Any], expected: str | None) -> None:
    """An AADSTS field read back is kept only if it looks like one."""
    assert expected == error_from_body(body).aadsts


def test_unexpected_bodies_become_bounded_upstream_errors() -> None:
    """A body naming an error that is never remembered, or none, is a 502; descriptions are cut
    at 512 characters and always text."""
    assert UpstreamError is type(error_from_body({"error": "access_denied", "error_description": "x"}))
    assert UpstreamError is type(error_from_body({}))
    assert 512 == len(
        error_from_body({"error": "unknown_tenant", "error_description": "y" * 10_000}).description
    )
    assert "42" == error_from_body({"error": "unknown_tenant", "error_description": 42}).description
