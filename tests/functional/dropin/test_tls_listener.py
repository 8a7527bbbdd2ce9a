"""listen.tls: the API port serves HTTPS from PEM files, follows them when they change (a renewed
certificate is served without a restart; a half-written pair never replaces a good one), the metrics
port stays plain HTTP, and bad files are configuration errors naming the key."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import trustme
import yaml

from tests.functional.conftest import World
from tests.functional.dropin.conftest import ServerCertificate, StartTlsBroker
from tests.support import run_cli


def served_certificate(port: int, ca_file: Path) -> bytes:
    """The DER certificate a new TLS connection to 127.0.0.1:``port`` is given (verified)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def replace_file(path: Path, data: bytes) -> None:
    """Swap the file's content in one step (a new inode), as kubelet updates a mounted Secret."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_renewed_certificate_is_served_without_restart(
    world: World, start_tls_broker: StartTlsBroker, server_certificate: ServerCertificate, tmp_path: Path
) -> None:
    """After the files change, new connections get the new certificate (checked at most once a
    second); a certificate written without its key yet keeps the old pair in service (one warning)
    until the key follows. The metrics port answers plain HTTP throughout."""
    broker = start_tls_broker(world.broker_config(), world.env)
    cert, key, ca = server_certificate.cert_file, server_certificate.key_file, server_certificate.ca_file
    first = served_certificate(broker.port, ca)
    assert ssl.PEM_cert_to_DER_cert(cert.read_text()) == first  # trustme: the chain is the leaf

    renewed = server_certificate.issue(tmp_path / "renewed.crt", tmp_path / "renewed.key")
    replace_file(cert, (tmp_path / "renewed.crt").read_bytes())  # the key has not followed yet
    time.sleep(1.2)
    assert first == served_certificate(broker.port, ca)
    assert first == served_certificate(broker.port, ca)
    warnings = [line for line in broker.log_lines() if "do not load" in line["message"]]
    assert 1 == len(warnings)
    assert "WARNING" == warnings[0]["level"]

    replace_file(key, (tmp_path / "renewed.key").read_bytes())
    time.sleep(1.2)
    assert der(renewed) == served_certificate(broker.port, ca)
    assert "broker_build_info" in broker.metrics_text()  # http://, unchanged
    loaded = [line for line in broker.log_lines() if line["message"] == "TLS certificate loaded"]
    assert 2 == len(loaded)
    assert loaded[0]["sha256"] != loaded[1]["sha256"]


def test_bad_tls_files_are_configuration_errors(
    world: World, server_certificate: ServerCertificate, tmp_path: Path
) -> None:
    """A missing file or a certificate and key that do not belong together fail check-config (and
    serve) with exit code 2 naming listen.tls, before anything listens."""
    other = server_certificate.issue(tmp_path / "other.crt", tmp_path / "other.key")
    assert other is not None
    cases = {
        "listen.tls.cert_file": {
            "cert_file": str(tmp_path / "missing.crt"),
            "key_file": str(server_certificate.key_file),
        },
        "listen.tls: cannot load the certificate and key": {
            "cert_file": str(server_certificate.cert_file),
            "key_file": str(tmp_path / "other.key"),
        },
    }
    for expected, tls in cases.items():
        path = tmp_path / "broker.yaml"
        path.write_text(yaml.safe_dump({**world.broker_config(), "listen": {"tls": tls}}))
        for command in ("check-config", "serve"):
            result = run_cli(command, "--config", str(path))
            assert 2 == result.returncode, result.stderr
            assert expected in result.stderr
            assert "PRIVATE KEY" not in result.stderr
