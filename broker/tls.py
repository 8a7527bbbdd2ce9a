"""TLS both ways: the CA bundle outbound clients verify with, and the API listener's own certificate.

Outbound: with ``outbound_ca_file`` the extra CA is trusted *in addition to* the public roots: the SDKs
take one bundle path each (and ``SSL_CERT_FILE`` would *replace* the system store), so we write one
combined file, once, into the temp directory (the only writable place in a read-only container).

Inbound: ``ReloadingServerContext`` serves ``listen.tls`` and follows its files, so a certificate that
cert-manager renews (kubelet swaps the mounted Secret's files) is served without a restart.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Self

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes

log = logging.getLogger(__name__)

# How often (at most) a new connection's handshake looks at the files: two stat() calls.
CHECK_INTERVAL_SECONDS = 1.0


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
        Path(path).unlink()


class ReloadingServerContext(ssl.SSLContext):
    """A server context whose certificate follows ``cert_file``/``key_file``.

    asyncio and uvloop start every TLS connection with ``context.wrap_bio()``; here that first looks at
    the files (at most once per ``check_interval_seconds``: their inode, size and mtime) and, when they
    changed, loads them into a *fresh* context that then serves every new connection. A pair that
    does not load (the key not yet written beside its new certificate, a mismatch) leaves the last
    good certificate in service and is retried at the next check: reloading in place instead would
    leave a live context holding a certificate without its key. Connections already open keep
    the context they started with.
    """

    def __new__(cls, *_args: object, **_kwargs: object) -> Self:
        # ssl.SSLContext takes its protocol in __new__; __init__ takes the files.
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(
        self, cert_file: Path, key_file: Path, *, check_interval_seconds: float = CHECK_INTERVAL_SECONDS
    ) -> None:
        super().__init__()
        self._cert_file = cert_file
        self._key_file = key_file
        self._check_interval = check_interval_seconds
        self._checked_at = time.monotonic()
        self._signature = self._file_signature()
        self._current = self._load()  # at start a bad pair is an error, not a warning
        self._rejected: tuple[tuple[int, int, int], ...] | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        now = time.monotonic()
        if now - self._checked_at >= self._check_interval:
            self._checked_at = now
            self._reload_if_changed()
        return self._current.wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def _file_signature(self) -> tuple[tuple[int, int, int], ...]:
        # The inode catches kubelet's atomic swap of a mounted Secret's files even within one mtime tick.
        stats = [path.stat() for path in (self._cert_file, self._key_file)]
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)

    def _reload_if_changed(self) -> None:
        try:
            signature = self._file_signature()
        except OSError as exc:
            log.warning(
                "TLS certificate files unreadable; serving the last good certificate",
                extra={"reason": exc.strerror},
            )
            return
        if signature in (self._signature, self._rejected):
            return
        try:
            context = self._load()
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._rejected = signature  # warn once per bad state, not once per connection
            log.warning(
                "TLS certificate files changed but do not load; serving the last good certificate",
                extra={"reason": str(exc)},
            )
            return
        self._current, self._signature, self._rejected = context, signature, None

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_file, self._key_file)
        leaf = x509.load_pem_x509_certificates(self._cert_file.read_bytes())[0]
        log.info(
            "TLS certificate loaded",
            extra={
                "subject": leaf.subject.rfc4514_string(),
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "sha256": leaf.fingerprint(hashes.SHA256()).hex(),
            },
        )
        return context
