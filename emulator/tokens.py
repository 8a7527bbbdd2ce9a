"""Cryptography of the emulator: its token-signing key, JWKS, and client-assertion checks.

:class:`SigningKey` is the emulator's RS256 key (with a self-signed certificate, so the JWKS can
carry ``x5t``/``x5c`` like Entra's). :func:`verify_client_assertion` validates a
``private_key_jwt`` client assertion the way Entra does: the key is chosen by the assertion's
thumbprint header among the app's *registered* certificates only (an ``x5c`` header proves
nothing), the signature is verified for real, then ``iss``/``sub``/``aud``/``exp``.
:func:`verify_federated_assertion` validates a token from another issuer presented as the client
assertion of an app with federated identity credentials: a record matching its issuer, subject and
audience, then its signature against that issuer's keys, then its lifetime.
:func:`make_certificate` creates an app certificate for tests.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from .state import AppCertificate, FederatedCredential

# Entra's clock-skew tolerance is minutes; MSAL itself allows 5 minutes on its side.
_LEEWAY_SECONDS = 300
# Entra refuses an external token that lives longer than a day (AADSTS70023).
_FEDERATED_MAX_LIFETIME_SECONDS = 24 * 3600


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE headers use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    # MSAL pads its thumbprint headers ("...="); JOSE says unpadded. Accept both.
    stripped = text.rstrip("=")
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))


def _self_signed(key: rsa.RSAPrivateKey, common_name: str, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def make_certificate(common_name: str = "emulator-app", days: int = 30) -> tuple[str, str]:
    """Create an RSA key and self-signed certificate for an app: ``(private_key_pem, cert_pem)``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _self_signed(key, common_name, days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


class SigningKey:
    """The emulator's token-signing key; lives as long as the server process."""

    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _self_signed(self._key, "entra-emulator-token-signing", 365)
        der = cert.public_bytes(serialization.Encoding.DER)
        # Entra uses the certificate's SHA-1 thumbprint as both kid and x5t.
        self.kid = b64url(hashlib.sha1(der).digest())  # noqa: S324 - a thumbprint, not security
        self._x5c = base64.b64encode(der).decode()
        self.public_key = self._key.public_key()
        self.public_key_pem = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK, shaped like an entry of Entra's JWKS."""
        numbers = self.public_key.public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "x5c": [self._x5c],
        }

    def jwks(self) -> dict[str, Any]:
        """The JWKS document."""
        return {"keys": [self.jwk()]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` as an RS256 JWT with Entra's header (typ, alg, x5t, kid)."""
        headers = {"typ": "JWT", "x5t": self.kid, "kid": self.kid}
        return jwt.encode(dict(claims), self._key, algorithm="RS256", headers=headers)

    def verify(self, token: str, audience: str | Iterable[str]) -> dict[str, Any]:
        """Verify a token this emulator issued (signature, exp/nbf, aud); return its claims.

        Raises :class:`jwt.InvalidTokenError` (or a subclass) when anything is off.
        """
        header = jwt.get_unverified_header(token)
        if header.get("kid") != self.kid:
            raise jwt.InvalidTokenError("token was not signed by this emulator")
        claims: dict[str, Any] = jwt.decode(
            token,
            self.public_key,
            algorithms=["RS256"],
            audience=list([audience] if isinstance(audience, str) else audience),
            options={"require": ["exp", "iat", "nbf", "aud", "iss", "tid"]},
            leeway=30,
        )
        return claims


@dataclass(frozen=True)
class AssertionRejected(Exception):  # noqa: N818 - mirrors Entra's wording, not a bug class
    """A client assertion Entra would refuse: the AADSTS code and description to send."""

    code: int
    description: str


def verify_client_assertion(
    assertion: str,
    *,
    client_id: str,
    certificates: Iterable[AppCertificate],
    audiences: Iterable[str],
) -> AppCertificate:
    """Validate a ``private_key_jwt`` client assertion; return the certificate that signed it.

    Raises :class:`AssertionRejected` with AADSTS700027 (unknown key / bad signature / claims) or
    700024 (outside its validity window), as Entra does.
    """
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError as exc:
        raise AssertionRejected(700027, "Client assertion is not a valid JWT.") from exc
    alg = header.get("alg")
    if alg not in ("RS256", "PS256"):
        raise AssertionRejected(700027, f"Client assertion uses unsupported algorithm {alg!r}.")
    cert = _find_certificate(header, certificates, client_id)
    public_key = x509.load_pem_x509_certificate(cert.pem.encode()).public_key()
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            public_key,  # type: ignore[arg-type]  # an RSA key, checked by alg above
            algorithms=[alg],
            options={"verify_aud": False, "verify_exp": False, "require": ["exp"]},
        )
    except jwt.InvalidSignatureError as exc:
        raise AssertionRejected(700027, "Client assertion failed signature validation.") from exc
    except jwt.InvalidTokenError as exc:
        raise AssertionRejected(700027, f"Client assertion is invalid: {exc}.") from exc
    if not (claims.get("iss") == claims.get("sub") and str(claims.get("iss")).lower() == client_id):
        raise AssertionRejected(
            700027,
            "Client assertion contains an invalid issuer or subject: both must be the client_id of the app.",
        )
    wanted = {a.rstrip("/").lower() for a in audiences}
    if str(claims.get("aud", "")).rstrip("/").lower() not in wanted:
        raise AssertionRejected(
            700027,
            "Client assertion audience claim does not match Realm issuer (expected the token endpoint URL).",
        )
    now = time.time()
    exp = claims.get("exp")
    nbf = claims.get("nbf", claims.get("iat", now))
    if not isinstance(exp, int | float) or exp + _LEEWAY_SECONDS < now or nbf - _LEEWAY_SECONDS > now:
        raise AssertionRejected(700024, "Client assertion is not within its valid time range.")
    return cert


def _find_certificate(
    header: Mapping[str, Any], certificates: Iterable[AppCertificate], client_id: str
) -> AppCertificate:
    try:
        sha256 = _b64url_decode(header["x5t#S256"]) if "x5t#S256" in header else None
        sha1 = _b64url_decode(header["x5t"]) if "x5t" in header else None
    except (binascii.Error, TypeError, ValueError) as exc:
        raise AssertionRejected(700027, "Client assertion has a malformed thumbprint.") from exc
    if sha256 is None and sha1 is None:
        raise AssertionRejected(700027, "Client assertion has no x5t or x5t#S256 header.")
    for cert in certificates:
        if (sha256 is not None and cert.sha256 == sha256) or (sha1 is not None and cert.sha1 == sha1):
            return cert
    shown = (sha256 or sha1 or b"").hex().upper()
    raise AssertionRejected(
        700027,
        "The certificate with identifier used to sign the client assertion is not registered "
        f"on application. [Reason - The key was not found., Thumbprint of key used by client: "
        f"'{shown}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to "
        f"see configured keys for app Id '{client_id}'.]",
    )


def verify_federated_assertion(
    assertion: str,
    *,
    home_tenant: str,
    credentials: Iterable[FederatedCredential],
    signer_for: Callable[[str], SigningKey | None],
    entra_tenant_of: Callable[[str], str | None],
    detailed: bool,
) -> FederatedCredential:
    """Validate a federated client assertion; return the federated credential it matched.

    The checks run in Entra's order and fail with its codes: an Entra-issued token of another tenant
    than the app's (AADSTS700236); no record with the token's issuer (700211), subject (700213) or
    audience (700212) — or, with ``detailed`` False, the older combined 70021 for any of them; the
    issuer's keys unknown (50166); a bad signature (700027); outside its validity (700024) or living
    longer than a day (70023). ``signer_for(issuer)`` is the issuer's key; ``entra_tenant_of(issuer)``
    names the tenant when the issuer is this emulator's own Entra issuer.
    """
    try:
        header = jwt.get_unverified_header(assertion)
        claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise AssertionRejected(700027, "Client assertion is not a valid JWT.") from exc
    issuer, subject = str(claims.get("iss", "")), str(claims.get("sub", ""))
    audience = claims.get("aud", [])
    audiences = {str(a) for a in (audience if isinstance(audience, list) else [audience])}
    issuer_tenant = entra_tenant_of(issuer)
    if issuer_tenant is not None and issuer_tenant != home_tenant:
        raise AssertionRejected(
            700236,
            f"Entra ID tokens issued by issuer '{issuer}' may not be used for federated identity "
            "credential flows for applications or managed identities registered in this tenant.",
        )
    presented = (
        f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. "
        f"Assertion Audience: '{', '.join(sorted(audiences))}'."
    )
    every = list(credentials)
    by_issuer = [c for c in every if c.issuer == issuer]
    by_subject = [c for c in by_issuer if c.subject == subject]
    matched = [c for c in by_subject if audiences & set(c.audiences)]
    if not matched:
        if not detailed:
            raise AssertionRejected(
                70021, f"No matching federated identity record found for presented assertion. {presented}"
            )
        part, code, value = (
            ("issuer", 700211, issuer)
            if not by_issuer
            else ("subject", 700213, subject)
            if not by_subject
            else ("audience", 700212, ", ".join(sorted(audiences)))
        )
        raise AssertionRejected(
            code,
            f"No matching federated identity record found for presented assertion {part} '{value}'. "
            "Please check your federated identity credential Subject, Audience and Issuer against the "
            "presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation",
        )
    signer = signer_for(issuer)
    if signer is None:
        raise AssertionRejected(50166, f"Request to External OIDC endpoint failed for issuer '{issuer}'.")
    if header.get("kid") != signer.kid or header.get("alg") != "RS256":
        raise AssertionRejected(700027, "Client assertion failed signature validation (unknown key).")
    try:
        jwt.decode(
            assertion,
            signer.public_key,
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.InvalidTokenError as exc:
        raise AssertionRejected(700027, "Client assertion failed signature validation.") from exc
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat", now))
    if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
        raise AssertionRejected(700024, "Client assertion is not within its valid time range.")
    if exp + _LEEWAY_SECONDS < now or nbf - _LEEWAY_SECONDS > now:
        raise AssertionRejected(
            700024,
            f"Client assertion is not within its valid time range. Current time: {int(now)}, "
            f"assertion valid from {int(nbf)}, expiry time of assertion {int(exp)}.",
        )
    if exp - nbf > _FEDERATED_MAX_LIFETIME_SECONDS:
        raise AssertionRejected(
            70023, "The presented assertion lives longer than allowed for a federated credential (1 day)."
        )
    return matched[0]
