"""Caller authentication by API-key hash and by service-account JWT, and the tenant/app policy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from broker.callers import Caller, CallerRegistry, hash_api_key, new_api_key
from broker.config import Settings, parse_settings
from broker.errors import AccessDeniedError, InvalidClientError
from broker.oidc import JwksFetcher

KEY, HASH = new_api_key()
ISSUER = "https://oidc.cluster.example/issuer"
ACCOUNT = "system:serviceaccount:security:siem-connector"


def settings(jwks_file: Path | None = None, refresh_min: float = 0) -> Settings:
    raw: dict[str, Any] = {
        "apps": {
            "a": {
                "client_id": "11111111-2222-3333-4444-555555555555",
                "credential": {"env": "X"},
                "resources": ["https://api.security.microsoft.com"],
            },
            "b": {
                "client_id": "11111111-2222-3333-4444-555555555556",
                "credential": {"env": "X"},
                "resources": ["https://api.security.microsoft.com"],
            },
        },
        "callers": {
            "soar": {"api_key_sha256": HASH, "tenants": ["Contoso.onmicrosoft.com"], "apps": ["a"]},
            "siem": {"service_account": ACCOUNT, "tenants": ["*"], "apps": ["b"]},
        },
        "service_account_auth": {
            "issuer": ISSUER,
            "audience": "token-broker",
            "jwks_file": str(jwks_file or "/nonexistent"),
            "jwks_refresh_min_seconds": refresh_min,
        },
    }
    return parse_settings(raw, environ={})


class CountingSource:
    """A real file-backed JWKS source that counts its reads."""

    def __init__(self, inner: JwksFetcher) -> None:
        self.inner = inner
        self.reads = 0

    async def fetch(self) -> dict[str, Any]:
        self.reads += 1
        return await self.inner.fetch()


class Issuer:
    """A local service-account token issuer: real RSA and EC keys, a JWKS file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, Any] = {}

    def add_key(self, kid: str, kind: str = "RS256") -> None:
        self.keys[kid] = (
            (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                if kind == "RS256"
                else ec.generate_private_key(ec.SECP256R1())
            ),
            kind,
        )
        self.write()

    def write(self) -> None:
        jwks = []
        for kid, (key, kind) in self.keys.items():
            jwk = jwt.algorithms.get_default_algorithms()[kind].to_jwk(key.public_key(), as_dict=True)
            jwks.append({**jwk, "kid": kid, "use": "sig", "alg": kind})
        self.path.write_text(json.dumps({"keys": jwks}))

    def token(
        self,
        kid: str,
        *,
        sub: str = ACCOUNT,
        aud: str = "token-broker",
        exp_in: int = 600,
        forged: bool = False,
    ) -> str:
        key, kind = self.keys[kid]
        if forged:  # same kid and algorithm, but a key the issuer never published
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": sub, "aud": [aud], "iat": now, "nbf": now, "exp": now + exp_in}
        return jwt.encode(claims, key, algorithm=kind, headers={"kid": kid})


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    issuer = Issuer(tmp_path / "jwks.json")
    issuer.add_key("rsa-1", "RS256")
    issuer.add_key("ec-1", "ES256")
    return issuer


def registry(issuer: Issuer, refresh_min: float = 0) -> tuple[CallerRegistry, CountingSource]:
    config = settings(issuer.path, refresh_min)
    assert config.service_account_auth is not None
    source = CountingSource(JwksFetcher(config.service_account_auth, None))
    return CallerRegistry(config, source), source


async def test_known_key_authenticates(issuer: Issuer) -> None:
    """The caller whose hash matches the presented key is returned."""
    assert "soar" == (await registry(issuer)[0].authenticate(f"Bearer {KEY}")).name
    assert HASH == hash_api_key(KEY)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer wrong", "Bearer " + "x" * 9000])
async def test_bad_credentials_are_invalid_client(issuer: Issuer, header: str | None) -> None:
    """Missing, malformed, unknown or oversized credentials are 401 invalid_client."""
    with pytest.raises(InvalidClientError) as info:
        await registry(issuer)[0].authenticate(header)
    assert 401 == info.value.status
    assert "WWW-Authenticate" in info.value.headers()


async def test_policy_limits_tenants_and_apps(issuer: Issuer) -> None:
    """A caller reaches its tenants (any case) through its apps, and nothing else."""
    caller = await registry(issuer)[0].authenticate(f"Bearer {KEY}")
    caller.check(tenant="contoso.onmicrosoft.com", app="a")
    with pytest.raises(AccessDeniedError):
        caller.check(tenant="fabrikam.onmicrosoft.com", app="a")
    with pytest.raises(AccessDeniedError):
        caller.check(tenant="contoso.onmicrosoft.com", app="b")


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
async def test_service_account_tokens_rs256_and_es256(issuer: Issuer, kid: str) -> None:
    """A valid projected token maps its sub to the configured caller; a repeat is served from the
    verified cache without reading the keys again."""
    reg, source = registry(issuer)
    token = issuer.token(kid)
    assert "siem" == (await reg.authenticate(f"Bearer {token}")).name
    assert "siem" == (await reg.authenticate(f"Bearer {token}")).name
    assert 1 == source.reads


async def test_known_bearer_answers_only_what_authenticate_would_accept(issuer: Issuer) -> None:
    """The one-hash lookup of the cache-hit path: an exact ``Bearer <key>``, or a service-account
    token once ``authenticate`` verified it and until it expires; ``None`` (left to ``authenticate``)
    for every other spelling, valid or not, and it remembers nothing by itself."""
    reg, _ = registry(issuer)
    assert "soar" == (reg.known_bearer(f"Bearer {KEY}") or Caller("-", frozenset(), frozenset())).name
    for other in (
        None,
        "",
        f"bearer {KEY}",
        f"Bearer  {KEY}",
        f"Bearer {KEY} ",
        "Bearer wrong",
        "Bearer \udcff",
    ):
        assert reg.known_bearer(other) is None, other
    token = issuer.token("rsa-1")
    assert reg.known_bearer(f"Bearer {token}") is None  # never verified here: authenticate's job
    assert "siem" == (await reg.authenticate(f"Bearer {token}")).name
    assert "siem" == (reg.known_bearer(f"Bearer {token}") or Caller("-", frozenset(), frozenset())).name
    expired = issuer.token("rsa-1", exp_in=-3600)
    assert reg.known_bearer(f"Bearer {expired}") is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda i: i.token("rsa-1", aud="someone-else"), "audience"),
        (lambda i: i.token("rsa-1", exp_in=-120), "expired"),
        (lambda i: i.token("rsa-1", forged=True), "rejected"),
        (lambda i: i.token("rsa-1", sub="system:serviceaccount:other:intruder"), "not a configured caller"),
        (lambda i: i.token("rsa-1")[:-4] + "AAAA", "rejected"),
        (lambda _: "a.b.c", "not a valid JWT"),
    ],
)
async def test_bad_service_account_tokens(issuer: Issuer, make: Any, message: str) -> None:
    """Wrong audience, expired, bad signature, unknown account, tampering: 401 naming the check."""
    with pytest.raises(InvalidClientError) as info:
        await registry(issuer)[0].authenticate(f"Bearer {make(issuer)}")
    assert message in info.value.description


async def test_rotated_signing_key_is_fetched_once_and_rate_limited(issuer: Issuer) -> None:
    """A token signed by a new key refreshes the JWKS once; unknown kids within the refresh interval
    do not re-read it."""
    reg, source = registry(issuer, refresh_min=60)
    await reg.authenticate(f"Bearer {issuer.token('rsa-1')}")
    assert 1 == source.reads
    issuer.add_key("rsa-2")  # rotation: the cluster starts signing with a new key
    with pytest.raises(InvalidClientError, match="unknown key"):
        await reg.authenticate(f"Bearer {issuer.token('rsa-2')}")  # within 60 s of the last read
    assert 1 == source.reads
    reg2, source2 = registry(issuer, refresh_min=0)
    await reg2.authenticate(f"Bearer {issuer.token('rsa-1')}")
    issuer.add_key("rsa-3")
    assert "siem" == (await reg2.authenticate(f"Bearer {issuer.token('rsa-3')}")).name
    assert 2 == source2.reads


# aiohttp decodes header bytes as UTF-8 with surrogateescape, so bytes that are not UTF-8 reach
# authenticate() as lone surrogates (U+DC80..U+DCFF), which str.encode() refuses.
NON_UTF8 = [
    pytest.param(b"Bearer \xff\xfe\xfd".decode("utf-8", "surrogateescape"), id="api-key-bytes"),
    pytest.param(b"Bearer tbk_\xc3\x28abc".decode("utf-8", "surrogateescape"), id="broken-sequence"),
    pytest.param(b"Bearer a.b\x80.c".decode("utf-8", "surrogateescape"), id="jwt-shaped-bytes"),
    pytest.param("Bearer caf\u00e9", id="non-ascii-utf8"),
]


@pytest.mark.parametrize("header", NON_UTF8)
async def test_non_utf8_or_non_ascii_credentials_are_invalid_client(issuer: Issuer, header: str) -> None:
    """A Bearer credential holding bytes that are not UTF-8 (as aiohttp hands them over: surrogate
    escapes) or any non-ASCII character is a 401 invalid_client, not a UnicodeEncodeError (500)."""
    with pytest.raises(InvalidClientError) as info:
        await registry(issuer)[0].authenticate(header)
    assert (401, "invalid_client") == (info.value.status, info.value.error)


def _token_signed_as(issuer: Issuer, algorithm: str, kid: str) -> str:
    """A well-formed service-account token whose header claims ``algorithm`` and ``kid``, signed with the
    issuer's RSA key for ``kid`` when both are RSA, else with a fresh key of the kind the algorithm needs."""
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": ACCOUNT, "aud": ["token-broker"], "iat": now, "exp": now + 600}
    keys: dict[str, Any] = {
        "HS256": "k" * 32,
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "PS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    key, kind = issuer.keys[kid]
    if algorithm[0] in "RP" and kind[0] in "RP":
        keys[algorithm] = key  # the issuer's RSA key: only the alg it declares can refuse this token
    return jwt.encode(claims, keys[algorithm], algorithm=algorithm, headers={"kid": kid})


@pytest.mark.parametrize(
    ("algorithm", "kid"),
    [
        ("ES256", "rsa-1"),  # allowed algorithm, but the kid names an RSA key
        ("PS256", "ec-1"),  # allowed algorithm, but the kid names an EC key
        ("RS256", "ec-1"),
        ("HS256", "rsa-1"),  # never allowed: HMAC with the public key as the secret
        ("ES384", "ec-1"),  # EC, but the key is P-256
        ("PS256", "rsa-1"),  # RSA, but the JWKS entry declares alg RS256
    ],
)
async def test_algorithm_that_does_not_fit_the_key_is_invalid_client(
    issuer: Issuer, algorithm: str, kid: str
) -> None:
    """A service-account token whose header ``alg`` does not fit the key its ``kid`` names (key type,
    curve, or the alg the JWKS declares for it) is a 401 invalid_client, never a TypeError (500)."""
    config = settings(issuer.path)
    assert config.service_account_auth is not None
    everything = config.service_account_auth.model_copy(
        update={"algorithms": ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]}
    )
    config = config.model_copy(update={"service_account_auth": everything})
    reg = CallerRegistry(config, JwksFetcher(everything, None))
    with pytest.raises(InvalidClientError) as info:
        await reg.authenticate(f"Bearer {_token_signed_as(issuer, algorithm, kid)}")
    assert (401, "invalid_client") == (info.value.status, info.value.error)


@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_any_header_bytes_are_invalid_client(issuer: Issuer, parts: list[bytes]) -> None:
    """Whatever bytes follow `Bearer ` (decoded as aiohttp does; JWT-shaped when they come in three
    dot-separated parts), authenticate raises InvalidClientError, never another exception (a 500)."""
    credential = b".".join(parts).decode("utf-8", "surrogateescape")
    with pytest.raises(InvalidClientError):
        asyncio.run(registry(issuer)[0].authenticate(f"Bearer {credential}"))
