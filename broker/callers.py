"""Caller authentication (API keys) and policy: which tenants and apps a caller may ask for.

API keys are stored only as SHA-256 hashes. Authentication hashes the presented key once and looks
the hash up; the dictionary lookup reveals nothing useful by timing (an attacker cannot steer the
hash), and the final comparison is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from broker.config import CallerSettings, Settings
from broker.errors import AccessDeniedError, InvalidClientError

MAX_API_KEY_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    tenants: frozenset[str]  # lower-cased; "*" means every tenant
    apps: frozenset[str]

    def check(self, *, tenant: str, app: str) -> None:
        """Raise ``AccessDeniedError`` unless this caller may ask for ``tenant`` through ``app``."""
        if "*" not in self.tenants and tenant.lower() not in self.tenants:
            raise AccessDeniedError(f"caller {self.name!r} may not request tokens for tenant {tenant}")
        if "*" not in self.apps and app not in self.apps:
            raise AccessDeniedError(f"caller {self.name!r} may not use app {app!r}")


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh caller key and the hash that goes in the config."""
    key = "tbk_" + secrets.token_urlsafe(32)
    return key, hash_api_key(key)


class CallerRegistry:
    """Maps presented API keys to configured callers."""

    def __init__(self, settings: Settings) -> None:
        self._by_hash: dict[str, tuple[str, Caller]] = {
            caller.api_key_sha256: (caller.api_key_sha256, _caller(name, caller))
            for name, caller in settings.callers.items()
        }

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization: Bearer <key>`` header, or ``InvalidClientError``."""
        if not authorization:
            raise InvalidClientError("missing Authorization: Bearer credential")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise InvalidClientError("Authorization must be a Bearer credential")
        if len(credential) > MAX_API_KEY_LENGTH:
            raise InvalidClientError("unknown caller credential")
        presented = hash_api_key(credential)
        entry = self._by_hash.get(presented)
        if entry is None or not hmac.compare_digest(entry[0], presented):
            raise InvalidClientError("unknown caller credential")
        return entry[1]


def _caller(name: str, settings: CallerSettings) -> Caller:
    return Caller(name=name, tenants=frozenset(settings.tenants), apps=frozenset(settings.apps))
