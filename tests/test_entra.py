"""Entra's answers translated into the broker's errors: ``classify`` over every AADSTS code list, and
the parsers that pull codes, error names and Retry-After out of MSAL's dicts and exceptions."""

from __future__ import annotations

import itertools

import pytest

from broker.entra import (
    CONSENT_CODES,
    CREDENTIAL_CODES,
    DEFAULT_RETRY_AFTER_SECONDS,
    TENANT_PERMANENT_CODES,
    TRANSIENT_CODES,
    UNKNOWN_TENANT_CODES,
    EntraFailure,
    _code_in,
    _error_in,
    _failure_from_result,
    _parse_retry_after,
    classify,
    consent_url,
)
from broker.errors import (
    PERMANENT_TENANT_ERRORS,
    BrokerError,
    ConsentRequiredError,
    CredentialRejectedError,
    TemporarilyUnavailableError,
    TenantRefusedError,
    ThrottledError,
    UnknownTenantError,
    UpstreamError,
)

TENANT = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"
LINK = "https://login.example/consent"
CODE_LISTS: dict[str, tuple[frozenset[int], type[BrokerError]]] = {
    "consent": (CONSENT_CODES, ConsentRequiredError),
    "unknown_tenant": (UNKNOWN_TENANT_CODES, UnknownTenantError),
    "tenant_permanent": (TENANT_PERMANENT_CODES, TenantRefusedError),
    "credential": (CREDENTIAL_CODES, CredentialRejectedError),
    "transient": (TRANSIENT_CODES, TemporarilyUnavailableError),
}


def _classified(code: int | None, error: str = "invalid_request", status: int | None = None) -> BrokerError:
    return classify(EntraFailure(error, code, status), tenant=TENANT, consent_link=LINK)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(code, cls) for codes, cls in CODE_LISTS.values() for code in sorted(codes)],
    ids=lambda value: str(value) if isinstance(value, int) else value.__name__,
)
def test_every_listed_code_maps_to_its_error(code: int, expected: type[BrokerError]) -> None:
    """Each AADSTS code of each list becomes exactly that list's error, carrying the code."""
    error = _classified(code)
    assert expected is type(error)
    assert f"AADSTS{code}" == error.aadsts


def test_code_lists_do_not_overlap() -> None:
    """No code is in two lists (classify would silently pick whichever it checks first)."""
    for (a, (codes_a, _)), (b, (codes_b, _)) in itertools.combinations(CODE_LISTS.items(), 2):
        assert set() == codes_a & codes_b, (a, b)


def test_consent_errors_carry_the_link_and_are_remembered() -> None:
    """A consent refusal is 403 consent_required with the link; it and the other per-tenant
    refusals are the permanent errors the service remembers, a credential rejection is not."""
    error = _classified(65001)
    assert (403, "consent_required", LINK) == (error.status, error.error, error.consent_url)
    for code in (65001, 90002, 500011):
        assert isinstance(_classified(code), PERMANENT_TENANT_ERRORS)
    assert not isinstance(_classified(7000215), PERMANENT_TENANT_ERRORS)
    assert 404 == _classified(90002).status


@pytest.mark.parametrize(
    ("failure", "expected", "retry_after", "hinted"),
    [
        (EntraFailure("", None, 429, 7), ThrottledError, 7, True),
        (EntraFailure("", None, 429, None), ThrottledError, DEFAULT_RETRY_AFTER_SECONDS, False),
        (EntraFailure("", None, 503, 2), TemporarilyUnavailableError, 2, True),
        (EntraFailure("", None, 500, None), TemporarilyUnavailableError, DEFAULT_RETRY_AFTER_SECONDS, False),
        (EntraFailure("temporarily_unavailable", None), TemporarilyUnavailableError, 5, False),
        (EntraFailure("server_error", None), TemporarilyUnavailableError, 5, False),
        (EntraFailure("invalid_request", 90055), TemporarilyUnavailableError, 5, False),
    ],
)
def test_transient_failures_are_503_with_retry_after(
    failure: EntraFailure, expected: type[TemporarilyUnavailableError], retry_after: int, hinted: bool
) -> None:
    """429 is a ThrottledError (shared by replicas); 5xx, Entra's transient error names and codes
    are 503s; Retry-After is Entra's when it sent one (``hinted``), else a default."""
    error = classify(failure, tenant=TENANT, consent_link=LINK)
    assert expected is type(error)
    assert isinstance(error, TemporarilyUnavailableError)
    assert (503, retry_after, hinted) == (error.status, error.retry_after, error.hinted)
    assert {"Retry-After": str(retry_after)} == error.headers()


def test_a_listed_code_wins_over_the_http_status() -> None:
    """A consent refusal that came with a 5xx status is still a consent refusal."""
    assert ConsentRequiredError is type(_classified(65001, status=500))


@pytest.mark.parametrize(("error", "code"), [("invalid_request", None), ("invalid_scope", 70011), ("", None)])
def test_anything_else_is_a_502_naming_entras_error(error: str, code: int | None) -> None:
    """An unlisted answer is 502 upstream_error that names Entra's error code (never its text)."""
    classified = _classified(code, error)
    assert UpstreamError is type(classified)
    assert 502 == classified.status
    assert (error or "an unexpected response") in classified.description
    assert (f"AADSTS{code}" if code else None) == classified.aadsts


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"error": "invalid_client", "error_codes": [7000215]}, EntraFailure("invalid_client", 7000215)),
        ({"error": "invalid_client", "error_codes": ["7000222"]}, EntraFailure("invalid_client", 7000222)),
        (
            {"error": "invalid_request", "error_description": "AADSTS90002: Tenant 'x' not found."},
            EntraFailure("invalid_request", 90002),
        ),
        (
            {"error": "invalid_grant", "error_codes": ["n/a"], "error_description": "AADSTS65001: no"},
            EntraFailure("invalid_grant", 65001),
        ),
        ({"error": "unauthorized_client"}, EntraFailure("unauthorized_client", None)),
        ({}, EntraFailure("", None)),
    ],
)
def test_failure_from_msal_result(result: dict[str, object], expected: EntraFailure) -> None:
    """The code comes from ``error_codes`` when it holds digits, else from the description."""
    assert expected == _failure_from_result(result)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AADSTS700016: Application not found in the directory", 700016),
        ("Trace: ... AADSTS90002: Tenant 'contoso' not found", 90002),
        ("no code here", None),
        ("", None),
    ],
)
def test_code_in_text(text: str, expected: int | None) -> None:
    """The first AADSTS number in a text, if any."""
    assert expected == _code_in(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            (
                "Unable to get authority configuration for https://login/x. HTTP status: 400, "
                '{"error":"invalid_tenant","error_description":"AADSTS90002: Tenant not found."}'
            ),
            "invalid_tenant",
        ),
        ("Unable to get authority configuration", ""),
        ("HTTP status: 502, {not json", ""),
        ('HTTP status: 400, {"error_description": "no name"}', ""),
    ],
)
def test_error_in_discovery_failure(text: str, expected: str) -> None:
    """The OAuth error name from the JSON body MSAL quotes in a discovery ValueError; "" otherwise."""
    assert expected == _error_in(text)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("5", 5), ("2.5", 2), ("0", 1), ("-3", 1), ("soon", None), ("", None)],
)
def test_parse_retry_after(header: str | None, expected: int | None) -> None:
    """Retry-After seconds, at least 1; ``None`` when absent or not a number (the caller then
    uses a default wait)."""
    assert expected == _parse_retry_after(header)


@pytest.mark.parametrize("header", ["inf", "1e999"])
def test_parse_retry_after_survives_infinite_values(header: str) -> None:
    """A Retry-After of "inf" (a broken proxy, say) is not a number of seconds: ``None``."""
    assert _parse_retry_after(header) is None


def test_consent_url_is_the_v2_admin_consent_link() -> None:
    """The admin-consent link names the tenant, the client id and the resource's .default scope,
    query-encoded."""
    url = consent_url(
        "https://login.microsoftonline.com", TENANT, "app-id", "https://api.security.microsoft.com"
    )
    assert (
        f"https://login.microsoftonline.com/{TENANT}/v2.0/adminconsent?client_id=app-id"
        "&scope=https%3A%2F%2Fapi.security.microsoft.com%2F.default"
    ) == url
