"""The test-side handle of a running emulator: :class:`Emulator` and :func:`start_emulator`.

:class:`Emulator` is a synchronous client of the control API (one method per operation) that also
knows the emulator's URL and CA file and can verify the tokens it issues. :func:`start_emulator`
launches ``python -m emulator`` as a subprocess and waits (bounded) for its ready file.
The HTTP session ignores proxy/CA environment variables (``trust_env=False``): requests would
otherwise let ``REQUESTS_CA_BUNDLE`` silently override ``verify``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Final, NamedTuple, Self

import jwt
import requests

from .server import READY_FILE
from .state import VAULT_RESOURCE
from .world import BROKER_CLIENT_ID, BROKER_CLIENT_SECRET, VAULT_TENANT_ID

_CONTROL_TIMEOUT: Final = 10.0


class EmulatorError(RuntimeError):
    """The emulator refused a control call, or could not be started."""


class BrokerIdentity(NamedTuple):
    """The broker's own identity to Key Vault: an app in the vault tenant allowed on the vault."""

    tenant_id: str
    client_id: str
    client_secret: str


class Emulator:
    """Handle on a running emulator: addresses, control API, token verification."""

    #: Tenant of the emulated vault (recreated by :meth:`reset`).
    vault_tenant_id: ClassVar[str] = VAULT_TENANT_ID
    #: The vault's audience / the resource its challenge names.
    vault_resource: ClassVar[str] = VAULT_RESOURCE
    #: ``(tenant_id, client_id, client_secret)`` of the broker's Key Vault identity.
    broker_identity: ClassVar[BrokerIdentity] = BrokerIdentity(
        VAULT_TENANT_ID, BROKER_CLIENT_ID, BROKER_CLIENT_SECRET
    )

    def __init__(
        self,
        base_url: str,
        ca_path: str | Path,
        *,
        process: subprocess.Popen[bytes] | None = None,
        log_file: IO[bytes] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: The vault URL is the server's base URL.
        self.vault_url = self.base_url
        self.ca_path = str(ca_path)
        self.process = process
        self._log_file = log_file
        self._session = self.http_session()
        self._jwks: dict[str, Any] | None = None

    @classmethod
    def from_ready_file(cls, path: str | Path) -> Emulator:
        """Attach to an emulator that is already running, from its ``emulator.json``."""
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(info["base_url"], info["ca_path"])

    # ------------------------------------------------------------------ plumbing
    def http_session(self) -> requests.Session:
        """A new ``requests.Session`` that trusts the emulator's CA (e.g. MSAL's ``http_client``).

        The caller owns and closes it.
        """
        session = requests.Session()
        session.verify = self.ca_path
        session.trust_env = False
        return session

    def authority(self, tenant: str) -> str:
        """The authority URL for ``tenant`` (GUID or domain), for MSAL's ``authority=``."""
        return f"{self.base_url}/{tenant}"

    def token_url(self, tenant: str, *, v1: bool = False) -> str:
        """The token endpoint URL for ``tenant``."""
        return f"{self.base_url}/{tenant}/oauth2/{'token' if v1 else 'v2.0/token'}"

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        response = self._session.request(
            method,
            f"{self.base_url}/_emulator{path}",
            json=body,
            params=params,
            timeout=_CONTROL_TIMEOUT,
        )
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise EmulatorError(f"{method} /_emulator{path}: HTTP {response.status_code}: {detail}")
        return response.json()

    def close(self) -> None:
        """Close the control session (does not stop the server; see :meth:`stop`)."""
        self._session.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the emulator process this handle started (SIGTERM, then SIGKILL)."""
        self.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ directory
    def reset(self) -> None:
        """Empty state, counters, log and faults; recreate the vault tenant and broker identity."""
        self._call("POST", "/reset")

    def seed_demo(self) -> None:
        """Add the demo world (``emulator.world.DEMO_WORLD``)."""
        self._call("POST", "/demo")

    def add_tenant(self, tenant_id: str, domains: Iterable[str] = ()) -> None:
        """Create a tenant addressable by its GUID and by each domain (case-insensitive)."""
        self._call("POST", "/tenants", {"tenant_id": tenant_id, "domains": list(domains)})

    def add_app(
        self,
        client_id: str,
        *,
        home_tenant: str,
        secret: str | None = None,
        certificate_pem: str | None = None,
    ) -> None:
        """Register an app in ``home_tenant`` (implicitly consented there)."""
        self._call(
            "POST",
            "/apps",
            {
                "client_id": client_id,
                "home_tenant": home_tenant,
                "secret": secret,
                "certificate_pem": certificate_pem,
            },
        )

    def add_app_secret(self, client_id: str, secret: str, expires_in_seconds: float | None = None) -> None:
        """Add a client secret; ``expires_in_seconds <= 0`` makes it already expired (7000222)."""
        self._call(
            "POST",
            f"/apps/{client_id}/secrets",
            {"secret": secret, "expires_in_seconds": expires_in_seconds},
        )

    def add_app_certificate(self, client_id: str, cert_pem: str) -> None:
        """Register a certificate whose key may sign this app's client assertions."""
        self._call("POST", f"/apps/{client_id}/certificates", {"certificate_pem": cert_pem})

    def rotate_app_secret(self, client_id: str, vault_secret: str | None = None) -> str:
        """Replace ALL secrets of the app with a new one and return it.

        Old secrets then fail with AADSTS7000215. With ``vault_secret``, the new value is also
        stored as a new version of that vault secret.
        """
        result = self._call("POST", f"/apps/{client_id}/rotate-secret", {"vault_secret": vault_secret})
        return str(result["secret"])

    def grant(self, tenant: str, client_id: str, resource: str, roles: Iterable[str] = ()) -> None:
        """Admin-consent the app in ``tenant`` and set its app roles on ``resource``."""
        self._call(
            "POST",
            "/grants",
            {"tenant": tenant, "client_id": client_id, "resource": resource, "roles": list(roles)},
        )

    def revoke(self, tenant: str, client_id: str) -> None:
        """Remove the app's consent (service principal) from ``tenant``."""
        self._call("POST", "/revocations", {"tenant": tenant, "client_id": client_id})

    def set_unprovisioned(self, tenant: str, resource: str) -> None:
        """Make ``resource`` unknown in ``tenant``: token requests answer AADSTS500011."""
        self._call("POST", "/unprovisioned", {"tenant": tenant, "resource": resource})

    # ------------------------------------------------------------------ vault
    def set_secret(
        self,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Store a new version of vault secret ``name``; return its 32-hex version id."""
        result = self._call(
            "PUT",
            f"/vault/secrets/{name}",
            {"value": value, "content_type": content_type, "enabled": enabled, "tags": tags},
        )
        return str(result["version"])

    def set_secret_enabled(self, name: str, version: str, enabled: bool) -> None:
        """Enable or disable one version of a vault secret."""
        self._call("PATCH", f"/vault/secrets/{name}/{version}", {"enabled": enabled})

    def set_vault_access(self, client_ids: Iterable[str] | None) -> None:
        """Allow exactly these apps on the vault; None restores "apps of the vault tenant"."""
        ids = None if client_ids is None else list(client_ids)
        self._call("PUT", "/vault/access", {"client_ids": ids})

    # ------------------------------------------------------------------ faults and lifetime
    def add_fault(
        self,
        endpoint: str,
        kind: str,
        *,
        tenant: str | None = None,
        count: int = 1,
        retry_after: int | None = None,
        latency_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Inject a fault; returns its description.

        ``endpoint``: "discovery", "token", "jwks", "vault" or "any". ``kind``: "429" (service-
        shaped JSON + Retry-After, default 1 s), "429_text" (plain text + Retry-After), "500",
        "503", "latency" (sleep ``latency_seconds``, then answer normally) or "drop" (close the
        connection without a response). ``tenant`` (GUID or domain) scopes it; it fires ``count``
        times (-1: until :meth:`clear_faults`).
        """
        result: dict[str, Any] = self._call(
            "POST",
            "/faults",
            {
                "endpoint": endpoint,
                "kind": kind,
                "tenant": tenant,
                "count": count,
                "retry_after": retry_after,
                "latency_seconds": latency_seconds,
            },
        )
        return result

    def faults(self) -> list[dict[str, Any]]:
        """Pending faults with their remaining counts."""
        result: list[dict[str, Any]] = self._call("GET", "/faults")
        return result

    def clear_faults(self) -> None:
        """Remove every pending fault."""
        self._call("DELETE", "/faults")

    def set_token_lifetime(self, seconds: int, jitter_seconds: int = 0) -> None:
        """Tokens issued from now on live ``seconds`` + uniform(0..``jitter_seconds``)."""
        self._call("PUT", "/token-lifetime", {"seconds": seconds, "jitter_seconds": jitter_seconds})

    # ------------------------------------------------------------------ observation
    def counters(self) -> dict[str, int]:
        """Requests per endpoint ("discovery", "token", "jwks", "vault"), "issued_tokens",
        "faults_fired"."""
        result: dict[str, int] = self._call("GET", "/counters")
        return result

    def reset_counters(self) -> None:
        """Zero the counters and empty the request log."""
        self._call("DELETE", "/counters")

    def requests(
        self,
        endpoint: str | None = None,
        *,
        tenant: str | None = None,
        client_id: str | None = None,
        resource: str | None = None,
    ) -> list[dict[str, Any]]:
        """The request log (oldest first), filtered: entries are ``{"endpoint", "tenant_id",
        "client_id", "resource", "status", "time"}``; status 0 means the connection was dropped.
        """
        params = {
            k: v
            for k, v in {
                "endpoint": endpoint,
                "tenant": tenant,
                "client_id": client_id,
                "resource": resource,
            }.items()
            if v is not None
        }
        result: list[dict[str, Any]] = self._call("GET", "/requests", params=params)
        return result

    def token_requests(
        self,
        tenant: str | None = None,
        client_id: str | None = None,
        resource: str | None = None,
    ) -> int:
        """How many requests hit the token endpoints (any outcome, injected faults included)."""
        return len(self.requests("token", tenant=tenant, client_id=client_id, resource=resource))

    def issued_tokens(self) -> int:
        """How many access tokens the emulator has issued since the last counter reset."""
        return self.counters()["issued_tokens"]

    # ------------------------------------------------------------------ keys
    def jwks(self) -> dict[str, Any]:
        """The emulator's JWKS (constant for the life of the server process)."""
        if self._jwks is None:
            self._jwks = self._call("GET", "/signing-key")["jwks"]
        return self._jwks

    @property
    def public_key_pem(self) -> str:
        """The token-signing public key (SubjectPublicKeyInfo PEM)."""
        return str(self._call("GET", "/signing-key")["public_key_pem"])

    def verify_token(self, token: str, audience: str) -> dict[str, Any]:
        """Verify an access token against the JWKS (signature, exp, aud); return its claims."""
        kid = jwt.get_unverified_header(token).get("kid")
        keys = [k for k in self.jwks()["keys"] if k.get("kid") == kid]
        if not keys:
            raise jwt.InvalidTokenError(f"no JWKS key with kid {kid!r}")
        claims: dict[str, Any] = jwt.decode(
            token,
            jwt.PyJWK(keys[0]).key,
            algorithms=["RS256"],
            audience=audience,
            options={"require": ["exp", "iat", "nbf", "aud", "iss"]},
        )
        return claims


def start_emulator(
    state_dir: str | Path,
    *,
    port: int = 0,
    demo: bool = False,
    timeout: float = 20.0,
    python: str = sys.executable,
) -> Emulator:
    """Start ``python -m emulator`` and return its handle once the ready file appears.

    Output goes to ``{state_dir}/emulator.log``. Raises :class:`EmulatorError` (after killing the
    process) when it exits early or is not ready within ``timeout`` seconds. Stop it with
    :meth:`Emulator.stop` or by using the handle as a context manager.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    ready = state / READY_FILE
    ready.unlink(missing_ok=True)  # never trust a file left by an earlier run
    args = [python, "-m", "emulator", "--port", str(port), "--state-dir", str(state)]
    if demo:
        args.append("--demo")
    log_path = state / "emulator.log"
    log_file = log_path.open("ab")
    # Our own interpreter running our own module, with arguments built here (S603).
    process = subprocess.Popen(  # noqa: S603
        args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        info = _wait_until_ready(process, ready, log_path, time.monotonic() + timeout)
    except BaseException:
        process.kill()
        process.wait()
        log_file.close()
        raise
    return Emulator(info["base_url"], info["ca_path"], process=process, log_file=log_file)


def _wait_until_ready(
    process: subprocess.Popen[bytes], ready: Path, log_path: Path, deadline: float
) -> dict[str, Any]:
    """Poll for a ready file written by *this* process; fail fast if it dies."""
    while True:
        if ready.exists():
            info: dict[str, Any] = json.loads(ready.read_text(encoding="utf-8"))
            if info.get("pid") == process.pid:
                return info
        if process.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise EmulatorError(f"emulator exited with {process.returncode}; see {log_path}:\n{tail}")
        if time.monotonic() > deadline:
            raise EmulatorError(f"emulator not ready in time; see {log_path}")
        time.sleep(0.05)
