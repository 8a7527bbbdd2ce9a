"""Key Vault-signed client assertions: what is signed, when a signature is reused, and that concurrent
requests for one tenant wait on one signature. The signer is a local RSA key behind the same
``Signer`` interface the Key Vault adapter implements."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from broker.assertions import (
    PUBLIC_EXCHANGE_AUDIENCE,
    SignedAssertions,
    SigningCertificate,
    exchange_audience,
    presented_claims,
)

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
ENDPOINT_A = "https://login.microsoftonline.com/aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa/oauth2/v2.0/token"
ENDPOINT_B = "https://login.microsoftonline.com/bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb/oauth2/v2.0/token"


class LocalVault:
    """Stands in for Key Vault's keys/sign: counts signatures, can be slowed down."""

    def __init__(self, delay_seconds: float = 0.0) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.delay_seconds = delay_seconds
        self.signatures = 0
        self.certificate = SigningCertificate(
            "https://vault/keys/signer/v1", hashlib.sha256(b"cert-v1").digest()
        )

    async def current(self) -> SigningCertificate:
        return self.certificate

    async def sign(self, key_id: str, digest: bytes) -> bytes:
        assert self.certificate.key_id == key_id
        await asyncio.sleep(self.delay_seconds)
        self.signatures += 1
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return self.key.sign(digest, pss, utils.Prehashed(hashes.SHA256()))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def signed_by(vault: LocalVault, clock: Clock | None = None) -> SignedAssertions:
    return SignedAssertions(CLIENT_ID, vault.current, vault.sign, clock=clock or Clock())


async def test_assertion_is_what_entra_expects_of_a_certificate_credential() -> None:
    """PS256 with x5t#S256 of the certificate; aud = the tenant's token endpoint, iss = sub = client
    id, a jti, ten minutes of life; the signature verifies with the key's public half."""
    vault = LocalVault()
    clock = Clock()
    assertion = await signed_by(vault, clock).assertion(ENDPOINT_A)

    header = jwt.get_unverified_header(assertion)
    claims = jwt.decode(
        assertion,
        vault.key.public_key(),
        algorithms=["PS256"],
        audience=ENDPOINT_A,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    thumbprint = base64.urlsafe_b64encode(vault.certificate.sha256_thumbprint).rstrip(b"=").decode()
    assert ("PS256", "JWT", thumbprint) == (header["alg"], header["typ"], header["x5t#S256"])
    assert (CLIENT_ID, CLIENT_ID, 600) == (claims["iss"], claims["sub"], claims["exp"] - claims["nbf"])
    assert claims["jti"]
    assert {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": ENDPOINT_A, "exp": claims["exp"]} == presented_claims(
        assertion
    )


async def test_reused_per_tenant_until_shortly_before_it_expires() -> None:
    """One signature per tenant; the same assertion is handed out until two minutes before its end."""
    vault, clock = LocalVault(), Clock()
    signed = signed_by(vault, clock)
    first = await signed.assertion(ENDPOINT_A)
    other = await signed.assertion(ENDPOINT_B)
    clock.now += 479
    again = await signed.assertion(ENDPOINT_A)
    clock.now += 2
    renewed = await signed.assertion(ENDPOINT_A)

    assert first == again
    assert first not in (other, renewed)
    assert 3 == vault.signatures


async def test_concurrent_requests_for_one_tenant_wait_on_one_signature() -> None:
    """A cold herd: 50 concurrent callers over 5 tenants cause 5 signatures."""
    vault = LocalVault(delay_seconds=0.05)
    signed = signed_by(vault)
    endpoints = [f"https://login.microsoftonline.com/tenant-{n}/oauth2/v2.0/token" for n in range(5)]
    results = await asyncio.gather(*(signed.assertion(endpoints[n % 5]) for n in range(50)))

    assert 5 == vault.signatures
    assert 5 == len(set(results))


async def test_a_new_certificate_is_signed_for_at_once_and_forget_drops_everything() -> None:
    """A rotated certificate (another thumbprint) is never presented with an old assertion; forget()
    (Entra refused one) makes the next call sign anew."""
    vault = LocalVault()
    signed = signed_by(vault)
    first = await signed.assertion(ENDPOINT_A)
    vault.certificate = SigningCertificate(
        "https://vault/keys/signer/v2", hashlib.sha256(b"cert-v2").digest()
    )
    rotated = await signed.assertion(ENDPOINT_A)
    signed.forget()
    after_forget = await signed.assertion(ENDPOINT_A)

    assert len({first, rotated, after_forget}) == 3
    assert 3 == vault.signatures


async def test_a_failed_signature_fails_its_waiters_and_is_not_remembered() -> None:
    """Key Vault failing: everyone waiting gets the error; the next call tries again."""
    vault = LocalVault()
    failures = [RuntimeError("vault down")]

    async def flaky(key_id: str, digest: bytes) -> bytes:
        if failures:
            await asyncio.sleep(0.01)
            raise failures.pop()
        return await vault.sign(key_id, digest)

    signed = SignedAssertions(CLIENT_ID, vault.current, flaky)
    outcomes = await asyncio.gather(*(signed.assertion(ENDPOINT_A) for _ in range(3)), return_exceptions=True)
    assert 3 == sum(isinstance(outcome, RuntimeError) for outcome in outcomes)
    assert await signed.assertion(ENDPOINT_A)
    assert 1 == vault.signatures


async def test_cached_assertions_are_bounded() -> None:
    """Memory does not grow with the number of tenants ever asked for."""
    vault = LocalVault()
    signed = SignedAssertions(CLIENT_ID, vault.current, vault.sign, max_entries=3)
    for n in range(5):
        await signed.assertion(f"https://login.microsoftonline.com/t{n}/oauth2/v2.0/token")
    assert {} == signed.presented("https://login.microsoftonline.com/t0/oauth2/v2.0/token")
    assert signed.presented("https://login.microsoftonline.com/t4/oauth2/v2.0/token")


@pytest.mark.parametrize(
    ("authority_host", "audience"),
    [
        ("https://login.microsoftonline.com", PUBLIC_EXCHANGE_AUDIENCE),
        ("https://login.microsoftonline.us", "api://AzureADTokenExchangeUSGov"),
        ("https://login.chinacloudapi.cn", "api://AzureADTokenExchangeChina"),
        ("https://LOGIN.MICROSOFTONLINE.US/", "api://AzureADTokenExchangeUSGov"),
        ("https://127.0.0.1:8443", PUBLIC_EXCHANGE_AUDIENCE),
    ],
)
def test_exchange_audience_by_cloud(authority_host: str, audience: str) -> None:
    """The managed identity's token is asked for the exchange audience of the authority's cloud."""
    assert audience == exchange_audience(authority_host)


def test_presented_claims_never_carry_the_token() -> None:
    """What the rejection log shows of an assertion: four claims, not the JWT."""
    body = base64.urlsafe_b64encode(
        json.dumps({"iss": "i", "sub": "s", "aud": "a", "exp": 1, "x": 2}).encode()
    )
    token = f"e30.{body.rstrip(b'=').decode()}.sig"
    assert {"iss": "i", "sub": "s", "aud": "a", "exp": 1} == presented_claims(token)
