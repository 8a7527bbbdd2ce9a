"""Certificate credentials as Key Vault exposes them (its secret holds PEM or base64 PKCS#12), and
the errors for bundles that are not usable: made with ``cryptography``, no Key Vault needed."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from broker.errors import CredentialLoadError
from broker.tokens import fingerprint
from broker.vault import _certificate_from_secret

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"


@pytest.fixture(scope="module")
def key_and_cert() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-broker test app")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pfx(
    key: rsa.RSAPrivateKey | None,
    cert: x509.Certificate | None,
    encryption: serialization.KeySerializationEncryption | None = None,
) -> str:
    blob = pkcs12.serialize_key_and_certificates(
        b"app", key, cert, None, encryption or serialization.NoEncryption()
    )
    return base64.b64encode(blob).decode()


def _pem(key: rsa.RSAPrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("content_type", [PKCS12, None], ids=["pkcs12-content-type", "no-content-type"])
def test_pkcs12_bundle_yields_key_and_certificate(
    key_and_cert: tuple[rsa.RSAPrivateKey, x509.Certificate], content_type: str | None
) -> None:
    """A base64 PFX (as Key Vault returns a certificate's secret) gives the PEM private key and
    certificate MSAL needs, whether or not the content type says PKCS#12; repr shows neither."""
    key, cert = key_and_cert
    key_pem, cert_pem = _pem(key, cert)
    credential = _certificate_from_secret(_pfx(key, cert), content_type)
    assert credential.is_certificate
    assert (key_pem, cert_pem) == (credential.private_key_pem, credential.certificate_pem)
    assert fingerprint(cert_pem) == credential.fingerprint
    assert "PRIVATE KEY" not in repr(credential)
    assert credential.client_secret is None


@pytest.mark.parametrize("order", ["key-first", "cert-first"])
def test_pem_bundle_in_either_order(
    key_and_cert: tuple[rsa.RSAPrivateKey, x509.Certificate], order: str
) -> None:
    """A PEM secret holding the key and the certificate, in either order, gives both."""
    key_pem, cert_pem = _pem(*key_and_cert)
    value = key_pem + cert_pem if order == "key-first" else cert_pem + "\n" + key_pem
    credential = _certificate_from_secret(value, PEM)
    assert (key_pem.strip(), cert_pem.strip()) == (
        (credential.private_key_pem or "").strip(),
        (credential.certificate_pem or "").strip(),
    )


def test_bad_pkcs12_bundle_is_a_credential_load_error() -> None:
    """Bytes that are not a PKCS#12 bundle are a CredentialLoadError (502), whose message quotes
    nothing of the value."""
    garbage = base64.b64encode(b"not a pfx, but maybe a secret").decode()
    with pytest.raises(CredentialLoadError, match="not a valid PKCS#12 bundle") as failed:
        _certificate_from_secret(garbage, PKCS12)
    assert 502 == failed.value.status
    assert garbage not in str(failed.value)
    assert "secret" not in failed.value.description


def test_password_protected_pkcs12_is_a_credential_load_error(
    key_and_cert: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    """Key Vault's certificate secrets are unprotected: a password-protected PFX cannot be opened."""
    protected = _pfx(*key_and_cert, serialization.BestAvailableEncryption(b"password"))
    with pytest.raises(CredentialLoadError, match="not a valid PKCS#12 bundle"):
        _certificate_from_secret(protected, PKCS12)


def test_pkcs12_without_private_key_is_a_credential_load_error(
    key_and_cert: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    """A PFX holding only the certificate is not a credential."""
    with pytest.raises(CredentialLoadError, match="lacks a private key or certificate"):
        _certificate_from_secret(_pfx(None, key_and_cert[1]), PKCS12)


def test_pem_without_private_key_is_a_credential_load_error(
    key_and_cert: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    """A PEM secret holding only the certificate is not a credential."""
    _, cert_pem = _pem(*key_and_cert)
    with pytest.raises(CredentialLoadError, match="lacks a private key or certificate"):
        _certificate_from_secret(cert_pem, PEM)
