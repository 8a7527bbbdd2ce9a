"""The CA bundle every outbound client (MSAL, azure-identity, Key Vault) verifies TLS with.

With ``outbound_ca_file`` the extra CA is trusted *in addition to* the public roots: the SDKs take one
bundle path each (and ``SSL_CERT_FILE`` would *replace* the system store), so we write one combined
file, once, into the temp directory (the only writable place in a read-only container).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from pathlib import Path

import certifi


def build_ca_bundle(extra_ca_file: Path | None) -> str | None:
    """Path of a bundle holding the public roots plus ``extra_ca_file``; ``None`` means defaults."""
    if extra_ca_file is None:
        return None
    combined = (
        Path(certifi.where()).read_text(encoding="ascii") + "\n" + extra_ca_file.read_text(encoding="ascii")
    )
    fd, path = tempfile.mkstemp(prefix="token-broker-ca-", suffix=".pem")
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(combined)
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
