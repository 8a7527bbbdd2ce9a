"""Value types: what a caller asks for, the cache key it maps to, and the token handed back.

``AccessToken`` hides the token from ``repr`` and exposes a short SHA-256 fingerprint for logs. Claims
are decoded *without* signature verification: the token is Entra's, meant for the resource, and we
read it only to report ``tid``, ``roles`` and ``uti``; the issuer's signature is the resource's
business.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

DEFAULT_MIN_TTL_SECONDS = 300
MAX_MIN_TTL_SECONDS = 3000


class TokenKey(NamedTuple):
    """One cache entry: tokens are never shared across app, tenant or resource.

    A named tuple, not a dataclass: it is built and hashed on every request, and a tuple's
    construction and hash are C code (a frozen dataclass hashes a fresh tuple of its fields)."""

    app: str
    tenant: str  # the tenant's GUID (lower-cased), or the requested spelling without a directory
    resource: str


class TokenRequest(NamedTuple):
    """A validated ``POST /v1/token`` body (a named tuple for the reason ``TokenKey`` is one)."""

    tenant: str
    resource: str
    app: str | None = None
    roles: tuple[str, ...] = ()
    min_ttl_seconds: int = DEFAULT_MIN_TTL_SECONDS


def fingerprint(secret: str | bytes) -> str:
    """A short, non-reversible label for a token, secret or key: safe for logs."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()[:12]


def decode_claims(token: str) -> dict[str, Any]:
    """The JWT payload as a dict, unverified; ``{}`` when the token is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An Entra access token with what the broker needs to know about it."""

    token: str = field(repr=False)
    expires_on: float
    tenant_id: str
    resource: str
    roles: tuple[str, ...] = ()
    uti: str | None = None
    fingerprint: str = ""
    refresh_on: float = 0.0  # when a background refresh should replace it (0: not scheduled yet)

    @classmethod
    def from_jwt(
        cls, token: str, *, expires_in: float, resource: str, now: float | None = None
    ) -> AccessToken:
        """Build from an Entra response: lifetime from ``expires_in`` (FIELD-NOTES #7), rest from claims."""
        now = time.time() if now is None else now
        claims = decode_claims(token)
        roles = claims.get("roles") or ()
        return cls(
            token=token,
            expires_on=now + float(expires_in),
            tenant_id=str(claims.get("tid", "")),
            resource=resource,
            roles=tuple(str(role) for role in roles) if isinstance(roles, list) else (),
            uti=str(claims["uti"]) if "uti" in claims else None,
            fingerprint=fingerprint(token),
        )

    def remaining_seconds(self, now: float | None = None) -> float:
        return self.expires_on - (time.time() if now is None else now)

    def valid_for(self, min_ttl_seconds: float, now: float | None = None) -> bool:
        """True when the token stays valid for at least ``min_ttl_seconds`` more."""
        return self.remaining_seconds(now) >= min_ttl_seconds

    def missing_roles(self, wanted: tuple[str, ...]) -> list[str]:
        return [role for role in wanted if role not in self.roles]

    def to_record(self) -> dict[str, Any]:
        """The serialisable form stored (sealed) in the shared cache."""
        return {
            "access_token": self.token,
            "expires_on": self.expires_on,
            "tenant_id": self.tenant_id,
            "resource": self.resource,
            "roles": list(self.roles),
            "uti": self.uti,
            "refresh_on": self.refresh_on,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> AccessToken:
        token = str(record["access_token"])
        return cls(
            token=token,
            expires_on=float(record["expires_on"]),
            tenant_id=str(record["tenant_id"]),
            resource=str(record["resource"]),
            roles=tuple(record.get("roles") or ()),
            uti=record.get("uti"),
            fingerprint=fingerprint(token),
            refresh_on=float(record.get("refresh_on") or 0.0),
        )


REFRESH_MIN_MARGIN_SECONDS = 600.0
REFRESH_JITTER_FRACTION = 0.05


def refresh_margin_seconds(lifetime_seconds: float) -> float:
    """How long before expiry a token is refreshed in the background.

    A third of the lifetime but at least 10 minutes, and never more than half the lifetime (so short
    tokens are not refreshed continuously): 20 min for a 60-min token, 30 s for a 60-s test token.
    """
    return min(max(REFRESH_MIN_MARGIN_SECONDS, lifetime_seconds / 3), lifetime_seconds / 2)


def schedule_refresh(token: AccessToken, *, now: float, jitter_unit: float) -> AccessToken:
    """``token`` with ``refresh_on`` set: expiry minus the margin, minus up to 5 % jitter.

    ``jitter_unit`` is a number in [0, 1); the jitter spreads refreshes of tokens acquired together
    (a cold start) so they do not all hit Entra in the same second an hour later.
    """
    lifetime = max(0.0, token.expires_on - now)
    margin = refresh_margin_seconds(lifetime)
    jitter = lifetime * REFRESH_JITTER_FRACTION * jitter_unit
    return replace(token, refresh_on=token.expires_on - margin - jitter)
