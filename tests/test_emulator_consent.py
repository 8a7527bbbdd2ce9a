"""The emulator's v2 admin-consent page, driven over HTTP as a browser would (the real browser walks it in
tests/functional/test_onboarding_browser.py): Accept grants and redirects with the tenant, Cancel
redirects with ``error`` (and still ``admin_consent=True``), unregistered redirect URIs get an error page
and no redirect, and a propagation delay keeps the new service principal from the token endpoint."""

from __future__ import annotations

import html
import re
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import requests

from emulator import Emulator

PUBLISHER = "12121212-0000-4000-8000-000000000001"
TENANT = "34343434-0000-4000-8000-000000000002"
APP = "56565656-0000-4000-8000-000000000003"
SECRET = "app-secret"
XDR = "https://api.security.microsoft.com"
REDIRECT = "https://partner.example/consent/callback"


@pytest.fixture
def http(emulator: Emulator) -> Iterator[requests.Session]:
    with emulator.http_session() as session:
        yield session


@pytest.fixture
def app(emulator: Emulator) -> str:
    """A multi-tenant app requesting two XDR roles, with one registered redirect URI."""
    emulator.add_tenant(PUBLISHER)
    emulator.add_tenant(TENANT, ["customer.onmicrosoft.com"])
    emulator.add_app(APP, home_tenant=PUBLISHER, secret=SECRET)
    emulator.set_app_permissions(APP, XDR, ["Incident.Read.All", "AdvancedHunting.Read.All"])
    emulator.add_redirect_uri(APP, REDIRECT)
    return APP


def consent_page(
    emulator: Emulator, http: requests.Session, redirect_uri: str = REDIRECT
) -> requests.Response:
    query = urllib.parse.urlencode(
        {"client_id": APP, "scope": f"{XDR}/.default", "redirect_uri": redirect_uri, "state": "s-1"}
    )
    return http.get(f"{emulator.base_url}/{TENANT}/v2.0/adminconsent?{query}", timeout=10)


def choose(
    emulator: Emulator, http: requests.Session, page: requests.Response, action: str
) -> dict[str, str]:
    """Submit the page's form with ``action``; return the redirect's query."""
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text))
    form = {name: html.unescape(value) for name, value in fields.items()} | {"action": action}
    answer = http.post(page.url, data=form, allow_redirects=False, timeout=10)
    assert 302 == answer.status_code, answer.text
    location = urllib.parse.urlsplit(answer.headers["Location"])
    assert REDIRECT == f"{location.scheme}://{location.netloc}{location.path}"
    return dict(urllib.parse.parse_qsl(location.query))


def token_status(emulator: Emulator, http: requests.Session) -> tuple[int, list[int]]:
    form = {
        "grant_type": "client_credentials",
        "client_id": APP,
        "client_secret": SECRET,
        "scope": f"{XDR}/.default",
    }
    answer = http.post(emulator.token_url(TENANT), data=form, timeout=10)
    body = answer.json()
    return answer.status_code, body.get("error_codes", [])


def test_accept_grants_the_requested_roles_and_redirects_with_the_tenant(
    emulator: Emulator, app: str, http: requests.Session
) -> None:
    """The page lists what the app requests; Accept creates the service principal with those roles
    and redirects with admin_consent=True, the tenant GUID, the scope and the state."""
    page = consent_page(emulator, http)
    assert 200 == page.status_code
    assert "Permissions requested" in page.text
    assert "AdvancedHunting.Read.All" in page.text
    assert (400, [700016]) == token_status(emulator, http)
    assert {"admin_consent": "True", "tenant": TENANT, "scope": f"{XDR}/.default", "state": "s-1"} == choose(
        emulator, http, page, "accept"
    )
    assert 200 == token_status(emulator, http)[0]


def test_cancel_redirects_with_an_error_and_admin_consent_true(
    emulator: Emulator, app: str, http: requests.Session
) -> None:
    """Cancel: admin_consent=True (as Entra sends it) with error=access_denied and AADSTS65004, no
    tenant; nothing is granted."""
    query = choose(emulator, http, consent_page(emulator, http), "cancel")
    assert {"admin_consent": "True", "error": "access_denied", "state": "s-1"}.items() <= query.items()
    assert query["error_description"].startswith("AADSTS65004:")
    assert "tenant" not in query
    assert (400, [700016]) == token_status(emulator, http)


def test_an_unregistered_redirect_uri_is_an_error_page(
    emulator: Emulator, app: str, http: requests.Session
) -> None:
    """A redirect URI not registered on the app (exact match) is AADSTS50011 on a page, never a redirect."""
    page = consent_page(emulator, http, redirect_uri=REDIRECT + "/other")
    assert 400 == page.status_code
    assert "AADSTS50011" in page.text


def test_a_new_service_principal_appears_after_the_consent_delay(
    emulator: Emulator, app: str, http: requests.Session
) -> None:
    """With a consent delay the token endpoint keeps answering 700016 until the delay has passed."""
    emulator.set_consent_delay(1.5)
    choose(emulator, http, consent_page(emulator, http), "accept")
    assert (400, [700016]) == token_status(emulator, http)
    time.sleep(1.6)
    assert 200 == token_status(emulator, http)[0]
