"""Onboarding's signed links (invites and states), the single-use claim, and the pages' rendering, without
a server: tampering, expiry, a wrong key, purpose confusion and replay are all refused."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest

from broker.cache import TokenCache
from broker.config import CacheOptions, RedisOptions, parse_settings
from broker.errors import ConfigError, ConsentLinkError, CredentialLoadError
from broker.metrics import Metrics
from broker.onboarding import (
    STATE_TTL_SECONDS,
    ConsentState,
    Invite,
    LinkSigner,
    Outcome,
    Page,
    parse_signing_key,
)
from broker.pages import Templates, render

TENANT = "fa0fa0fa-0000-4000-8000-000000000002"
RESOURCE = "https://api.security.microsoft.com"
NOW = 1_800_000_000.0


def _signer(key: bytes | None = None) -> LinkSigner:
    return LinkSigner(key or os.urandom(32))


def _invite(signer: LinkSigner, ttl: int = 3600, now: float = NOW) -> Invite:
    return signer.new_invite(TENANT.upper(), "defender", RESOURCE, ttl, now)


def _tamper(link: str, part: int) -> str:
    """Flip one character of the payload (1) or signature (2)."""
    parts = link.split(".")
    text = parts[part]
    parts[part] = text[:-2] + ("A" if text[-2] != "A" else "B") + text[-1]
    return ".".join(parts)


def test_an_invite_round_trips_with_its_tenant_lower_cased() -> None:
    """A signed invite verifies to what was signed, and signing it again gives the same link."""
    signer = _signer()
    invite = _invite(signer)
    link = signer.sign_invite(invite)
    assert invite == signer.open_invite(link, NOW + 10)
    assert TENANT == invite.tenant
    assert link == signer.sign_invite(invite)


@pytest.mark.parametrize("part", [1, 2])
def test_a_tampered_invite_or_state_does_not_verify(part: int) -> None:
    """Changing one character of the payload or of the MAC is refused, and never called expired."""
    signer = _signer()
    invite = _invite(signer)
    state_link, _ = signer.new_state(invite, NOW)
    for opener in (
        lambda: signer.open_invite(_tamper(signer.sign_invite(invite), part), NOW),
        lambda: signer.open_state(_tamper(state_link, part)),
    ):
        with pytest.raises(ConsentLinkError) as info:
            opener()
        assert not info.value.expired


@pytest.mark.parametrize(
    "link", ["", "v1", "v1..", "v2.a.b", "v1.!!!.???", "v1." + "A" * 3000 + ".x", "v1.é.é", "v1.e30.e30"]
)
def test_malformed_links_are_refused(link: str) -> None:
    """Garbage, wrong versions, non-base64, non-ASCII and oversized links are refused cleanly."""
    with pytest.raises(ConsentLinkError):
        _signer().open_invite(link, NOW)
    with pytest.raises(ConsentLinkError):
        _signer().open_state(link)


def test_an_invite_expires() -> None:
    """Past its expiry a genuine invite is refused as expired (and a second earlier it was not)."""
    signer = _signer()
    invite = _invite(signer, ttl=60)
    link = signer.sign_invite(invite)
    signer.open_invite(link, NOW + 59)
    with pytest.raises(ConsentLinkError) as info:
        signer.open_invite(link, NOW + 60)
    assert info.value.expired


def test_a_state_lives_fifteen_minutes_and_names_its_invite() -> None:
    """A state carries its invite (tenant, app, resource, the invite's own expiry) and expires 15
    minutes after it was made; it is still readable then, so the page can offer to start again."""
    signer = _signer()
    invite = _invite(signer, ttl=7 * 86400)
    link, state = signer.new_state(invite, NOW)
    opened = signer.open_state(link)
    assert ConsentState(invite, state.state_id, int(NOW) + STATE_TTL_SECONDS) == opened
    assert 32 == len(opened.state_id)
    assert state.state_id != signer.new_state(invite, NOW)[1].state_id


def test_another_key_verifies_nothing() -> None:
    """Links signed under one key do not verify under another (a rotated or foreign key)."""
    signer, other = _signer(), _signer()
    invite = _invite(signer)
    state_link, _ = signer.new_state(invite, NOW)
    with pytest.raises(ConsentLinkError):
        other.open_invite(signer.sign_invite(invite), NOW)
    with pytest.raises(ConsentLinkError):
        other.open_state(state_link)


def test_an_invite_is_not_a_state_nor_the_reverse() -> None:
    """The purpose is part of the MAC: an invite presented as a state (or a state as an invite)
    does not verify, though both are signed with the same key."""
    signer = _signer()
    invite = _invite(signer)
    invite_link = signer.sign_invite(invite)
    state_link, _ = signer.new_state(invite, NOW)
    with pytest.raises(ConsentLinkError):
        signer.open_state(invite_link)
    with pytest.raises(ConsentLinkError):
        signer.open_invite(state_link, NOW)


def test_signing_keys_must_be_base64_of_at_least_32_bytes() -> None:
    """The key source is parsed strictly: short keys and non-base64 text are refused at load."""
    assert 48 == len(parse_signing_key(base64.b64encode(b"k" * 48).decode()))
    for bad in ("not base64!", base64.b64encode(b"k" * 16).decode()):
        with pytest.raises(CredentialLoadError):
            parse_signing_key(bad)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        LinkSigner(b"short")


async def test_a_state_is_claimed_once_in_process() -> None:
    """Without Redis the single-use claim is this process's: the second claim of an id is refused,
    another id is not."""
    cache = TokenCache(
        Metrics(), CacheOptions(l1_max_tokens=10, local_max_entries=10), redis=None, sealer=None
    )
    assert await cache.claim_once("state", "a" * 32, STATE_TTL_SECONDS)
    assert not await cache.claim_once("state", "a" * 32, STATE_TTL_SECONDS)
    assert await cache.claim_once("state", "b" * 32, STATE_TTL_SECONDS)


async def test_a_state_is_claimed_once_across_replicas(redis_url: str) -> None:
    """With Redis, a state claimed by one replica is refused by another (SET NX), and the claim
    expires with the state."""
    from broker.cache import connect_redis
    from broker.crypto import Sealer

    options = RedisOptions(url=redis_url, timeout_seconds=2, max_connections=4, pool_timeout_seconds=2)
    replicas = [
        TokenCache(
            Metrics(),
            CacheOptions(l1_max_tokens=10, local_max_entries=10),
            redis=connect_redis(options),
            sealer=Sealer(os.urandom(32)),
        )
        for _ in range(2)
    ]
    try:
        assert await replicas[0].claim_once("state", "c" * 32, 0.5)
        assert not await replicas[1].claim_once("state", "c" * 32, 0.5)
        assert not await replicas[0].claim_once("state", "c" * 32, 0.5)
        await asyncio.sleep(0.6)
        assert await replicas[1].claim_once("state", "c" * 32, 0.5)
    finally:
        for replica in replicas:
            await replica.close()


# --- configuration ------------------------------------------------------------------------------------


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "apps": {
            "defender": {
                "client_id": "11111111-2222-3333-4444-555555555555",
                "credential": {"env": "APP_SECRET"},
                "resources": [RESOURCE],
            }
        },
        "callers": {"a": {"api_key_sha256": "0" * 64, "tenants": ["*"], "apps": ["defender"], "admin": True}},
        **extra,
    }


def test_onboarding_settings_are_validated_together() -> None:
    """public_base_url and consent_signing_key come together; the URL is https (http on loopback
    only) without query; invite_ttl_seconds defaults to 7 days; required_roles name app resources."""
    settings = parse_settings(
        _config(public_base_url="http://127.0.0.1:8080/", consent_signing_key={"env": "K"}), {}
    )
    assert "http://127.0.0.1:8080" == settings.public_base_url
    assert 7 * 86400 == settings.invite_ttl_seconds
    assert settings.callers["a"].admin
    key = {"env": "K"}
    refused = [
        (_config(public_base_url="https://broker.example"), "consent_signing_key: required"),
        (_config(consent_signing_key=key), "public_base_url: required"),
        (
            _config(public_base_url="http://broker.example", consent_signing_key=key),
            "public_base_url: must be",
        ),
        (
            _config(public_base_url="https://b.example/?x=1", consent_signing_key=key),
            "public_base_url: must be",
        ),
        (_config(invite_ttl_seconds=10), "invite_ttl_seconds:"),
        (
            _config(
                apps={
                    "defender": {
                        **_config()["apps"]["defender"],
                        "required_roles": {"https://graph.microsoft.com": ["X"]},
                    }
                }
            ),
            "apps.defender.required_roles: 'https://graph.microsoft.com' is not one of the app's resources",
        ),
    ]
    for raw, expected in refused:
        with pytest.raises(ConfigError) as info:
            parse_settings(raw, {})
        assert expected in str(info.value)


# --- pages ----------------------------------------------------------------------------------------------


def test_pages_escape_everything_and_carry_the_security_headers() -> None:
    """Every value is HTML-escaped; the page has a language, no script, and headers that forbid
    framing, caching, referrers and any source but its own hashed style."""
    templates = Templates.load()
    outcome = Outcome(
        Page.MISSING_ROLES,
        "x",
        tenant=TENANT,
        app="defender",
        client_id="11111111-2222-3333-4444-555555555555",
        resource=RESOURCE,
        roles_granted=("<script>alert(1)</script>",),
        missing_roles=("AdvancedHunting.Read.All",),
    )
    response = render(templates, outcome)
    text = response.text or ""
    assert 200 == response.status
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert '<html lang="en">' in text
    assert "AdvancedHunting.Read.All" in text
    headers = response.headers
    assert "DENY" == headers["X-Frame-Options"]
    assert "no-referrer" == headers["Referrer-Policy"]
    assert "no-store" == headers["Cache-Control"]
    csp = headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; style-src 'sha256-")
    assert "frame-ancestors 'none'" in csp
    assert "text/html" == response.content_type


def test_every_page_renders() -> None:
    """Each outcome has its template and renders with or without an invite behind it."""
    templates = Templates.load()
    for page in Page:
        bare = render(templates, Outcome(page, "state: the state is malformed"))
        full = render(
            templates,
            Outcome(
                page, "r", tenant=TENANT, app="defender", resource=RESOURCE, restart_url="http://x/?a=1&b=2"
            ),
        )
        assert page.status == bare.status == full.status
        assert "$" not in (bare.text or "") + (full.text or "")
