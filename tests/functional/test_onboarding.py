"""Onboarding over HTTP against the emulator and a real redis-server: the invite endpoint and CLI, the
redirect to Entra's admin-consent page, and every way a callback can be wrong (tampered, expired,
replayed, another tenant, a forged ``admin_consent=True``) — each an HTML page that changes nothing.

The broker runs in this process (its real application, on a loopback port) so that the test can hold
the ``ConsentRecorder`` the registry will implement and see exactly what was recorded. The browser
walks through the same stack in ``test_onboarding_browser.py``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.resources
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import yaml

from broker.app import create_app
from broker.callers import new_api_key
from broker.config import parse_settings
from broker.onboarding import STATE_TTL_SECONDS, LinkSigner, MemoryConsentRecorder
from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    DOMAIN_C,
    ROLES,
    TENANT_A,
    TENANT_C,
    TENANT_UNCONSENTED,
    World,
)
from tests.support import free_port, run_cli, serve_in_thread

SIGNING_KEY_NAME = "consent-signing-key"


@dataclass
class Onboard:
    """A broker with onboarding on, in this process, and what a test needs around it."""

    world: World
    url: str
    recorder: MemoryConsentRecorder
    admin_key: str
    signer: LinkSigner
    config: dict[str, Any]

    @property
    def callback_url(self) -> str:
        return f"{self.url}/consent/callback"

    def invite(
        self, tenant: str = TENANT_UNCONSENTED, key: str | None = None, **body: str
    ) -> requests.Response:
        return requests.post(
            f"{self.url}/v1/tenants/{tenant}/invite",
            json=body or None,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
            timeout=30,
        )

    def invite_url(self, tenant: str = TENANT_UNCONSENTED) -> str:
        response = self.invite(tenant)
        assert 201 == response.status_code, response.text
        return str(response.json()["url"])

    def start(self, invite_url: str) -> requests.Response:
        return requests.get(invite_url, allow_redirects=False, timeout=30)

    def fresh_state(self, tenant: str = TENANT_UNCONSENTED) -> str:
        """A genuine state, as /consent/start puts in the admin-consent link."""
        location = self.start(self.invite_url(tenant)).headers["Location"]
        return urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["state"][0]

    def callback(self, **params: str) -> requests.Response:
        return requests.get(self.callback_url, params=params, allow_redirects=False, timeout=120)

    def token(self, tenant: str) -> requests.Response:
        return requests.post(
            f"{self.url}/v1/token",
            json={"tenant": tenant, "resource": DEFENDER},
            headers={"Authorization": f"Bearer {self.world.soar_key}"},
            timeout=60,
        )


StartOnboarding = Callable[..., Onboard]


@pytest.fixture
def start_onboarding(
    world: World, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StartOnboarding]:
    """Start a broker with onboarding on: public pages over http on loopback (public_base_url), the
    signing key in the emulated Key Vault, an admin caller, the callback registered on the app, the
    Defender roles required. ``settings`` override the configuration."""
    stack = contextlib.ExitStack()

    def start(**settings: Any) -> Onboard:
        key = os.urandom(32)
        world.emulator.set_secret(SIGNING_KEY_NAME, base64.b64encode(key).decode())
        admin_key, admin_hash = new_api_key()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = world.broker_config(
            redis_url,
            public_base_url=url,
            consent_signing_key={"secret": SIGNING_KEY_NAME},
            **{"consent_propagation_seconds": 20, **settings},
        )
        config["callers"] = {
            **config["callers"],
            "onboarder": {
                "api_key_sha256": admin_hash,
                "tenants": ["*"],
                "apps": ["defender"],
                "admin": True,
            },
        }
        config["apps"]["defender"]["required_roles"] = {DEFENDER: ROLES}
        world.emulator.add_redirect_uri(APP_ID, f"{url}/consent/callback")
        for name, value in world.env.items():
            monkeypatch.setenv(name, value)
        recorder = MemoryConsentRecorder()
        app = create_app(parse_settings(config), consent_recorder=recorder)
        stack.enter_context(serve_in_thread(app, port))
        return Onboard(world, url, recorder, admin_key, LinkSigner(key), config)

    with stack:
        yield start


def assert_page(response: requests.Response, status: int, *texts: str) -> str:
    """An HTML page with the onboarding pages' security headers and the given texts."""
    assert status == response.status_code, response.text
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "DENY" == response.headers["X-Frame-Options"]
    assert "no-referrer" == response.headers["Referrer-Policy"]
    assert "no-store" == response.headers["Cache-Control"]
    assert "Location" not in response.headers
    for text in texts:
        assert text in response.text
    return response.text


# --- the invite ---------------------------------------------------------------------------------------


def test_only_admin_callers_get_invites(start_onboarding: StartOnboarding) -> None:
    """An admin caller gets a signed link on public_base_url that expires in 7 days; a caller
    without ``admin: true`` gets 403 access_denied, no credential 401; a verified domain is resolved
    to its tenant's GUID through the registry's resolver (the invite names the GUID) and a domain
    Entra does not know is 404 unknown_tenant."""
    onboard = start_onboarding()
    response = onboard.invite()
    assert 201 == response.status_code, response.text
    body = response.json()
    assert body["url"].startswith(f"{onboard.url}/consent/start?invite=v1.")
    expires = time.mktime(time.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(time.time() + 7 * 86400 - expires) < 60
    assert {"tenant": TENANT_UNCONSENTED, "app": "defender", "resource": DEFENDER}.items() <= body.items()
    document = json.loads(importlib.resources.files("broker").joinpath("openapi.json").read_bytes())
    schema = document["paths"]["/v1/tenants/{tenant}/invite"]["post"]["responses"]["201"]["content"]
    jsonschema.validate(body, schema["application/json"]["schema"])
    assert "no-store" == response.headers["Cache-Control"]
    refused = onboard.invite(key=onboard.world.soar_key)
    assert (403, "access_denied") == (refused.status_code, refused.json()["error"])
    anonymous = requests.post(f"{onboard.url}/v1/tenants/{TENANT_UNCONSENTED}/invite", timeout=10)
    assert 401 == anonymous.status_code
    by_domain = onboard.invite(DOMAIN_C)
    assert (201, TENANT_C) == (by_domain.status_code, by_domain.json()["tenant"])
    unknown = onboard.invite("contoso.onmicrosoft.com")
    assert (404, "unknown_tenant") == (unknown.status_code, unknown.json()["error"])
    assert 403 == onboard.invite(resource="https://graph.microsoft.com").status_code


def test_the_cli_prints_an_invite_that_starts_consent(
    start_onboarding: StartOnboarding, tmp_path: Path
) -> None:
    """``token-broker tenants invite T`` signs with the configured key: its link works on the broker."""
    onboard = start_onboarding()
    config_path = tmp_path / "broker.yaml"
    config_path.write_text(yaml.safe_dump(onboard.config), encoding="utf-8")
    result = run_cli(
        "tenants",
        "invite",
        TENANT_UNCONSENTED,
        "--config",
        str(config_path),
        env={**os.environ, **onboard.world.env},
    )
    assert 0 == result.returncode, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert TENANT_UNCONSENTED == printed["tenant"]
    assert 302 == onboard.start(printed["url"]).status_code


def test_start_redirects_to_entra_admin_consent(start_onboarding: StartOnboarding) -> None:
    """The invite's link redirects to ``{authority}/{tenant}/v2.0/adminconsent`` with the app's client
    id, ``{resource}/.default``, the registered callback and a fresh signed state; the redirect
    sends no referrer and is not cached."""
    onboard = start_onboarding()
    response = onboard.start(onboard.invite_url())
    assert 302 == response.status_code
    location = urllib.parse.urlsplit(response.headers["Location"])
    assert f"/{TENANT_UNCONSENTED}/v2.0/adminconsent" == location.path
    assert onboard.world.emulator.base_url == f"{location.scheme}://{location.netloc}"
    query = urllib.parse.parse_qs(location.query)
    assert [APP_ID] == query["client_id"]
    assert [f"{DEFENDER}/.default"] == query["scope"]
    assert [onboard.callback_url] == query["redirect_uri"]
    state = onboard.signer.open_state(query["state"][0])
    assert (TENANT_UNCONSENTED, "defender") == (state.invite.tenant, state.invite.app)
    assert abs(time.time() + STATE_TTL_SECONDS - state.expires_at) < 60
    assert "no-referrer" == response.headers["Referrer-Policy"]
    assert "no-store" == response.headers["Cache-Control"]


def test_bad_invites_are_error_pages_never_redirects(start_onboarding: StartOnboarding) -> None:
    """A missing, tampered, foreign-key or expired invite is an HTML 400 page, never a redirect."""
    onboard = start_onboarding()
    link = urllib.parse.parse_qs(urllib.parse.urlsplit(onboard.invite_url()).query)["invite"][0]
    other = LinkSigner(os.urandom(32))
    expired_signer_invite = onboard.signer.new_invite(
        TENANT_UNCONSENTED, "defender", DEFENDER, 60, time.time() - 61
    )
    cases = {
        "": "This link is not valid",
        link[:-3] + "AAA": "This link is not valid",
        other.sign_invite(
            other.new_invite(TENANT_UNCONSENTED, "defender", DEFENDER, 600, time.time())
        ): "not valid",
        onboard.signer.sign_invite(expired_signer_invite): "This invitation is no longer valid",
    }
    for invite, text in cases.items():
        response = requests.get(
            f"{onboard.url}/consent/start", params={"invite": invite}, allow_redirects=False, timeout=10
        )
        assert_page(response, 400, text)


# --- callbacks that must change nothing -----------------------------------------------------------------


def test_callbacks_that_do_not_verify_change_nothing(start_onboarding: StartOnboarding) -> None:
    """A tampered state, an expired state, a callback naming another tenant and one without
    admin_consent are error pages; none records anything or asks Entra for a token."""
    onboard = start_onboarding()
    emulator = onboard.world.emulator
    state = onboard.fresh_state()
    expired, _ = onboard.signer.new_state(
        onboard.signer.new_invite(TENANT_UNCONSENTED, "defender", DEFENDER, 86400, time.time()),
        time.time() - STATE_TTL_SECONDS - 1,
    )
    emulator.reset_counters()
    tampered = state[:-3] + ("AAA" if not state.endswith("AAA") else "BBB")
    assert_page(
        onboard.callback(admin_consent="True", tenant=TENANT_UNCONSENTED, state=tampered),
        400,
        "The response from Microsoft is incomplete or was altered",
    )
    assert_page(
        onboard.callback(admin_consent="True", tenant=TENANT_UNCONSENTED, state=expired),
        400,
        "This link has expired",
        "Start again",
    )
    assert_page(
        onboard.callback(admin_consent="True", tenant=TENANT_A, state=onboard.fresh_state()),
        400,
        "The consent was given in another organization",
    )
    assert_page(onboard.callback(tenant=TENANT_UNCONSENTED, state=onboard.fresh_state()), 400, "not valid")
    assert_page(onboard.callback(), 400, "not valid")
    assert [] == onboard.recorder.proofs()
    assert 0 == emulator.token_requests()


def test_a_replayed_state_is_refused(start_onboarding: StartOnboarding) -> None:
    """The first callback with a state is processed (here: declined); the same URL again is the
    "already used" page, across the shared Redis, and still records nothing."""
    onboard = start_onboarding()
    params = {
        "admin_consent": "True",
        "error": "access_denied",
        "error_description": "AADSTS65004: User declined to consent to access the app.",
        "state": onboard.fresh_state(),
    }
    assert_page(onboard.callback(**params), 200, "Consent was not granted", "access_denied, AADSTS65004")
    assert_page(onboard.callback(**params), 409, "already processed")
    assert [] == onboard.recorder.proofs()


def test_a_forged_success_does_not_mark_the_tenant_ready(start_onboarding: StartOnboarding) -> None:
    """``admin_consent=True&tenant=<the invite's GUID>`` with a genuine state, but no consent in
    Entra: the proof token is refused (700016) through the whole propagation wait, the page says
    Microsoft has not finished, and the recorder holds consent_required, never ready."""
    onboard = start_onboarding(consent_propagation_seconds=2)
    response = onboard.callback(admin_consent="True", tenant=TENANT_UNCONSENTED, state=onboard.fresh_state())
    assert_page(response, 202, "Microsoft is still setting up the connection")
    proof = onboard.recorder.latest(TENANT_UNCONSENTED, "defender", DEFENDER)
    assert proof is not None
    assert ("consent_required", "AADSTS700016") == (proof.state, proof.aadsts)
    assert onboard.world.emulator.token_requests(tenant=TENANT_UNCONSENTED) >= 2
    assert 403 == onboard.token(TENANT_UNCONSENTED).status_code
