"""Onboarding a customer tenant by admin consent: signed invites, signed single-use ``state``, and the
flow from the invite link to a page that proves the result.

    admin caller ──POST /v1/tenants/{tenant}/invite──▶ invite link (signed, expires in days)
    customer's Global Administrator opens it ──GET /consent/start──▶ 302 to Entra's v2 admin-consent
        page with a fresh ``state`` (signed, 15 minutes, single use)
    Entra ──302──▶ GET /consent/callback?admin_consent=True&tenant=…&state=… (or error=…)
        ──▶ verify state, claim it once, compare tenants, then prove consent with a fresh token

The threat reasoning. Everything on the callback's query string comes from a browser and may be forged:
``admin_consent=True`` is sent by Entra even when consent failed, and ``tenant`` is whatever the URL
says (Microsoft: never use it to authorise anything). So the callback trusts only two things: the
``state`` it signed itself (which names the tenant, app and resource the invite was for) and Entra's
answer to a token request. A forged success therefore cannot mark a tenant ready: without a real
service principal the proof token is refused. ``state`` is single use across replicas (``SET NX``) so a
captured callback URL cannot be replayed, and bound to the invite's tenant, so consent given in
another tenant is never recorded against this one. Invites and states are signed with one HMAC key
under different purposes: an invite is never accepted as a state or the other way round.

This module holds no HTTP: ``pages.py`` turns the ``Outcome``s into HTML and the invite into JSON.
What the registry will provide is reached through two small protocols, ``TenantResolver`` and
``ConsentRecorder``; the defaults here (GUIDs only; proofs kept in memory and logged) are what runs
until it does. Never: a token, the signing key or a caller key in an outcome, a log line or a page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from broker.callers import Caller
from broker.config import GUID_RE, NAME_RE, OnboardingOptions
from broker.entra import consent_url
from broker.errors import (
    AccessDeniedError,
    BrokerError,
    ConsentLinkError,
    ConsentRequiredError,
    CredentialLoadError,
    CredentialRejectedError,
    InvalidRequestError,
    RetryLaterError,
    UnknownTenantError,
)
from broker.tokens import AccessToken, TokenKey

log = logging.getLogger(__name__)

INVITE: Final = "invite"
STATE: Final = "state"
STATE_TTL_SECONDS: Final = 15 * 60
SIGNING_KEY_MIN_BYTES: Final = 32
MAX_LINK_LENGTH: Final = 2048
# Proof-of-consent token requests are charged to their own party: a burst of callbacks shares one
# budget and one turn of the fair scheduler, and never spends a caller's.
CONSENT_PARTY: Final = "(consent)"
CONSENT_ACQUISITIONS_PER_MINUTE: Final = 120
PROPAGATION_FIRST_WAIT_SECONDS: Final = 1.0
PROPAGATION_MAX_WAIT_SECONDS: Final = 8.0
MAX_REMEMBERED_PROOFS: Final = 10_000
_AADSTS_IN = "AADSTS"
_ERROR_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")


def parse_signing_key(text: str) -> bytes:
    """The HMAC key from its credential source: base64 of at least 32 random bytes."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialLoadError("consent_signing_key: not valid base64") from None
    if len(key) < SIGNING_KEY_MIN_BYTES:
        raise CredentialLoadError(
            f"consent_signing_key: must decode to at least {SIGNING_KEY_MIN_BYTES} bytes, not {len(key)}"
        )
    return key


# --- signed links -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invite:
    """What an invite link says: consent ``app`` for ``resource`` in ``tenant`` (a GUID) until then."""

    tenant: str
    app: str
    resource: str
    expires_at: int  # epoch seconds
    invite_id: str


@dataclass(frozen=True, slots=True)
class ConsentState:
    """What a ``state`` says: the invite it was started from, and its own id and expiry."""

    invite: Invite
    state_id: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Signs and verifies invites and states: ``v1.<payload>.<HMAC-SHA256>``, base64url.

    The MAC covers the purpose and the payload, so an invite never verifies as a state. Payloads are
    canonical JSON (sorted keys), so the same invite always signs to the same link.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < SIGNING_KEY_MIN_BYTES:
            raise ValueError(f"the signing key must have at least {SIGNING_KEY_MIN_BYTES} bytes")
        self._key = key

    def _mac(self, purpose: str, payload: str) -> bytes:
        return hmac.new(self._key, f"token-broker/{purpose}/v1.{payload}".encode(), hashlib.sha256).digest()

    def _sign(self, purpose: str, claims: Mapping[str, Any]) -> str:
        payload = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
        return f"v1.{payload}.{_b64(self._mac(purpose, payload))}"

    def _verified(self, purpose: str, link: str) -> dict[str, Any]:
        """The claims of ``link`` if its signature verifies for ``purpose``; ``ConsentLinkError`` else.
        Nothing of an unverified link is parsed beyond its three parts."""
        parts = link.split(".") if len(link) <= MAX_LINK_LENGTH and link.isascii() else []
        if len(parts) != 3 or parts[0] != "v1":
            raise ConsentLinkError(f"the {purpose} is malformed")
        try:
            valid = hmac.compare_digest(_unb64(parts[2]), self._mac(purpose, parts[1]))
            claims = json.loads(_unb64(parts[1])) if valid else None
        except (binascii.Error, ValueError):
            raise ConsentLinkError(f"the {purpose} is malformed") from None
        if not valid:
            raise ConsentLinkError(f"the {purpose} signature does not verify")
        if not isinstance(claims, dict):
            raise ConsentLinkError(f"the {purpose} is malformed")
        return claims

    # invites

    @staticmethod
    def _invite_claims(invite: Invite) -> dict[str, Any]:
        return {
            "app": invite.app,
            "exp": invite.expires_at,
            "jti": invite.invite_id,
            "res": invite.resource,
            "tid": invite.tenant,
        }

    def sign_invite(self, invite: Invite) -> str:
        return self._sign(INVITE, self._invite_claims(invite))

    def new_invite(self, tenant: str, app: str, resource: str, ttl_seconds: int, now: float) -> Invite:
        return Invite(tenant.lower(), app, resource, int(now) + ttl_seconds, secrets.token_hex(8))

    def open_invite(self, link: str, now: float) -> Invite:
        """A verified invite; expired ones raise with ``expired=True`` (only genuine links expire)."""
        invite = _invite_from(self._verified(INVITE, link), INVITE)
        if now >= invite.expires_at:
            raise ConsentLinkError("the invite has expired", expired=True)
        return invite

    # states

    def new_state(self, invite: Invite, now: float) -> tuple[str, ConsentState]:
        state = ConsentState(invite, secrets.token_hex(16), int(now) + STATE_TTL_SECONDS)
        claims = {**self._invite_claims(invite), "exp": state.expires_at, "ie": invite.expires_at}
        claims["sid"] = state.state_id
        return self._sign(STATE, claims), state

    def open_state(self, link: str) -> ConsentState:
        """A verified state, expired or not (the caller compares ``expires_at``: an expired state
        still names the invite to start again from)."""
        return _state_from(self._verified(STATE, link))


def _invite_from(claims: Mapping[str, Any], purpose: str, exp_key: str = "exp") -> Invite:
    tenant, app, resource = claims.get("tid"), claims.get("app"), claims.get("res")
    invite_id, expires_at = claims.get("jti"), claims.get(exp_key)
    if not (
        isinstance(tenant, str)
        and GUID_RE.fullmatch(tenant)
        and isinstance(app, str)
        and NAME_RE.fullmatch(app)
        and isinstance(resource, str)
        and resource.startswith("https://")
        and isinstance(invite_id, str)
        and isinstance(expires_at, int)
    ):
        raise ConsentLinkError(f"the {purpose} does not name a tenant, app and resource")
    return Invite(tenant, app, resource, expires_at, invite_id)


def _state_from(claims: Mapping[str, Any]) -> ConsentState:
    state_id, expires_at = claims.get("sid"), claims.get("exp")
    if not isinstance(state_id, str) or not isinstance(expires_at, int) or len(state_id) != 32:
        raise ConsentLinkError("the state has no id")
    return ConsentState(_invite_from(claims, STATE, "ie"), state_id, expires_at)


# --- what the registry provides ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsentProof:
    """What a proof-of-consent token request showed for (tenant, app, resource).

    ``state`` uses the registry's vocabulary: ``ready``, ``missing_roles``, ``consent_required``,
    ``disabled``, ``unknown``, ``error``. Only Entra's answer decides it, never the browser.
    """

    tenant: str  # GUID
    app: str
    resource: str
    state: str
    roles_granted: tuple[str, ...] = ()
    missing_roles: tuple[str, ...] = ()
    error: str | None = None  # the broker's error code (consent_required, upstream_error, ...)
    aadsts: str | None = None
    checked_at: float = field(default_factory=time.time)


class ConsentRecorder(Protocol):
    """Where proofs go: the tenant registry (``record`` is called once per completed callback that
    reached Entra, with Entra's verdict; never for a declined, forged or replayed callback)."""

    async def record(self, proof: ConsentProof) -> None: ...


class TenantResolver(Protocol):
    """A tenant as given (GUID or verified domain) → its canonical GUID (lower-case), or a
    ``BrokerError`` (400 for a bad name, 404 ``unknown_tenant``)."""

    async def resolve(self, tenant: str) -> str: ...


class GuidTenantResolver:
    """Until the registry's resolution of domains is merged: invites name tenants by GUID."""

    async def resolve(self, tenant: str) -> str:
        if not GUID_RE.fullmatch(tenant):
            raise InvalidRequestError("name the tenant by its GUID (its directory id) for an invite")
        return tenant.lower()


class MemoryConsentRecorder:
    """Keeps the latest proof per (tenant, app, resource), bounded, and logs each one."""

    def __init__(self, max_entries: int = MAX_REMEMBERED_PROOFS) -> None:
        self._max_entries = max_entries
        self._latest: OrderedDict[tuple[str, str, str], ConsentProof] = OrderedDict()

    async def record(self, proof: ConsentProof) -> None:
        key = (proof.tenant, proof.app, proof.resource)
        self._latest[key] = proof
        self._latest.move_to_end(key)
        while len(self._latest) > self._max_entries:
            self._latest.popitem(last=False)
        log.info(
            "consent proof recorded",
            extra={
                "tenant": proof.tenant,
                "app": proof.app,
                "resource": proof.resource,
                "state": proof.state,
                "roles_granted": list(proof.roles_granted),
                "missing_roles": list(proof.missing_roles),
                "aadsts": proof.aadsts,
            },
        )

    def latest(self, tenant: str, app: str, resource: str) -> ConsentProof | None:
        return self._latest.get((tenant.lower(), app, resource))

    def proofs(self) -> list[ConsentProof]:
        return list(self._latest.values())


# --- what the flow needs from the rest of the broker ------------------------------------------------


class SigningKeySource(Protocol):
    """``vault.CredentialStore``."""

    async def consent_signing_key_text(self) -> str | None: ...


class OnceStore(Protocol):
    """``cache.TokenCache``."""

    async def claim_once(self, scope: str, name: str, ttl_seconds: float) -> bool: ...


class FreshTokens(Protocol):
    """``service.TokenBroker``."""

    async def acquire_fresh(self, key: TokenKey, party: str, per_minute: int | None) -> AccessToken: ...


class AuditSink(Protocol):
    """``logs.AuditLog``."""

    def write(self, fields: dict[str, Any], message: str = ...) -> None: ...


# --- outcomes ---------------------------------------------------------------------------------------


class Page(enum.Enum):
    """The page an outcome is rendered as (one template each) and its HTTP status."""

    CONNECTED = ("connected", 200)
    MISSING_ROLES = ("missing_roles", 200)
    DECLINED = ("declined", 200)
    INVALID = ("invalid", 400)
    EXPIRED = ("expired", 400)
    USED = ("used", 409)
    PROPAGATING = ("propagating", 202)
    FAILED = ("failed", 502)

    @property
    def template(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything a page may show: never a token, a secret or text the browser sent us (except a
    validated error code and AADSTS number)."""

    page: Page
    reason: str = ""  # one sentence for the log and the page, written here
    tenant: str | None = None
    app: str | None = None
    client_id: str | None = None
    resource: str | None = None
    roles_granted: tuple[str, ...] = ()
    missing_roles: tuple[str, ...] = ()
    error_code: str | None = None
    aadsts: str | None = None
    restart_url: str | None = None  # the invite link again, while it is valid


@dataclass(frozen=True, slots=True)
class InviteLink:
    url: str
    invite: Invite

    def as_json(self) -> dict[str, str]:
        """The answer of the invite endpoint and of ``token-broker tenants invite``."""
        return {
            "url": self.url,
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.invite.expires_at)),
            "tenant": self.invite.tenant,
            "app": self.invite.app,
            "resource": self.invite.resource,
        }


def invite_target(options: OnboardingOptions, app: str | None, resource: str | None) -> tuple[str, str]:
    """The (app, resource) an invite is for: ``app`` may be left out when one app is configured,
    ``resource`` defaults to the app's first."""
    if app is None:
        if len(options.apps) != 1:
            raise InvalidRequestError(
                "several apps are configured: name one in 'app'", apps=sorted(options.apps)
            )
        app = next(iter(options.apps))
    elif app not in options.apps:
        raise InvalidRequestError(f"unknown app {app!r}")
    resources = options.apps[app].resources
    chosen = resources[0] if resource is None else resource.removesuffix("/.default").rstrip("/")
    if chosen not in resources:
        raise AccessDeniedError(
            f"resource {chosen} is not allowed for app {app!r}", allowed_resources=list(resources)
        )
    return app, chosen


def new_invite_link(
    options: OnboardingOptions, signer: LinkSigner, tenant: str, app: str, resource: str
) -> InviteLink:
    """A fresh signed invite for ``tenant`` (a GUID) and its link on ``public_base_url``."""
    invite = signer.new_invite(tenant, app, resource, options.invite_ttl_seconds, time.time())
    link = urllib.parse.quote(signer.sign_invite(invite), safe="")
    return InviteLink(f"{options.public_base_url}/consent/start?invite={link}", invite)


# --- the flow ---------------------------------------------------------------------------------------


class Onboarding:
    """Invites, the redirect to Entra's admin-consent page, and the callback with its proof."""

    def __init__(
        self,
        options: OnboardingOptions,
        keys: SigningKeySource,
        once: OnceStore,
        tokens: FreshTokens,
        recorder: ConsentRecorder,
        resolver: TenantResolver,
        audit: AuditSink,
        count: Callable[[str], None] = lambda _outcome: None,
    ) -> None:
        self._options = options
        self._keys = keys
        self._once = once
        self._tokens = tokens
        self._recorder = recorder
        self._resolver = resolver
        self._audit = audit
        self._count = count
        self._proofs: dict[TokenKey, asyncio.Task[ConsentProof]] = {}
        self._signer: tuple[str, LinkSigner] | None = None  # (key fingerprint, signer)

    @property
    def callback_url(self) -> str:
        """The redirect URI to register on the app (a Web platform redirect URI)."""
        return f"{self._options.public_base_url}/consent/callback"

    async def signer(self) -> LinkSigner:
        """The signer of the current key. A rotation in Key Vault is picked up with the credentials'
        periodic reload; links signed with the previous key then stop verifying."""
        text = await self._keys.consent_signing_key_text()
        if text is None:
            raise CredentialLoadError("consent_signing_key is not configured")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self._signer is None or self._signer[0] != digest:
            self._signer = (digest, LinkSigner(parse_signing_key(text)))
        return self._signer[1]

    # --- invite (admin callers) ---

    async def invite(
        self, caller: Caller, tenant: str, app: str | None = None, resource: str | None = None
    ) -> InviteLink:
        """A signed invite for ``tenant`` (a GUID, or whatever the resolver accepts); 403 unless the
        caller is an admin allowed that tenant and app."""
        fields: dict[str, Any] = {"caller": caller.name, "surface": "admin", "action": "invite"}
        fields.update(tenant=tenant, app=app, resource=resource, outcome="server_error")
        try:
            if not caller.admin:
                raise AccessDeniedError(f"caller {caller.name!r} may not administer tenants (admin: true)")
            guid = await self._resolver.resolve(tenant)
            app_name, chosen = invite_target(self._options, app, resource)
            fields.update(tenant=guid, app=app_name, resource=chosen)
            caller.check(tenant=guid, app=app_name)
            link = new_invite_link(self._options, await self.signer(), guid, app_name, chosen)
            fields.update(invite_id=link.invite.invite_id, expires_at=link.invite.expires_at, outcome="ok")
        except BrokerError as exc:
            fields["outcome"] = exc.error
            raise
        finally:
            # Every attempt, refused or not, is one audit line (never the link itself).
            self._audit.write(fields, message="tenant administration")
        return link

    # --- GET /consent/start ---

    async def start(self, invite_link: str) -> str | Outcome:
        """Entra's admin-consent URL with a fresh state, or the outcome of a bad invite."""
        signer = await self.signer()
        try:
            invite = signer.open_invite(invite_link, time.time())
        except ConsentLinkError as exc:
            page = Page.EXPIRED if exc.expired else Page.INVALID
            return self._outcome(page, f"invite: {exc.description}", None, signer)
        app = self._options.apps.get(invite.app)
        if app is None or invite.resource not in app.resources:
            return self._outcome(Page.INVALID, "the invite names an app or API not configured", None, signer)
        state_link, _ = signer.new_state(invite, time.time())
        log.info(
            "admin consent started",
            extra={"tenant": invite.tenant, "app": invite.app, "invite_id": invite.invite_id},
        )
        return consent_url(
            self._options.authority_host,
            invite.tenant,
            app.client_id,
            invite.resource,
            redirect_uri=self.callback_url,
            state=state_link,
        )

    # --- GET /consent/callback ---

    async def callback(self, query: Mapping[str, str]) -> Outcome:
        """Verify the state, claim it, read Entra's answer, compare tenants, prove; count and audit.

        Only a callback that gets as far as the proof records anything (Entra's verdict)."""
        started = time.monotonic()
        signer = await self.signer()
        try:
            state = signer.open_state(query.get("state", ""))
        except ConsentLinkError as exc:
            return self._callback_outcome(started, signer, Page.INVALID, f"state: {exc.description}", None)
        invite = state.invite
        if time.time() >= state.expires_at:
            return self._callback_outcome(started, signer, Page.EXPIRED, "the state has expired", invite)
        # Claimed before anything else is read: a state is spent by the first answer carrying it.
        if not await self._once.claim_once(STATE, state.state_id, STATE_TTL_SECONDS):
            return self._callback_outcome(started, signer, Page.USED, "the state was used before", invite)
        error = query.get("error")
        if error is not None:
            # admin_consent=True comes with errors too (FIELD-NOTES #9): the error decides.
            code = error if 0 < len(error) <= 64 and set(error) <= _ERROR_CODE_CHARS else "unknown_error"
            return self._callback_outcome(
                started,
                signer,
                Page.DECLINED,
                "the administrator declined" if code == "access_denied" else "Entra ID reported an error",
                invite,
                error_code=code,
                aadsts=_aadsts_in(query.get("error_description", "")),
            )
        if query.get("admin_consent", "").lower() != "true":
            return self._callback_outcome(
                started, signer, Page.INVALID, "the response does not say consent was granted", invite
            )
        if query.get("tenant", "").lower() != invite.tenant:
            # Consent given in another directory, or a forged tenant: never recorded against this one.
            return self._callback_outcome(
                started, signer, Page.INVALID, "the consent was given in another organization", invite
            )
        proof = await self._prove(invite)
        page, reason = _PAGE_OF_PROOF.get(proof.state, (Page.FAILED, "the consent could not be verified"))
        return self._callback_outcome(
            started,
            signer,
            page,
            reason,
            invite,
            roles=proof.roles_granted,
            missing=proof.missing_roles,
            error_code=proof.error,
            aadsts=proof.aadsts,
        )

    async def _prove(self, invite: Invite) -> ConsentProof:
        """One proof per (app, tenant, resource) at a time: a second callback joins the running one.
        The proof is recorded by its task, once, even if every browser waiting for it gives up."""
        key = TokenKey(invite.app, invite.tenant, invite.resource)
        running = self._proofs.get(key)
        if running is None:
            running = asyncio.create_task(self._prove_and_record(key))
            self._proofs[key] = running

            def forget(task: asyncio.Task[ConsentProof]) -> None:
                if self._proofs.get(key) is task:
                    del self._proofs[key]

            running.add_done_callback(forget)
        # shield: a browser that gives up must not cancel the proof another callback waits on.
        return await asyncio.shield(running)

    async def _prove_and_record(self, key: TokenKey) -> ConsentProof:
        proof = await self._prove_patiently(key)
        await self._recorder.record(proof)
        return proof

    async def _prove_patiently(self, key: TokenKey) -> ConsentProof:
        """A fresh token, asked again with backoff while Entra still says "not consented": a new
        service principal takes seconds to minutes to appear (AADSTS700016/7000229). Waiting holds
        no MSAL worker and never blocks the loop: each attempt takes one scheduler slot for one
        request, charged to the consent party's budget."""
        deadline = time.monotonic() + self._options.propagation_seconds
        wait = PROPAGATION_FIRST_WAIT_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                token = await self._tokens.acquire_fresh(key, CONSENT_PARTY, CONSENT_ACQUISITIONS_PER_MINUTE)
            except ConsentRequiredError as exc:
                if time.monotonic() + wait > deadline:
                    return _failed_proof(key, "consent_required", exc)
                log.info(
                    "consent not visible in Entra ID yet; asking again",
                    extra={"tenant": key.tenant, "app": key.app, "attempt": attempt, "aadsts": exc.aadsts},
                )
                await asyncio.sleep(wait)
                wait = min(wait * 2, PROPAGATION_MAX_WAIT_SECONDS)
                continue
            except BrokerError as exc:
                return _failed_proof(key, _registry_state(exc), exc)
            required = self._options.apps[key.app].required_roles.get(key.resource, [])
            missing = tuple(role for role in required if role not in token.roles)
            return ConsentProof(
                key.tenant,
                key.app,
                key.resource,
                "missing_roles" if missing else "ready",
                roles_granted=token.roles,
                missing_roles=missing,
            )

    def _callback_outcome(
        self,
        started: float,
        signer: LinkSigner,
        page: Page,
        reason: str,
        invite: Invite | None,
        *,
        roles: tuple[str, ...] = (),
        missing: tuple[str, ...] = (),
        error_code: str | None = None,
        aadsts: str | None = None,
    ) -> Outcome:
        """A callback's outcome, counted and audited (one line per callback, whatever happened)."""
        self._count(page.template)
        self._audit.write(
            {
                "caller": "-",
                "surface": "consent",
                "action": "callback",
                "tenant": invite.tenant if invite else None,
                "app": invite.app if invite else None,
                "resource": invite.resource if invite else None,
                "invite_id": invite.invite_id if invite else None,
                "outcome": page.template,
                "reason": reason,
                "roles_granted": list(roles),
                "missing_roles": list(missing),
                "error": error_code,
                "aadsts": aadsts,
                "latency_ms": round((time.monotonic() - started) * 1000, 3),
            },
            message="admin consent",
        )
        return self._outcome(
            page, reason, invite, signer, roles=roles, missing=missing, error_code=error_code, aadsts=aadsts
        )

    def _outcome(
        self,
        page: Page,
        reason: str,
        invite: Invite | None,
        signer: LinkSigner,
        *,
        roles: tuple[str, ...] = (),
        missing: tuple[str, ...] = (),
        error_code: str | None = None,
        aadsts: str | None = None,
    ) -> Outcome:
        app = self._options.apps.get(invite.app) if invite is not None else None
        restart = None
        if invite is not None and page in _RESTARTABLE and invite.expires_at > time.time():
            restart = f"{self._options.public_base_url}/consent/start?invite={signer.sign_invite(invite)}"
        return Outcome(
            page,
            reason,
            tenant=invite.tenant if invite else None,
            app=invite.app if invite else None,
            client_id=app.client_id if app else None,
            resource=invite.resource if invite else None,
            roles_granted=roles,
            missing_roles=missing,
            error_code=error_code,
            aadsts=aadsts,
            restart_url=restart,
        )


# Pages that offer the invitation link again (while it is valid): start over after an expired or
# spent state, a refusal, a proof that could not be made yet, or to grant the missing roles.
_RESTARTABLE: Final = frozenset(
    {Page.EXPIRED, Page.USED, Page.DECLINED, Page.PROPAGATING, Page.FAILED, Page.MISSING_ROLES}
)
_PAGE_OF_PROOF: Final[dict[str, tuple[Page, str]]] = {
    "ready": (Page.CONNECTED, "consent verified with a token"),
    "missing_roles": (Page.MISSING_ROLES, "consent verified, but required roles are missing"),
    "consent_required": (Page.PROPAGATING, "Entra ID does not show the consent yet"),
}


def _aadsts_in(description: str) -> str | None:
    """``AADSTSnnnn`` from Entra's error description, the only part of it a page repeats."""
    start = description.find(_AADSTS_IN)
    if start < 0:
        return None
    digits = ""
    for char in description[start + len(_AADSTS_IN) : start + len(_AADSTS_IN) + 10]:
        if not char.isdigit():
            break
        digits += char
    return f"{_AADSTS_IN}{digits}" if digits else None


def _registry_state(exc: BrokerError) -> str:
    if isinstance(exc, UnknownTenantError):
        return "unknown"
    if isinstance(exc, CredentialRejectedError) and exc.aadsts == "AADSTS7000112":
        return "disabled"  # the customer disabled the enterprise app in their tenant
    if isinstance(exc, ConsentRequiredError):
        return "consent_required"
    return "error"


def _failed_proof(key: TokenKey, state: str, exc: BrokerError) -> ConsentProof:
    log.info(
        "consent proof failed",
        extra={
            "tenant": key.tenant,
            "app": key.app,
            "state": state,
            "error": exc.error,
            "aadsts": exc.aadsts,
        },
    )
    retry = isinstance(exc, RetryLaterError)
    return ConsentProof(
        key.tenant,
        key.app,
        key.resource,
        state,
        error=exc.error if not retry else "temporarily_unavailable",
        aadsts=exc.aadsts,
    )
