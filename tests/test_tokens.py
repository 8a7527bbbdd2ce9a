"""Token value types: claims decoding, remaining lifetime, refresh rule, hidden repr."""

from __future__ import annotations

import base64
import json

from broker.tokens import AccessToken, decode_claims, refresh_margin_seconds, schedule_refresh


def jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_from_jwt_reads_claims_and_hides_the_token() -> None:
    """tid, roles and uti come from the claims; repr never shows the token."""
    raw = jwt({"tid": "t-1", "roles": ["Incident.Read.All"], "uti": "u-1"})
    token = AccessToken.from_jwt(raw, expires_in=3600, resource="https://r", now=1000.0)
    assert ("t-1", ("Incident.Read.All",), "u-1", 4600.0) == (
        token.tenant_id,
        token.roles,
        token.uti,
        token.expires_on,
    )
    assert raw not in repr(token)
    wanted = ("Incident.Read.All", "AdvancedHunting.Read.All")
    assert ["AdvancedHunting.Read.All"] == token.missing_roles(wanted)


def test_decode_claims_tolerates_garbage() -> None:
    """Non-JWT strings decode to no claims instead of raising."""
    assert {} == decode_claims("not-a-jwt")
    assert {} == decode_claims("a.!!!.c")


def test_valid_for_honours_min_ttl() -> None:
    """A token with 200 s left does not satisfy a 300 s min_ttl."""
    token = AccessToken(token="t", expires_on=1200.0, tenant_id="t", resource="r")
    assert token.valid_for(200, now=1000.0)
    assert not token.valid_for(300, now=1000.0)


def test_refresh_rule() -> None:
    """A third of the lifetime, at least 10 min, at most half: 20 min for 1 h, 30 s for 60 s."""
    assert 1200 == refresh_margin_seconds(3600)
    assert 600 == refresh_margin_seconds(1500)
    assert 30 == refresh_margin_seconds(60)
    token = AccessToken(token="t", expires_on=4600.0, tenant_id="t", resource="r")
    scheduled = schedule_refresh(token, now=1000.0, jitter_unit=0.0)
    assert 4600.0 - 1200 == scheduled.refresh_on
    jittered = schedule_refresh(token, now=1000.0, jitter_unit=0.999)
    assert 4600.0 - 1200 - 180 < jittered.refresh_on < scheduled.refresh_on
