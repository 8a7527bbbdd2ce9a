"""Drop-in fixtures: a broker process serving HTTPS (its certificate from a throwaway trustme CA made
per test in tmp_path, never committed), the world's tenants with the resources the partner guide's
snippets name, and the Node.js clients installed from tests/node's lockfile."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from tests.functional.conftest import APP_ID, TENANT_A, TENANT_B, TENANT_C, World
from tests.support import BrokerProcess

# The partner guide's Python snippet asks the v1 endpoint for the older Defender for Endpoint resource;
# its curl command asks v2 for the WindowsDefenderATP app id URI.
GUIDE_V1_RESOURCE = "https://api.securitycenter.windows.com"
GUIDE_V2_RESOURCE = "https://securitycenter.onmicrosoft.com/windowsatpservice"
NODE_DIR = Path(__file__).resolve().parents[2] / "node"


@dataclass(frozen=True)
class ServerCertificate:
    """A CA the clients trust and the broker's certificate/key files, issued by it."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self, cert_file: Path, key_file: Path) -> trustme.LeafCert:
        """A fresh certificate for 127.0.0.1/localhost written to the given files."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(key_file))
        cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return leaf


@pytest.fixture
def server_certificate(tmp_path: Path) -> ServerCertificate:
    ca = trustme.CA(organization_name="token-broker test CA")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
    made = ServerCertificate(ca, tls_dir / "ca.pem", tls_dir / "tls.crt", tls_dir / "tls.key")
    made.issue(made.cert_file, made.key_file)
    return made


class TlsBrokerProcess(BrokerProcess):
    """``token-broker serve`` with ``listen.tls``: its URL is https and readiness is checked over TLS."""

    ca_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"broker exited with {self.process.returncode}: {self.log_text()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1, verify=str(self.ca_file)).status_code == 200
        except requests.RequestException:
            return False


StartTlsBroker = Callable[..., TlsBrokerProcess]


@pytest.fixture
def start_tls_broker(tmp_path: Path, server_certificate: ServerCertificate) -> Iterator[StartTlsBroker]:
    """Start brokers that serve HTTPS with ``server_certificate``; stopped when the test ends."""
    started: list[TlsBrokerProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> TlsBrokerProcess:
        config = {
            **config,
            "listen": {
                "tls": {
                    "cert_file": str(server_certificate.cert_file),
                    "key_file": str(server_certificate.key_file),
                }
            },
        }
        broker = TlsBrokerProcess(tmp_path, config, env, f"tls-broker{len(started)}")
        broker.ca_file = server_certificate.ca_file
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def guide_world(world: World) -> World:
    """The world, plus the two resources the partner guide's snippets ask for, granted in the
    consented tenants and allowed for the app."""
    for tenant in (TENANT_A, TENANT_B, TENANT_C):
        world.emulator.grant(tenant, APP_ID, GUIDE_V1_RESOURCE, ["Machine.Read.All"])
        world.emulator.grant(tenant, APP_ID, GUIDE_V2_RESOURCE, ["Alert.Read.All"])
    world.extra_resources += [GUIDE_V1_RESOURCE, GUIDE_V2_RESOURCE]
    return world


def clean_env(**extra: str) -> dict[str, str]:
    """The process's environment without anything that steers an Azure SDK or its TLS trust, plus
    ``extra``: a client in a subprocess sees only what the test gives it."""
    steering = ("AZURE_", "IDENTITY_", "MSI_", "IMDS_", "REQUESTS_CA", "CURL_CA", "SSL_CERT", "NODE_EXTRA")
    env = {k: v for k, v in os.environ.items() if not k.startswith(steering)}
    return {**env, **extra}


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """tests/node with its node_modules installed from the lockfile (``npm ci``) when they are missing
    or older than the lockfile; ``make install`` does the same. Fails, never skips, without node/npm:
    ``scripts/install-system-deps.sh`` installs them."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are required (scripts/install-system-deps.sh installs them)")
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR
