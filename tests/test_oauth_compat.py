"""The translation of the broker's error tree into Entra's answers, and the discovery document."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from broker.errors import (
    AccessDeniedError,
    BrokerError,
    ConsentRequiredError,
    CredentialRejectedError,
    InvalidClientError,
    InvalidRequestError,
    PayloadTooLargeError,
    TemporarilyUnavailableError,
    TenantRefusedError,
    ThrottledError,
    UnknownTenantError,
    UpstreamError,
)
from broker.oauth_compat import (
    InvalidScopeError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
    entra_error_body,
    entra_status_and_error,
    openid_configuration,
)

CONSENT = "https://login.example/t/v2.0/adminconsent?client_id=x"


@pytest.mark.parametrize(
    ("exc", "status", "error", "codes"),
    [
        # Entra refused: its own code, status and AADSTS number.
        (
            ConsentRequiredError("no consent", aadsts="AADSTS700016", consent_url=CONSENT),
            400,
            "unauthorized_client",
            [700016],
        ),
        (
            ConsentRequiredError("no sp", aadsts="AADSTS7000229", consent_url=CONSENT),
            401,
            "invalid_client",
            [7000229],
        ),
        (
            ConsentRequiredError("no consent", aadsts="AADSTS65001", consent_url=CONSENT),
            400,
            "invalid_grant",
            [65001],
        ),
        (ConsentRequiredError("misconfigured", aadsts="AADSTS650056"), 400, "invalid_grant", [650056]),
        (UnknownTenantError("no such tenant", aadsts="AADSTS90002"), 400, "invalid_request", [90002]),
        (TenantRefusedError("not provisioned", aadsts="AADSTS500011"), 400, "invalid_resource", [500011]),
        # Entra failed in a way the caller cannot fix: the broker's status, server_error or retry.
        (
            CredentialRejectedError("the app credential", aadsts="AADSTS7000215"),
            502,
            "server_error",
            [7000215],
        ),
        (UpstreamError("unexpected"), 502, "server_error", []),
        (TemporarilyUnavailableError("down", retry_after=7), 503, "temporarily_unavailable", []),
        (
            ThrottledError("throttled", retry_after=7, aadsts="AADSTS90055"),
            503,
            "temporarily_unavailable",
            [90055],
        ),
        # The broker refused: OAuth codes, no AADSTS number.
        (InvalidClientError("unknown caller"), 401, "invalid_client", []),
        (InvalidRequestError("malformed"), 400, "invalid_request", []),
        (PayloadTooLargeError("too big"), 413, "invalid_request", []),
        (AccessDeniedError("tenant not allowed"), 400, "unauthorized_client", []),
        (
            AccessDeniedError("resource not allowed", allowed_resources=["https://a"]),
            400,
            "invalid_scope",
            [],
        ),
        (UnauthorizedClientError("unknown app"), 400, "unauthorized_client", []),
        (InvalidScopeError("bad scope"), 400, "invalid_scope", []),
        (UnsupportedGrantTypeError("password"), 400, "unsupported_grant_type", []),
    ],
)
def test_entra_answer_for_each_broker_error(
    exc: BrokerError, status: int, error: str, codes: list[int]
) -> None:
    """Each error becomes Entra's status, OAuth code and error_codes; a description starts with
    ``AADSTSnnnn: `` exactly when there is an AADSTS number, and consent_url travels along."""
    request = make_mocked_request("POST", "/t/oauth2/v2.0/token", headers={"client-request-id": "abc-123"})
    assert (status, error) == entra_status_and_error(exc)
    body = entra_error_body(exc, request, "https://login.microsoftonline.com")
    assert (error, codes, "abc-123") == (body["error"], body["error_codes"], body["correlation_id"])
    assert body["error_description"].startswith(f"AADSTS{codes[0]}: " if codes else exc.description)
    assert ("consent_url" in body) == (exc.consent_url is not None)
    assert ("error_uri" in body) == bool(codes)


def test_a_junk_client_request_id_is_not_echoed() -> None:
    """Only a sane client-request-id is echoed as correlation_id; anything else gets a fresh one."""
    request = make_mocked_request("POST", "/", headers={"client-request-id": "<script>" + "x" * 300})
    body = entra_error_body(InvalidRequestError("x"), request, "https://login.microsoftonline.com")
    assert "<script>" not in body["correlation_id"]
    assert "<script>" not in body["error_description"]


def test_discovery_document_names_the_broker_and_entras_keys() -> None:
    """token/authorization endpoints and issuer are the broker's; the signing keys are Entra's."""
    v2 = openid_configuration(
        "https://broker:8443", "contoso.onmicrosoft.com", "https://login.microsoftonline.us", v2=True
    )
    assert "https://broker:8443/contoso.onmicrosoft.com/oauth2/v2.0/token" == v2["token_endpoint"]
    assert "https://broker:8443/contoso.onmicrosoft.com/v2.0" == v2["issuer"]
    assert "https://login.microsoftonline.us/contoso.onmicrosoft.com/discovery/v2.0/keys" == v2["jwks_uri"]
    v1 = openid_configuration(
        "https://broker:8443", "t.example.com", "https://login.microsoftonline.com", v2=False
    )
    assert "https://broker:8443/t.example.com/oauth2/token" == v1["token_endpoint"]
