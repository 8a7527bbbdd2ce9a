"""The handle on a running emulator: :class:`Emulator` and :func:`start_emulator`.

:class:`Emulator` is a synchronous client of the control API that also knows the emulator's URL and
CA file and can verify the tokens it issues. Its control methods are not written here: each is
``remote(EmulatorState.<operation>)``, which takes the operation's name, signature and docstring
from the state method and sends the bound arguments to ``POST /_emulator/{operation}``
(see ``control``). :func:`start_emulator` launches ``python -m emulator`` as a subprocess and waits
(bounded) for its ready file. The HTTP session ignores proxy/CA environment variables
(``trust_env=False``): requests would otherwise let ``REQUESTS_CA_BUNDLE`` silently override
``verify``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import (
    IO,
    Any,
    ClassVar,
    Concatenate,
    Final,
    Generic,
    NamedTuple,
    ParamSpec,
    Self,
    TypeVar,
    overload,
)

import jwt
import requests

from .server import READY_FILE
from .state import VAULT_RESOURCE, EmulatorState
from .world import BROKER_CLIENT_ID, BROKER_CLIENT_SECRET, VAULT_TENANT_ID

_CONTROL_TIMEOUT: Final = 10.0


class EmulatorError(RuntimeError):
    """The emulator refused a control call, or could not be started."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


class remote(Generic[_P, _R]):  # noqa: N801 - used like a decorator, reads as one
    """A control operation as an :class:`Emulator` method: ``grant = remote(EmulatorState.grant)``.

    Called on a handle, it binds the arguments to the state method's signature (so a wrong call
    fails here, as it would locally), sends them as JSON and returns the decoded result, which the
    operation guarantees is JSON-ready data of its annotated return type.
    """

    def __init__(self, method: Callable[Concatenate[EmulatorState, _P], _R]) -> None:
        self.name = method.__name__
        self.signature = inspect.signature(method)
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, handle: None, owner: type[Emulator]) -> Self: ...
    @overload
    def __get__(self, handle: Emulator, owner: type[Emulator]) -> Callable[_P, _R]: ...
    def __get__(self, handle: Emulator | None, owner: type[Emulator]) -> Self | Callable[_P, _R]:
        if handle is None:
            return self

        def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            bound = self.signature.bind(handle, *args, **kwargs)
            arguments = {name: _json_ready(v) for name, v in list(bound.arguments.items())[1:]}
            result: _R = handle.call(self.name, arguments)
            return result

        call.__name__ = call.__qualname__ = self.name
        call.__doc__ = self.__doc__
        return call


def _json_ready(value: Any) -> Any:
    """Iterables that JSON has no form for (tuples, sets, generators) travel as lists."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        return value
    return list(value)


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

    @property
    def identity_endpoint(self) -> str:
        """The managed-identity endpoint (``IDENTITY_ENDPOINT`` of App Service's protocol)."""
        return f"{self.base_url}/msi/token"

    def entra_issuer(self, tenant: str) -> str:
        """The issuer of this emulator's v2 tokens for ``tenant`` (a managed identity's exchange token):
        what a federated identity credential for a managed identity names."""
        return f"{self.base_url}/{tenant}/v2.0"

    def token_url(self, tenant: str, *, v1: bool = False) -> str:
        """The token endpoint URL for ``tenant``."""
        return f"{self.base_url}/{tenant}/oauth2/{'token' if v1 else 'v2.0/token'}"

    def call(self, operation: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run control operation ``operation`` with JSON ``arguments``; return its JSON result.

        The typed methods below do this for every operation; this is the way in for one they do
        not list yet. Raises :class:`EmulatorError` when the emulator refuses the call.
        """
        response = self._session.post(
            f"{self.base_url}/_emulator/{operation}", json=dict(arguments or {}), timeout=_CONTROL_TIMEOUT
        )
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise EmulatorError(f"{operation}: HTTP {response.status_code}: {detail}")
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

    # ------------------------------------------------------------------ control operations
    # EmulatorState's methods of the same names, run in the emulator (see state.OPERATIONS).
    reset = remote(EmulatorState.reset)
    seed_demo = remote(EmulatorState.seed_demo)
    add_tenant = remote(EmulatorState.add_tenant)
    add_app = remote(EmulatorState.add_app)
    add_app_secret = remote(EmulatorState.add_app_secret)
    add_app_certificate = remote(EmulatorState.add_app_certificate)
    add_federated_credential = remote(EmulatorState.add_federated_credential)
    remove_federated_credentials = remote(EmulatorState.remove_federated_credentials)
    set_federated_errors = remote(EmulatorState.set_federated_errors)
    add_managed_identity = remote(EmulatorState.add_managed_identity)
    add_oidc_issuer = remote(EmulatorState.add_oidc_issuer)
    issue_oidc_token = remote(EmulatorState.issue_oidc_token)
    create_certificate = remote(EmulatorState.create_certificate)
    rotate_app_secret = remote(EmulatorState.rotate_app_secret)
    grant = remote(EmulatorState.grant)
    revoke = remote(EmulatorState.revoke)
    remove_role = remote(EmulatorState.remove_role)
    set_service_principal_enabled = remote(EmulatorState.set_service_principal_enabled)
    set_unprovisioned = remote(EmulatorState.set_unprovisioned)
    add_redirect_uri = remote(EmulatorState.add_redirect_uri)
    set_app_permissions = remote(EmulatorState.set_app_permissions)
    set_consent_delay = remote(EmulatorState.set_consent_delay)
    set_secret = remote(EmulatorState.set_secret)
    set_secret_enabled = remote(EmulatorState.set_secret_enabled)
    set_vault_access = remote(EmulatorState.set_vault_access)
    add_fault = remote(EmulatorState.add_fault)
    faults = remote(EmulatorState.faults)
    clear_faults = remote(EmulatorState.clear_faults)
    set_token_lifetime = remote(EmulatorState.set_token_lifetime)
    counters = remote(EmulatorState.counters)
    reset_counters = remote(EmulatorState.reset_counters)
    requests = remote(EmulatorState.requests)
    signing_key = remote(EmulatorState.signing_key)

    # ------------------------------------------------------------------ observation
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
            self._jwks = self.signing_key()["jwks"]
        return self._jwks

    @property
    def public_key_pem(self) -> str:
        """The token-signing public key (SubjectPublicKeyInfo PEM)."""
        return str(self.signing_key()["public_key_pem"])

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
