"""Tenants as managed things: one identity per tenant, a registry of their state, re-validation.

* ``TenantResolver`` — a tenant *is* its GUID. A verified domain is resolved once through Entra's
  discovery document (``discovery.py``); the mapping is remembered for every replica in Redis
  (``tenant_domain_ttl_seconds``, about a day) and in a bounded in-process LRU, and one resolution per
  domain runs at a time in a process (single-flight). A domain Entra does not know is remembered for
  ``negative_cache_seconds``. It also says whether a caller's ``tenants`` policy, which may name GUIDs
  or domains, names a tenant.
* ``TenantRegistry`` — per tenant GUID: the domains seen and, per (app, resource), a state (``STATES``),
  the roles of the last token and those missing against ``apps.NAME.required_roles``, timestamps and
  the last error, updated on every acquisition outcome. Shared through Redis (one hash per tenant,
  changed under WATCH so that replicas writing at once merge, never overwrite) or, without Redis, kept
  in process (bounded). An entry is bounded: configured (app, resource) pairs, 16 domains, 64 roles.
* ``TenantSweep`` — one replica at a time (under a Redis lease) re-acquires every (tenant, app,
  resource) not checked within ``tenant_check_interval_seconds``, at most ``tenant_check_rate`` Entra
  requests a second, jittered, as its own party that waits for idle MSAL workers; it publishes the
  ``broker_tenants`` gauge.
* ``Tenants`` — the admin operations (list, show, check, remove) over the three.

Threat notes: a caller looping over random domains costs discovery requests, so a resolution is
charged to the caller's acquisition budget, and a domain Entra does not know never creates a registry
entry (only tenants that exist do: the registry cannot be grown by guessing). Tenant ids are never
metric labels. Nothing here speaks HTTP (``admin.py``) or Redis (``cache.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from broker.config import DOMAIN_RE, GUID_RE
from broker.entra import DISABLED_CODES
from broker.errors import (
    AccessDeniedError,
    BrokerError,
    ConsentRequiredError,
    CredentialLoadError,
    CredentialRejectedError,
    RetryLaterError,
    SharedCacheError,
    TemporarilyUnavailableError,
    UnknownTenantError,
    UpstreamError,
)
from broker.tokens import AccessToken, TokenKey, TokenRequest

if TYPE_CHECKING:
    from broker.cache import TokenCache
    from broker.callers import Caller
    from broker.config import TenantOptions
    from broker.metrics import Metrics
    from broker.service import TokenBroker

log = logging.getLogger(__name__)

# A (tenant, app, resource)'s state, from its last Entra outcome.
STATES = ("ready", "missing_roles", "consent_required", "disabled", "unknown", "error")
NEW = "new"  # the "from" of a first record
# Which state the admin table shows for a tenant: the most telling of its (app, resource) states.
_SUMMARY_ORDER = ("unknown", "disabled", "consent_required", "missing_roles", "error", "ready")
_DISABLED_AADSTS = frozenset(f"AADSTS{code}" for code in DISABLED_CODES)
MAX_DOMAINS = 16
MAX_ROLES = 64
MAX_KNOWN_DOMAINS = 10_000
MAX_UNKNOWN_DOMAINS = 1_000  # separate, so guessed domains cannot evict real mappings
META = "tenant"  # the registry field holding first_seen and the domains
_KEY_PREFIX = "k:"  # registry fields of (app, resource) states: k:{app}|{resource}
PAGE_MAX = 500
_BATCH = 500
_MAX_EXAMINED_PER_PAGE = 5_000
# The sweep: how spread out the due times of entries checked together are, how long one pass checks
# before the registry is read (and the gauge published) again, and the longest pause between passes.
_DUE_JITTER = 0.1
_PASS_SECONDS = 60.0
_MAX_TICK_SECONDS = 60.0
SWEEP_TRIGGER = "sweep"
ADMIN_TRIGGER = "admin"


# --- canonical identity ---------------------------------------------------------------------------


class DomainDiscovery(Protocol):
    """Which tenant a domain belongs to (``discovery.TenantDiscovery``)."""

    async def tenant_id(self, domain: str) -> str: ...


class TenantResolver:
    """Names every tenant by its GUID; one resolution per domain, remembered in Redis and in process."""

    def __init__(
        self,
        discovery: DomainDiscovery,
        cache: TokenCache,
        metrics: Metrics,
        options: TenantOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._discovery = discovery
        self._cache = cache
        self._metrics = metrics
        self._options = options
        self._clock = clock
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()  # domain -> (tenant, end)
        self._by_tenant: dict[str, set[str]] = {}  # tenant -> its domains in _known
        self._unknown: OrderedDict[str, float] = OrderedDict()  # domain -> end
        self._flights: dict[str, asyncio.Task[str]] = {}

    def known(self, spelling: str) -> str | None:
        """The GUID ``spelling`` names when that is known without asking anyone (a request served
        from memory, audit lines); a domain found is kept as recently used."""
        spelling = spelling.lower()
        if GUID_RE.fullmatch(spelling):
            return spelling
        hit = self._known.get(spelling)
        if hit is None or hit[1] <= self._clock():
            return None
        self._known.move_to_end(spelling)
        return hit[0]

    def domains_of(self, tenant: str) -> tuple[str, ...]:
        """The domains this process has resolved to ``tenant``."""
        return tuple(sorted(self._by_tenant.get(tenant, ())))

    async def canonical(self, spelling: str, charge: Callable[[], None] | None = None) -> str:
        """The GUID of the tenant ``spelling`` (a GUID or a verified domain) names.

        ``charge`` is called, in the caller's task, before this process starts resolving a domain it
        does not know (Redis, then Entra): a resolution is an upstream request paid from the asking
        caller's budget. Raises ``UnknownTenantError`` for a domain Entra does not know.
        """
        spelling = spelling.lower()
        if GUID_RE.fullmatch(spelling):
            return spelling
        now = self._clock()
        hit = self._known.get(spelling)
        if hit is not None:
            if hit[1] > now:
                self._known.move_to_end(spelling)
                return hit[0]
            self._drop(spelling)
        unknown_until = self._unknown.get(spelling)
        if unknown_until is not None:
            if unknown_until > now:
                raise _unknown(spelling)
            del self._unknown[spelling]
        flight = self._flights.get(spelling)
        if flight is None:
            if charge is not None:
                charge()
            flight = asyncio.create_task(self._resolve(spelling))
            self._flights[spelling] = flight
            flight.add_done_callback(lambda done: self._landed(spelling, done))
        # shield: a caller that disconnects must not cancel the resolution others wait on.
        return await asyncio.shield(flight)

    async def policy_name(self, policy: Iterable[str], spelling: str, tenant: str) -> str | None:
        """The entry of a caller's ``tenants`` policy that names ``tenant`` (asked for as ``spelling``),
        by GUID or by a domain resolving to it; ``None`` when none does.

        A policy domain that cannot be resolved right now names nothing; if no entry matched and one
        could not be resolved for a transient reason, that is the answer (503), not a refusal.
        """
        entries = set(policy)
        if spelling in entries:
            return spelling
        if tenant in entries:
            return tenant
        transient: BrokerError | None = None
        for entry in sorted(entries):
            if not DOMAIN_RE.fullmatch(entry):
                continue
            try:
                if await self.canonical(entry) == tenant:
                    return entry
            except UnknownTenantError:
                continue
            except RetryLaterError as exc:
                transient = exc
        if transient is not None:
            raise transient
        return None

    def forget(self, tenant: str, domains: Iterable[str] = ()) -> None:
        """Drop what this process knows of ``tenant``'s domains (offboarding)."""
        for domain in {*self._by_tenant.get(tenant, ()), *domains}:
            self._drop(domain)
            self._unknown.pop(domain, None)

    async def _resolve(self, domain: str) -> str:
        record = await self._cache.read_domain(domain)
        if record is not None:
            if record.tenant is None:
                self._count("redis", "unknown")
                self._remember_unknown(domain)
                raise _unknown(domain)
            self._count("redis", "ok")
            self._remember(domain, record.tenant)
            return record.tenant
        try:
            tenant = await self._discovery.tenant_id(domain)
        except UnknownTenantError:
            self._count("discovery", "unknown")
            self._remember_unknown(domain)
            await self._cache.write_domain(domain, None, self._options.unknown_domain_seconds)
            raise
        except BrokerError:
            self._count("discovery", "error")
            raise
        self._count("discovery", "ok")
        self._remember(domain, tenant)
        await self._cache.write_domain(domain, tenant, self._options.domain_ttl_seconds)
        log.info("domain resolved", extra={"domain": domain, "tenant": tenant})
        return tenant

    def _landed(self, domain: str, done: asyncio.Task[str]) -> None:
        if self._flights.get(domain) is done:
            del self._flights[domain]
        if not done.cancelled():
            done.exception()  # retrieved here so an unawaited failure is not logged as lost

    def _remember(self, domain: str, tenant: str) -> None:
        self._drop(domain)
        self._known[domain] = (tenant, self._clock() + self._options.domain_ttl_seconds)
        self._by_tenant.setdefault(tenant, set()).add(domain)
        while len(self._known) > MAX_KNOWN_DOMAINS:
            self._drop(next(iter(self._known)))

    def _remember_unknown(self, domain: str) -> None:
        if self._options.unknown_domain_seconds <= 0:
            return
        self._unknown[domain] = self._clock() + self._options.unknown_domain_seconds
        self._unknown.move_to_end(domain)
        while len(self._unknown) > MAX_UNKNOWN_DOMAINS:
            self._unknown.popitem(last=False)

    def _drop(self, domain: str) -> None:
        entry = self._known.pop(domain, None)
        if entry is None:
            return
        domains = self._by_tenant.get(entry[0])
        if domains is not None:
            domains.discard(domain)
            if not domains:
                del self._by_tenant[entry[0]]

    def _count(self, source: str, outcome: str) -> None:
        self._metrics.tenant_resolutions.labels(source=source, outcome=outcome).inc()


def _unknown(domain: str) -> UnknownTenantError:
    return UnknownTenantError(f"Entra ID does not know tenant {domain}", aadsts="AADSTS90002")


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """What one acquisition outcome says about a (tenant, app, resource)."""

    state: str
    at: float  # epoch seconds
    roles: tuple[str, ...] | None = None  # the token's roles (None: no token)
    missing_roles: tuple[str, ...] = ()
    error: str | None = None
    aadsts: str | None = None


def observe(outcome: AccessToken | BrokerError, required: tuple[str, ...], at: float) -> Observation | None:
    """The tenant state an outcome shows, or ``None`` when it says nothing about the tenant: a
    transient failure, a spent budget, or the app's own credential (that is app-wide)."""
    if isinstance(outcome, AccessToken):
        missing = tuple(role for role in required if role not in outcome.roles)
        return Observation("missing_roles" if missing else "ready", at, outcome.roles, missing)
    if isinstance(outcome, RetryLaterError | CredentialRejectedError | CredentialLoadError):
        return None
    if isinstance(outcome, ConsentRequiredError):
        state = "consent_required"
    elif isinstance(outcome, UnknownTenantError):
        state = "unknown"
    elif outcome.aadsts in _DISABLED_AADSTS:
        state = "disabled"
    elif isinstance(outcome, UpstreamError):
        state = "error"
    else:
        return None
    return Observation(state, at, error=outcome.error, aadsts=outcome.aadsts)


def merge_entry(current: dict[str, Any] | None, seen: Observation) -> dict[str, Any] | None:
    """``current`` (a stored (app, resource) entry) updated with ``seen``; ``None`` when nothing is to
    be written: an outcome older than the stored one (a slow replica), or ``unknown`` for a tenant
    never registered (guessing GUIDs must not grow the registry)."""
    if current is None and seen.state == "unknown":
        return None
    if current is not None and _number(current.get("last_checked_at")) > seen.at:
        return None
    entry = dict(current or {})
    entry.setdefault("first_seen", seen.at)
    if entry.get("state") != seen.state:
        entry["changed_at"] = seen.at
    entry["state"] = seen.state
    entry["last_checked_at"] = seen.at
    if seen.roles is not None:
        entry["roles"] = list(seen.roles[:MAX_ROLES])
        entry["missing_roles"] = list(seen.missing_roles[:MAX_ROLES])
        entry["last_token_at"] = seen.at
    if seen.error is not None:
        entry["last_error"] = {"error": seen.error, "aadsts": seen.aadsts, "at": seen.at}
    return entry


def merge_meta(current: dict[str, Any] | None, domains: Iterable[str], at: float) -> dict[str, Any]:
    """The tenant-wide part of an entry: when it was first seen and its domains (the latest 16)."""
    seen = [d for d in (current or {}).get("domains", []) if isinstance(d, str)]
    for domain in domains:
        if domain in seen:
            seen.remove(domain)
        seen.append(domain)
    first_seen = (current or {}).get("first_seen")
    return {
        "first_seen": first_seen if isinstance(first_seen, int | float) else at,
        "domains": seen[-MAX_DOMAINS:],
    }


def _field(app: str, resource: str) -> str:
    return f"{_KEY_PREFIX}{app}|{resource}"


def _keys(fields: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(app, resource, entry) of every (app, resource) field of a tenant's entry."""
    for field, entry in fields.items():
        if field.startswith(_KEY_PREFIX):
            app, _, resource = field.removeprefix(_KEY_PREFIX).partition("|")
            yield app, resource, entry


class TenantRegistry:
    """The per-tenant record of every acquisition outcome; in Redis, or in process without it."""

    def __init__(
        self,
        cache: TokenCache,
        metrics: Metrics,
        options: TenantOptions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._options = options
        self._clock = clock
        self._local: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()

    async def record(
        self, key: TokenKey, outcome: AccessToken | BrokerError, domains: Iterable[str] = ()
    ) -> None:
        """Record an Entra outcome for ``key`` (``domains``: those known to name its tenant), and count
        the state change it makes. Fails open: a write Redis refuses is logged and dropped (the next
        acquisition or the sweep writes again)."""
        required = self._options.required_roles.get(key.app, {}).get(key.resource, ())
        seen = observe(outcome, required, self._clock())
        if seen is None:
            return
        field, names = _field(key.app, key.resource), tuple(domains)

        def change(before: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
            entry = merge_entry(before[field], seen)
            if entry is None:
                return {}
            meta = merge_meta(before[META], names, seen.at)
            return {field: entry} if meta == before[META] else {field: entry, META: meta}

        if self._cache.shared:
            before = await self._cache.update_registry(key.tenant, (field, META), change)
        else:
            before = self._update_local(key.tenant, (field, META), change)
        if before is None or merge_entry(before[field], seen) is None:
            return
        previous = before[field]
        was = str(previous.get("state")) if previous is not None else NEW
        if was != seen.state:
            self._metrics.tenant_transitions.labels(key.app, was, seen.state).inc()
            log.info(
                "tenant state changed",
                extra={
                    "tenant": key.tenant,
                    "app": key.app,
                    "resource": key.resource,
                    "from": was,
                    "to": seen.state,
                    "aadsts": seen.aadsts,
                    "missing_roles": list(seen.missing_roles) or None,
                },
            )

    async def entry(self, tenant: str) -> dict[str, dict[str, Any]] | None:
        """``tenant``'s stored entry (field -> value), or ``None`` when it is not registered."""
        return (await self.entries([tenant])).get(tenant)

    async def entries(self, tenants: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        if not self._cache.shared:
            return {t: dict(self._local[t]) for t in tenants if t in self._local}
        found = await self._cache.registry_entries(tenants)
        if found is None:
            raise _registry_unavailable()
        return found

    async def tenants_after(self, after: str, count: int) -> list[str]:
        """Up to ``count`` registered tenants after ``after`` (lexical order; "" from the start)."""
        if not self._cache.shared:
            return sorted(t for t in self._local if t > after)[:count]
        found = await self._cache.registry_tenants(after, count)
        if found is None:
            raise _registry_unavailable()
        return found

    async def scan(self) -> AsyncIterator[tuple[str, dict[str, dict[str, Any]]]]:
        """Every registered tenant with its entry, in batches."""
        after = ""
        while batch := await self.tenants_after(after, _BATCH):
            entries = await self.entries([t for t in batch if GUID_RE.fullmatch(t)])
            for tenant in batch:
                if tenant in entries:
                    yield tenant, entries[tenant]
            after = batch[-1]

    def forget_local(self, tenant: str) -> bool:
        """Drop ``tenant``'s in-process entry (without Redis); whether there was one."""
        return self._local.pop(tenant, None) is not None

    def _update_local(
        self,
        tenant: str,
        fields: tuple[str, ...],
        change: Callable[[dict[str, dict[str, Any] | None]], dict[str, dict[str, Any]]],
    ) -> dict[str, dict[str, Any] | None]:
        stored = self._local.get(tenant, {})
        before = {field: stored.get(field) for field in fields}
        after = change(before)
        if after:
            self._local[tenant] = {**stored, **after}
            self._local.move_to_end(tenant)
            while len(self._local) > self._options.local_max_entries:
                self._local.popitem(last=False)
        return before


def _registry_unavailable() -> TemporarilyUnavailableError:
    return TemporarilyUnavailableError(
        "the tenant registry (Redis) is unavailable; retry later", retry_after=1
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _iso(value: Any) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def render(tenant: str, fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A registry entry as the admin API shows it (timestamps as ISO-8601 UTC)."""
    meta = fields.get(META) or {}
    apps: dict[str, dict[str, Any]] = {}
    for app, resource, entry in sorted(_keys(fields)):
        error = entry.get("last_error")
        apps.setdefault(app, {})[resource] = {
            "state": entry.get("state"),
            "roles": list(entry.get("roles") or []),
            "missing_roles": list(entry.get("missing_roles") or []),
            "first_seen": _iso(entry.get("first_seen")),
            "last_token_at": _iso(entry.get("last_token_at")),
            "last_checked_at": _iso(entry.get("last_checked_at")),
            "changed_at": _iso(entry.get("changed_at")),
            "last_error": (
                {"error": error.get("error"), "aadsts": error.get("aadsts"), "at": _iso(error.get("at"))}
                if isinstance(error, dict)
                else None
            ),
        }
    states = {entry.get("state") for _, _, entry in _keys(fields)}
    return {
        "tenant": tenant,
        "state": next((state for state in _SUMMARY_ORDER if state in states), None),
        "domains": list(meta.get("domains") or []),
        "first_seen": _iso(meta.get("first_seen")),
        "apps": apps,
    }


def _matches(fields: dict[str, dict[str, Any]], state: str | None, app: str | None) -> bool:
    return any(
        (app is None or app == entry_app) and (state is None or state == entry.get("state"))
        for entry_app, _, entry in _keys(fields)
    )


# --- re-validation --------------------------------------------------------------------------------


class TenantSweep:
    """Re-acquires stale registry entries; one replica at a time, at a bounded, jittered pace."""

    def __init__(
        self,
        registry: TenantRegistry,
        cache: TokenCache,
        check: Callable[[TokenKey], Awaitable[object]],
        metrics: Metrics,
        options: TenantOptions,
        rng: random.Random | None = None,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._check = check
        self._metrics = metrics
        self._options = options
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._holder = cache.new_holder()

    async def run(self) -> None:
        """Sweep whenever this replica holds the lease; runs until cancelled (supervised)."""
        try:
            while True:
                if await self._lead():
                    try:
                        await self._sweep_once()
                    except RetryLaterError as exc:  # the registry is unreadable now (Redis): next tick
                        log.warning("tenant sweep skipped", extra={"reason": exc.description})
                else:
                    self._metrics.tenants.clear()  # the sweeper publishes; a former one must not linger
                await asyncio.sleep(self._tick())
        finally:
            self._metrics.tenants.clear()
            if self._cache.shared:
                await asyncio.shield(self._cache.release_sweep_lease(self._holder))

    async def _lead(self) -> bool:
        """Whether this replica is (still) the sweeper: always without Redis; with it, while it holds
        the lease (not while Redis is down: every replica would then sweep)."""
        if not self._cache.shared:
            return True
        return await self._cache.take_sweep_lease(self._holder, self._options.sweep_lease_seconds)

    async def _sweep_once(self) -> None:
        """Read the registry, publish its counts, then check the stalest due entries for up to a
        minute's worth of checks (the registry is read again after that)."""
        now = time.time()
        counts: Counter[tuple[str, str]] = Counter()
        due: list[tuple[float, TokenKey]] = []
        async for tenant, fields in self._registry.scan():
            for app, resource, entry in _keys(fields):
                if resource not in self._options.resources.get(app, ()):
                    continue  # an app or resource no longer configured
                counts[(app, str(entry.get("state")))] += 1
                last = _number(entry.get("last_checked_at"))
                spread = _spread(tenant, app, resource)
                if now - last >= self._options.check_interval_seconds * (1 - _DUE_JITTER * spread):
                    due.append((last, TokenKey(app, tenant, resource)))
        self._publish(counts)
        due.sort(key=lambda item: item[0])
        budget = max(1, int(self._options.check_rate * _PASS_SECONDS))
        if len(due) > budget:
            log.info("tenant sweep behind", extra={"due": len(due), "checking": budget})
        for _, key in due[:budget]:
            if not await self._lead():
                return
            outcome = "ok"
            try:
                await self._check(key)
            except BrokerError as exc:
                outcome = exc.error
            self._metrics.tenant_checks.labels(trigger=SWEEP_TRIGGER, outcome=outcome).inc()
            # Never faster than check_rate: the pause follows the check, up to half as long again.
            await asyncio.sleep((1 + self._rng.random() / 2) / self._options.check_rate)

    def _publish(self, counts: Counter[tuple[str, str]]) -> None:
        for app in self._options.resources:
            for state in STATES:
                self._metrics.tenants.labels(app, state).set(counts[(app, state)])

    def _tick(self) -> float:
        base = min(_MAX_TICK_SECONDS, self._options.check_interval_seconds / 4)
        return base * (0.5 + self._rng.random())


def _spread(*parts: str) -> float:
    """A stable number in [0, 1) per entry: entries registered together fall due at different times."""
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --- what the admin API does ----------------------------------------------------------------------


class Tenants:
    """List, show, check and remove tenants: the registry, the resolver and the broker together."""

    def __init__(
        self,
        resolver: TenantResolver,
        registry: TenantRegistry,
        cache: TokenCache,
        broker: TokenBroker,
        metrics: Metrics,
        options: TenantOptions,
    ) -> None:
        self._resolver = resolver
        self._registry = registry
        self._cache = cache
        self._broker = broker
        self._metrics = metrics
        self._options = options

    def known(self, spelling: str) -> str | None:
        """The GUID ``spelling`` names, when known without asking (audit lines)."""
        return self._resolver.known(spelling)

    async def page(
        self, *, cursor: str, limit: int, state: str | None, app: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` registered tenants after ``cursor`` matching the filters, and the cursor of
        the next page (``None``: no more). A page may be short when filters skip many tenants: each
        request examines a bounded number of entries."""
        found: list[dict[str, Any]] = []
        after, examined = cursor, 0
        while examined < _MAX_EXAMINED_PER_PAGE:
            batch = await self._registry.tenants_after(after, _BATCH)
            if not batch:
                return found, None
            entries = await self._registry.entries([t for t in batch if GUID_RE.fullmatch(t)])
            for tenant in batch:
                after, examined = tenant, examined + 1
                fields = entries.get(tenant)
                if fields is not None and _matches(fields, state, app):
                    found.append(render(tenant, fields))
                    if len(found) == limit:
                        more = await self._registry.tenants_after(after, 1)
                        return found, after if more else None
        return found, after

    async def show(self, spelling: str) -> dict[str, Any]:
        tenant = await self._resolver.canonical(spelling)
        fields = await self._registry.entry(tenant)
        if fields is None:
            raise UnknownTenantError(f"tenant {spelling} is not in the registry")
        return render(tenant, fields)

    async def check(self, caller: Caller, spelling: str, app: str | None) -> dict[str, Any]:
        """Forget remembered failures and ask Entra now, once per app x resource (``app``: one app),
        under the caller's policy and budget; the outcomes and the updated entry."""
        apps = [app] if app is not None else sorted(self._options.resources)
        if app is not None and app not in self._options.resources:
            raise AccessDeniedError(f"unknown app {app!r}")
        results: list[dict[str, Any]] = []
        tenant = ""
        for name in apps:
            if app is None and "*" not in caller.apps and name not in caller.apps:
                continue  # all apps: those this caller may use
            for resource in self._options.resources[name]:
                request = TokenRequest(tenant=spelling, resource=resource, app=name)
                key = await self._broker.canonical_key(caller, request)
                tenant = key.tenant
                outcome: dict[str, Any] = {"app": name, "resource": resource, "outcome": "ok"}
                try:
                    token = await self._broker.check(key, caller)
                    outcome["roles"] = list(token.roles)
                except BrokerError as exc:
                    outcome.update(outcome=exc.error, error_description=exc.description, aadsts=exc.aadsts)
                self._metrics.tenant_checks.labels(trigger=ADMIN_TRIGGER, outcome=outcome["outcome"]).inc()
                results.append(outcome)
        if not tenant:
            raise AccessDeniedError(f"caller {caller.name!r} may use no configured app")
        fields = await self._registry.entry(tenant)
        return {
            "tenant": tenant,
            "checks": results,
            "entry": render(tenant, fields) if fields is not None else None,
        }

    async def remove(self, spelling: str) -> dict[str, Any]:
        """Offboard: every trace of the tenant, in Redis and in every replica's memory."""
        tenant = await self._resolver.canonical(spelling)
        fields = await self._registry.entry(tenant)
        meta = (fields or {}).get(META) or {}
        domains = {
            *self._resolver.domains_of(tenant),
            *(d for d in meta.get("domains") or [] if isinstance(d, str)),
        }
        if spelling.lower() != tenant:
            domains.add(spelling.lower())
        try:
            removed, notified = await self._cache.offboard(tenant, sorted(domains))
        except SharedCacheError as exc:
            raise TemporarilyUnavailableError(
                f"Redis is unavailable ({exc}): the tenant was not removed; retry", retry_after=1
            ) from None
        local = self.forget(tenant, sorted(domains))
        if not self._cache.shared:
            removed = {"tokens": local["tokens"], "registry_entry": int(local["registry_entry"])}
        log.info("tenant offboarded", extra={"tenant": tenant, "removed": removed, "replicas": notified})
        return {"tenant": tenant, "removed": removed, "replicas_notified": notified}

    def forget(self, tenant: str, domains: list[str]) -> dict[str, int]:
        """Drop what this process holds of ``tenant`` (an offboarding, here or broadcast by another
        replica): tokens, remembered failures and throttles, domain mappings, registry entry."""
        tokens = self._cache.purge_local(tenant) + sum(self._cache.purge_local(d) for d in domains)
        self._resolver.forget(tenant, domains)
        self._broker.forget_tenant(tenant)
        return {"tokens": tokens, "registry_entry": int(self._registry.forget_local(tenant))}
