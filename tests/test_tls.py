"""The outbound CA bundle: the public roots *plus* ``outbound_ca_file``, proven by a real TLS
handshake (in memory) against a certificate the extra CA issued."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest
import trustme

from broker.tls import build_ca_bundle

HOSTNAME = "login.emulator.test"


@pytest.fixture
def extra_ca() -> trustme.CA:
    """A private CA, as the emulator's or a TLS-inspecting proxy's."""
    return trustme.CA()


@pytest.fixture
def bundle(extra_ca: trustme.CA, tmp_path: Path) -> Iterator[str]:
    """``build_ca_bundle`` for that CA's PEM file (the bundle is removed afterwards)."""
    ca_file = tmp_path / "extra-ca.pem"
    extra_ca.cert_pem.write_to_path(str(ca_file))
    path = build_ca_bundle(ca_file)
    assert path is not None
    yield path
    Path(path).unlink(missing_ok=True)


def handshake(client_context: ssl.SSLContext, server_context: ssl.SSLContext) -> None:
    """A complete TLS handshake between the two contexts over memory BIOs; raises what the
    client's verification raises."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=HOSTNAME)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):  # a handshake takes a few round trips; bounded
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOSTNAME).configure_cert(context)
    return context


def test_no_extra_ca_means_the_defaults() -> None:
    """Without ``outbound_ca_file`` no bundle is written: the SDKs keep their default trust."""
    assert build_ca_bundle(None) is None


def test_bundle_holds_the_public_roots_and_the_extra_ca(bundle: str, extra_ca: trustme.CA) -> None:
    """The bundle starts with every public root and ends with the extra CA (added, not replacing)."""
    text = Path(bundle).read_text(encoding="ascii")
    assert text.startswith(Path(certifi.where()).read_text(encoding="ascii"))
    assert text.rstrip().endswith(extra_ca.cert_pem.bytes().decode().rstrip())


def test_bundle_verifies_a_server_of_the_extra_ca(bundle: str, extra_ca: trustme.CA) -> None:
    """A client trusting the bundle completes a handshake with a server certified by the extra CA;
    one trusting the public roots alone refuses it."""
    handshake(ssl.create_default_context(cafile=bundle), server_context(extra_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ssl.create_default_context(cafile=certifi.where()), server_context(extra_ca))
