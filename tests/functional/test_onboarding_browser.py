"""Onboarding in a real headless browser (Debian's chromium + chromium-driver, driven by selenium): open
the invite, choose Accept or Cancel on the emulator's admin-consent page, land on the broker's page.

Trust, deliberately narrow: the broker's public pages are served over plain http on loopback (which
``public_base_url`` allows only there, and which Chromium treats as a secure context), so nothing about
them needs trusting; the emulator (Entra ID) is https with a throwaway trustme CA that Chromium does
not know. Rather than ``--ignore-certificate-errors`` (any certificate, any host), Chromium is told to
accept exactly the emulator's server key: ``--ignore-certificate-errors-spki-list`` with the SHA-256
of its SubjectPublicKeyInfo, honoured only with a ``--user-data-dir`` (a fresh one per browser).

Each outcome page is saved as a PNG under ``test-artefacts/onboarding/`` (not committed) for a person
to look at. Skipped, saying why, only where the browser or its driver is not installed.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.onboarding import STATE_TTL_SECONDS
from tests.functional.conftest import APP_ID, DEFENDER, ROLES, TENANT_UNCONSENTED, World
from tests.functional.test_onboarding import Onboard, StartOnboarding, start_onboarding

webdriver: Any = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)

__all__ = ["start_onboarding"]  # the fixture, shared with the HTTP-level tests

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTEFACTS = Path(__file__).resolve().parents[2] / "test-artefacts" / "onboarding"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are not installed (Debian: apt-get install chromium "
    "chromium-driver; `make install` runs scripts/install-system-deps.sh test, as root)",
)


def _spki_sha256(base_url: str) -> str:
    """Base64 SHA-256 of the SubjectPublicKeyInfo of the certificate ``base_url`` serves."""
    parts = urllib.parse.urlsplit(base_url)
    pem = ssl.get_server_certificate((parts.hostname or "127.0.0.1", parts.port or 443))
    public_key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def browser(world: World, tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium on a fresh profile, offline-friendly, trusting exactly the emulator's key."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1000,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--ignore-certificate-errors-spki-list={_spki_sha256(world.emulator.base_url)}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTEFACTS / f"{name}.png"))


def page_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def consent_in_emulator(driver: Any, onboard: Onboard, choice: str) -> None:
    """Open the invite, check that the emulator's page is Entra's admin consent for our app and
    tenant, and press ``choice`` ("Accept" or "Cancel")."""
    from selenium.webdriver.common.by import By

    driver.get(onboard.invite_url())
    assert driver.current_url.startswith(
        f"{onboard.world.emulator.base_url}/{TENANT_UNCONSENTED}/v2.0/adminconsent"
    )
    text = page_text(driver)
    assert "Permissions requested" in text
    assert APP_ID in text
    for role in ROLES:
        assert role in text
    screenshot(driver, "emulator_consent")
    driver.find_element(By.XPATH, f"//button[normalize-space()='{choice}']").click()
    wait_for_broker_page(driver, onboard)


def wait_for_broker_page(driver: Any, onboard: Onboard) -> None:
    """Until the browser shows the broker's callback page (the proof may take seconds)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def arrived(current: Any) -> bool:
        if not current.current_url.startswith(onboard.callback_url):
            return False
        return bool("complete" == current.execute_script("return document.readyState"))

    WebDriverWait(driver, 120, poll_frequency=0.2).until(arrived)


def test_accept_connects_the_tenant(browser: Any, start_onboarding: StartOnboarding) -> None:
    """Accept → the broker's "connected" page naming the tenant, app and roles; the recorder saw the
    tenant ready, the tenant registry says ready, and the next token request for it succeeds."""
    onboard = start_onboarding()
    consent_in_emulator(browser, onboard, "Accept")
    assert browser.current_url.startswith(onboard.callback_url)
    text = page_text(browser)
    screenshot(browser, "connected")
    assert "Your organization is connected" in text
    assert TENANT_UNCONSENTED in text
    assert APP_ID in text
    for role in ROLES:
        assert role in text
    assert "en" == browser.find_element("tag name", "html").get_attribute("lang")
    assert "access_token" not in browser.page_source
    proof = onboard.recorder.latest(TENANT_UNCONSENTED, "defender", DEFENDER)
    assert proof is not None
    assert ("ready", tuple(ROLES), ()) == (proof.state, proof.roles_granted, proof.missing_roles)
    token = onboard.token(TENANT_UNCONSENTED)
    assert 200 == token.status_code, token.text
    assert TENANT_UNCONSENTED == token.json()["tenant_id"]
    # ...and the tenant registry (what `token-broker tenants show` reads) has it ready.
    entry = requests.get(
        f"{onboard.url}/v1/tenants/{TENANT_UNCONSENTED}",
        headers={"Authorization": f"Bearer {onboard.admin_key}"},
        timeout=30,
    )
    assert 200 == entry.status_code, entry.text
    assert "ready" == entry.json()["apps"]["defender"][DEFENDER]["state"]

    # The same callback URL again (back button, a reload): "already used", nothing recorded anew.
    recorded = onboard.recorder.proofs()
    browser.refresh()
    assert "This link was already used" in page_text(browser)
    screenshot(browser, "used")
    assert recorded == onboard.recorder.proofs()


def test_missing_roles_are_named(browser: Any, start_onboarding: StartOnboarding) -> None:
    """When the consent grants fewer roles than the app requires, the page says connected, lists
    what was granted and names what is missing; the recorder says missing_roles."""
    onboard = start_onboarding()
    onboard.world.emulator.set_app_permissions(APP_ID, DEFENDER, ["Incident.Read.All"])
    consent_in_emulator_partial(browser, onboard)
    text = page_text(browser)
    screenshot(browser, "missing_roles")
    assert "Connected, but some permissions are missing" in text
    assert "AdvancedHunting.Read.All" in text.split("Still missing", 1)[1]
    proof = onboard.recorder.latest(TENANT_UNCONSENTED, "defender", DEFENDER)
    assert proof is not None
    assert ("missing_roles", ("AdvancedHunting.Read.All",)) == (proof.state, proof.missing_roles)


def consent_in_emulator_partial(driver: Any, onboard: Onboard) -> None:
    """Accept on a registration requesting only Incident.Read.All."""
    from selenium.webdriver.common.by import By

    driver.get(onboard.invite_url())
    assert "Incident.Read.All" in page_text(driver)
    driver.find_element(By.XPATH, "//button[normalize-space()='Accept']").click()
    wait_for_broker_page(driver, onboard)


def test_cancel_is_the_declined_page(browser: Any, start_onboarding: StartOnboarding) -> None:
    """Cancel → Entra redirects with admin_consent=True and error=access_denied: the declined page,
    offering to start again; nothing recorded, still no token."""
    onboard = start_onboarding()
    consent_in_emulator(browser, onboard, "Cancel")
    assert "admin_consent=True" in browser.current_url
    text = page_text(browser)
    screenshot(browser, "declined")
    assert "Consent was not granted" in text
    assert "access_denied, AADSTS65004" in text
    assert "Start again" in text
    assert [] == onboard.recorder.proofs()
    assert 403 == onboard.token(TENANT_UNCONSENTED).status_code


def test_propagation_delay_is_waited_out(browser: Any, start_onboarding: StartOnboarding) -> None:
    """A service principal that appears 4 s after consent: the callback keeps asking (700016 until
    then) and lands on the connected page."""
    onboard = start_onboarding()
    emulator = onboard.world.emulator
    emulator.set_consent_delay(4)
    consent_in_emulator(browser, onboard, "Accept")
    assert "Your organization is connected" in page_text(browser)
    refused = [r for r in emulator.requests("token", tenant=TENANT_UNCONSENTED) if r["status"] != 200]
    assert len(refused) >= 2


def test_propagation_beyond_the_wait_is_the_almost_there_page(
    browser: Any, start_onboarding: StartOnboarding
) -> None:
    """A service principal slower than the broker's wait: the "almost there" page with the invite to
    open again, and the recorder holds consent_required, not ready."""
    onboard = start_onboarding(consent_propagation_seconds=2)
    onboard.world.emulator.set_consent_delay(600)
    consent_in_emulator(browser, onboard, "Accept")
    text = page_text(browser)
    screenshot(browser, "propagating")
    assert "Microsoft is still setting up the connection" in text
    assert "Open the invitation again" in text
    proof = onboard.recorder.latest(TENANT_UNCONSENTED, "defender", DEFENDER)
    assert proof is not None
    assert "consent_required" == proof.state


def test_entra_failing_is_the_could_not_verify_page(browser: Any, start_onboarding: StartOnboarding) -> None:
    """Entra answering 503 to the proof (after the broker's own retries): the "could not verify" page
    saying so; the recorder holds error."""
    onboard = start_onboarding(upstream_retry_seconds=1)
    onboard.world.emulator.add_fault("token", "503", tenant=TENANT_UNCONSENTED, count=-1)
    consent_in_emulator(browser, onboard, "Accept")
    text = page_text(browser)
    screenshot(browser, "failed")
    assert "The connection could not be verified" in text
    assert "Microsoft Entra ID is busy or unreachable" in text
    proof = onboard.recorder.latest(TENANT_UNCONSENTED, "defender", DEFENDER)
    assert proof is not None
    assert "error" == proof.state


def test_bad_links_in_the_browser(browser: Any, start_onboarding: StartOnboarding) -> None:
    """What an administrator sees for an altered invite, an expired consent step and a response from
    another organization: error pages, nothing recorded."""
    onboard = start_onboarding()
    invite_url = onboard.invite_url()
    browser.get(invite_url[:-4] + "AAAA")
    assert "This link is not valid" in page_text(browser)
    screenshot(browser, "invalid")

    invite = onboard.signer.new_invite(TENANT_UNCONSENTED, "defender", DEFENDER, 86400, time.time())
    expired, _ = onboard.signer.new_state(invite, time.time() - STATE_TTL_SECONDS - 1)
    query = urllib.parse.urlencode({"admin_consent": "True", "tenant": TENANT_UNCONSENTED, "state": expired})
    browser.get(f"{onboard.callback_url}?{query}")
    assert "This link has expired" in page_text(browser)
    screenshot(browser, "expired")

    query = urllib.parse.urlencode(
        {
            "admin_consent": "True",
            "tenant": "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa",
            "state": onboard.fresh_state(),
        }
    )
    browser.get(f"{onboard.callback_url}?{query}")
    assert "another organization" in page_text(browser)
    assert [] == onboard.recorder.proofs()
