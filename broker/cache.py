"""Everything the broker keeps: L1 in process, Redis shared by every replica, and the lease.

This is the only module that imports ``redis``: the client factory (``connect_redis``: standalone,
Cluster or Sentinel, with TLS, ACL passwords or Entra ID tokens), every key name (``_Names``), the
token cache, the lease, remembered failures, throttles, the purge broadcast and its listener all live
here. Entra ID authentication (``EntraRedisCredentials``) takes tokens from the broker's own
azure-identity credential (an azure-core ``AsyncTokenCredential``, built in ``app.py``) and translates
azure-core's errors into redis-py's ``AuthenticationError``; it imports no Azure SDK client.

Redis is semi-trusted: everything read back from it is authenticated or bounded. Tokens and
remembered failures are AES-GCM ciphertext bound to their key name (``crypto.py``); a throttle's TTL
is clamped; a lease without a TTL is replaced. Decided failure mode: Redis fails *open*. The client
retries a dropped connection itself; what still fails is logged, counted by reason
(``broker_redis_failures_total``) and that request carries on from L1 or by acquiring directly. One
key's failure (a wrong type, ``MOVED``, ``READONLY``, ``NOPERM``, one lost connection) never pauses
other keys; only when Redis looks down (several calls in a row cannot reach it, or calls keep timing
out) is it skipped for a short back-off, so requests do not each pay the timeout. A lease is released
and a fresh token stored even then. A bad value under one key (wrong type, does not open) is that
key's miss, never an outage.

Key names share one hash tag per (app, tenant) so a key's token, lease, failure and throttle land in
one Redis Cluster slot: ``tb:v1:{kind}:{app|tenant}[:resource]``.

For ``tenants.py`` (at the end of each class): a verified domain's tenant GUID
(``tb:v1:dom:{domain}``, sealed, and the reverse set ``tb:v1:doms:{tenant}``), the tenant registry
(one hash per tenant, ``tb:v1:reg:{tenant}``, one sealed JSON value per field, updated under WATCH so
replicas writing at once never lose each other's writes, plus the sorted index ``tb:v1:reg-index``),
the re-validation sweep's lease, and offboarding with its broadcast.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import functools
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import redis as redis_package
from azure.core.exceptions import AzureError
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.auth.token import SimpleToken
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.credentials import CredentialProvider
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    MaxConnectionsError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.config import DOMAIN_RE, GUID_RE, read_env_secret
from broker.errors import BrokerError, SealError, SharedCacheError, error_from_body, remembered_body
from broker.tokens import AccessToken, TokenKey

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

    from broker.config import CacheOptions, RedisOptions
    from broker.crypto import Sealer
    from broker.metrics import Metrics

log = logging.getLogger(__name__)

_PREFIX = "tb:v1"
PURGE_CHANNEL = f"{_PREFIX}:purge"
OFFBOARD_CHANNEL = f"{_PREFIX}:offboard"
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# SET NX, re-entrant for the same holder (whose earlier attempt may have timed out after it landed),
# and a lease some bug or intruder left without a TTL, which would block its key forever, is
# replaced (a lease always expires).
_TAKE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('pttl', KEYS[1]) == -1 then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
REDIS_BACKOFF_SECONDS = 1.0
# Calls in a row that failed to reach Redis (after the client's retries) before it counts as down.
REDIS_DOWN_AFTER_FAILURES = 3
# /readyz's write probe: keys that expire on their own, in slots spread over the whole slot space.
PROBE_TTL_MS = 10_000
_PROBE_SLOTS = 8
# A throttle read back from Redis is honoured for at most this long (Entra's Retry-After is seconds
# to minutes; a value of years is an intruder's or a bug's).
MAX_THROTTLE_SECONDS = 300.0
# Remembered failures and sealed tokens are small; anything larger under our keys is not ours.
MAX_VALUE_BYTES = 64 * 1024

T = TypeVar("T")


class _Down(enum.Enum):
    """What a guarded Redis call returns instead of a result."""

    DOWN = enum.auto()  # not configured, backing off, or the call failed: fail open
    SLOW = enum.auto()  # this call timed out while Redis otherwise answers (a loaded host, say)


DOWN = _Down.DOWN
SLOW = _Down.SLOW


class Lease(enum.Enum):
    """The outcome of asking for a key's acquisition lease."""

    ACQUIRED = "acquired"  # this replica holds it: acquire, store, and it is released on exit
    UNAVAILABLE = "unavailable"  # Redis is down or not configured: acquire directly (fail open)
    HELD = "held"  # another replica is acquiring: wait for its token to land in Redis


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache knows about a key, from one Redis round-trip."""

    token: AccessToken | None = None
    failure: BrokerError | None = None  # a remembered permanent failure
    throttled_seconds: float = 0.0  # Entra asked this (app, tenant) to hold off this long


@dataclass(frozen=True, slots=True)
class DomainRecord:
    """What some replica learnt about a verified domain: its tenant, or ``None`` (Entra does not know it)."""

    tenant: str | None


# Tenant registry: a replica retries its read-change-write this often when other replicas keep
# writing the same entry between its read and its write; an entry has at most this many fields.
REGISTRY_WRITE_ATTEMPTS = 8
MAX_REGISTRY_FIELDS = 256
MAX_BROADCAST_BYTES = 16 * 1024
# What offboarding reports, by the kind in the key name.
_REMOVED_AS = {
    "tok": "tokens",
    "lock": "leases",
    "neg": "remembered_failures",
    "throttle": "throttles",
    "dom": "domain_mappings",
    "reg": "registry_entry",
}


@functools.cache
def _probe_names() -> tuple[str, ...]:
    names: dict[int, str] = {}
    tag = 0
    while len(names) < _PROBE_SLOTS:
        name = f"{_PREFIX}:probe:{{{tag}}}"
        names.setdefault(key_slot(name.encode()) * _PROBE_SLOTS // 16384, name)
        tag += 1
    return tuple(names[part] for part in sorted(names))


class _Names:
    """Every Redis key name the broker uses."""

    @staticmethod
    def slot(app: str, tenant: str) -> str:
        return f"{{{app}|{tenant}}}"

    @classmethod
    def token(cls, key: TokenKey) -> str:
        return f"{_PREFIX}:tok:{cls.slot(key.app, key.tenant)}:{key.resource}"

    @classmethod
    def lease(cls, key: TokenKey) -> str:
        return f"{_PREFIX}:lock:{cls.slot(key.app, key.tenant)}:{key.resource}"

    @classmethod
    def failure(cls, key: TokenKey) -> str:
        return f"{_PREFIX}:neg:{cls.slot(key.app, key.tenant)}:{key.resource}"

    @classmethod
    def throttle(cls, key: TokenKey) -> str:
        return f"{_PREFIX}:throttle:{cls.slot(key.app, key.tenant)}"

    @staticmethod
    def once(scope: str, name: str) -> str:
        """A single-use marker (an onboarding ``state``'s id): set once, never read back."""
        return f"{_PREFIX}:once:{scope}:{name}"

    @staticmethod
    def probes() -> tuple[str, ...]:
        """``/readyz``'s probe keys: one in each of ``_PROBE_SLOTS`` equal parts of the 16,384 hash
        slots, so that every node of a Cluster (read as one server by mistake) owns some of them."""
        return _probe_names()

    @staticmethod
    def tenant_patterns(tenant: str) -> list[str]:
        """SCAN patterns matching every entry of a tenant, whatever its kind, app or resource."""
        return [f"{_PREFIX}:{kind}:{{*|{tenant}}}*" for kind in ("tok", "lock", "neg", "throttle")]

    # --- tenants (tenants.py) ----------------------------------------------------------------------

    @staticmethod
    def domain(domain: str) -> str:
        """A verified domain's tenant GUID (or that Entra does not know it)."""
        return f"{_PREFIX}:dom:{{{domain}}}"

    @staticmethod
    def domains_of(tenant: str) -> str:
        """The domains some replica resolved to ``tenant`` (to find their mappings when offboarding)."""
        return f"{_PREFIX}:doms:{{{tenant}}}"

    @staticmethod
    def registry(tenant: str) -> str:
        """The tenant's registry entry: a hash of sealed JSON values."""
        return f"{_PREFIX}:reg:{{{tenant}}}"

    @staticmethod
    def registry_index() -> str:
        """Every registered tenant GUID, in a sorted set (score 0: lexical order, for cursors)."""
        return f"{_PREFIX}:reg-index"

    @staticmethod
    def sweep_lease() -> str:
        """Held by the one replica running the re-validation sweep."""
        return f"{_PREFIX}:sweep"


RedisClient: TypeAlias = Redis | RedisCluster
# What a Redis call can raise when Redis (not the broker) is the problem. The cluster client raises
# RedisClusterException, which is no RedisError, when no node is reachable or a slot has no node.
REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
# The purge listener's: redis-py's pub/sub also raises these two on a connection it lost mid-read.
_LISTENER_FAILURES: tuple[type[Exception], ...] = (*REDIS_FAILURES, RuntimeError, AttributeError)
# The scope Azure Cache for Redis and Azure Managed Redis accept tokens for (Entra ID authentication).
ENTRA_REDIS_SCOPE = "https://redis.azure.com/.default"
# Connection errors are retried this many times, with jittered exponential backoff, on every command:
# a connection the server dropped (idle timeout, failover, CLIENT KILL, maintenance) costs a reconnect,
# not a failed command. Timeouts are not retried (outside cluster mode): a frozen server must cost one
# timeout, not three.
REDIS_RETRIES = 2
# Pools are sized max_connections + this: the purge listener holds one connection for good (two while
# it moves to a freshly authenticated one), and the cache's own calls are bounded by max_connections.
_POOL_HEADROOM = 2
# Renew the Entra token this long before it expires (at most a third of its lifetime); azure-identity
# hands out a new token only within five minutes of the old one's expiry.
ENTRA_RENEW_MARGIN_SECONDS = 240.0
ENTRA_RETRY_MIN_SECONDS = 1.0


def _retry() -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(cap=0.25, base=0.02),
        REDIS_RETRIES,
        supported_errors=(RedisConnectionError,),
    )


def connect_redis(
    options: RedisOptions, *, read_timeout: bool = True, credentials: EntraRedisCredentials | None = None
) -> RedisClient:
    """The one place Redis clients are built (cache, purge listener, CLI), for every mode.

    ``standalone``: one server (or a proxy). ``cluster``: ``RedisCluster``, which follows MOVED/ASK
    and keeps one bounded pool per node. ``sentinel``: the master the sentinels name, re-asked after a
    failover (a demoted master's ``READONLY`` drops the connection, and the retry finds the new one).
    Each with TLS (``redis_ca_file``, client certificate), and ``credentials`` (Entra tokens) or the
    URL's password or ``redis_password``. Connections are opened within the connect timeout (TCP, TLS
    handshake, AUTH) and commands answered within the command timeout; ``read_timeout=False`` for a
    subscriber, which waits by design.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": options.timeout_seconds if read_timeout else None,
        "socket_connect_timeout": options.connect_timeout_seconds,
        "retry": _retry(),
        **_tls_arguments(options),
    }
    provider: CredentialProvider | None = credentials or _password_provider(options)
    if provider is not None:
        kwargs["credential_provider"] = provider
    max_connections = options.max_connections + _POOL_HEADROOM
    if options.mode == "cluster":
        # No health_check_interval: the cluster client checks nodes itself and retries on its level.
        return RedisCluster.from_url(options.url, max_connections=max_connections, **kwargs)
    kwargs["health_check_interval"] = 30
    if options.mode == "sentinel":
        url_arguments: dict[str, Any] = dict(parse_url(options.url))
        for ignored in ("host", "port", "path"):
            url_arguments.pop(ignored, None)  # the sentinels name the master
        if url_arguments.pop("connection_class", None) is SSLConnection:
            url_arguments["ssl"] = True
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(options.sentinels),
            sentinel_kwargs={
                "socket_timeout": options.timeout_seconds,
                "socket_connect_timeout": options.connect_timeout_seconds,
                "retry": _retry(),
            },
        )
        client: Redis = sentinel.master_for(
            options.sentinel_service or "",
            max_connections=max_connections,
            **url_arguments,
            **kwargs,
        )
        return client
    pool = BlockingConnectionPool.from_url(
        options.url, max_connections=max_connections, timeout=options.pool_timeout_seconds, **kwargs
    )
    return Redis.from_pool(pool)


def _tls_arguments(options: RedisOptions) -> dict[str, Any]:
    """redis-py's TLS arguments: the broker's outbound CA does not reach it, so the CA is explicit."""
    tls: dict[str, Any] = {}
    if options.ca_file is not None:
        tls["ssl_ca_certs"] = str(options.ca_file)
    if options.client_cert_file is not None and options.client_key_file is not None:
        tls["ssl_certfile"] = str(options.client_cert_file)
        tls["ssl_keyfile"] = str(options.client_key_file)
    return tls


def _password_provider(options: RedisOptions) -> CredentialProvider | None:
    if options.password_env is None and options.password_file is None:
        return None
    return _PasswordSource(options.username, options.password_env, options.password_file)


class _PasswordSource(CredentialProvider):
    """An ACL user's password from an environment variable or a mounted file, read at every new
    connection: a rotated file (a Secret or the Key Vault CSI driver) is picked up without a restart."""

    def __init__(self, username: str | None, env: str | None, file: Path | None) -> None:
        self._username = username
        self._env = env
        self._file = file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        raise NotImplementedError("the broker builds asyncio clients only")

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        if self._env is not None:
            password = read_env_secret(self._env)
        else:
            try:
                text = await asyncio.to_thread(Path(str(self._file)).read_text, encoding="utf-8")
                password = text.strip()
            except OSError as exc:
                raise AuthenticationError(f"cannot read redis_password.file: {exc.strerror}") from None
        if not password:
            raise AuthenticationError("redis_password is empty")
        return (self._username, password) if self._username else (password,)


class EntraRedisCredentials(CredentialProvider):
    """AUTH for Azure Cache for Redis / Azure Managed Redis with Entra ID: the username is the
    identity's object id (the token's ``oid``, or ``redis_username``), the password an Entra token
    for ``https://redis.azure.com/.default`` from the broker's own azure-identity credential.

    Azure closes a connection whose token expired unless it sent ``AUTH`` with a fresh one, so
    ``keep_renewed`` fetches the next token ahead of expiry and re-authenticates every live pooled
    connection (idle ones at once, busy ones when they are returned to their pool); the purge listener
    moves to a freshly authenticated subscription (RESP2 allows no AUTH on a subscribed connection).
    Not ``redis-entraid``: it takes tokens from the *synchronous* azure-identity credentials (blocking
    HTTP on the event loop), not the broker's own pinned credential and CA, and redis-py re-authenticates
    a pub/sub connection only over RESP3.
    """

    def __init__(self, credential: AsyncTokenCredential, username: str | None = None) -> None:
        self._credential = credential
        self._username = username
        self._token: SimpleToken | None = None
        self._lock = asyncio.Lock()
        self.generation = 0  # bumped at every new token
        # The generation every pooled connection now carries (set once a renewal re-authenticated
        # them): the purge listener resubscribes then, so its new subscription cannot take a pooled
        # connection that still carries the previous token.
        self.pooled_generation = 0
        self.last_error: str | None = None

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        raise NotImplementedError("the broker builds asyncio clients only")

    async def close(self) -> None:
        """Close the azure-identity credential (it holds an HTTP session)."""
        await self._credential.close()

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        token = self._token
        if token is None or token.ttl() <= ENTRA_RETRY_MIN_SECONDS * 1000:
            token = await self._renew(token)
        return token.try_get("oid"), token.get_value()

    @property
    def renew_at(self) -> float:
        """Epoch seconds at which the current token should be replaced (0: there is none)."""
        token = self._token
        if token is None:
            return 0.0
        lifetime = (token.get_expires_at_ms() - token.get_received_at_ms()) / 1000
        return token.get_expires_at_ms() / 1000 - min(ENTRA_RENEW_MARGIN_SECONDS, lifetime / 3)

    async def _renew(self, seen: SimpleToken | None) -> SimpleToken:
        """A token newer than ``seen`` (one fetch for any number of concurrent callers)."""
        async with self._lock:
            if self._token is not None and self._token is not seen:
                return self._token
            try:
                access = await self._credential.get_token(ENTRA_REDIS_SCOPE)
            except AzureError as exc:
                # The class name only: azure-identity's messages can quote responses.
                self.last_error = f"Entra token for Redis: {type(exc).__name__}"
                raise AuthenticationError(self.last_error) from None
            username = self._username or _token_claim(access.token, "oid")
            if not username:
                self.last_error = "the Entra token names no oid: set redis_username to the object id"
                raise AuthenticationError(self.last_error)
            now_ms = time.time() * 1000
            token = SimpleToken(access.token, access.expires_on * 1000, now_ms, {"oid": username})
            if self._token is None or token.get_expires_at_ms() > self._token.get_expires_at_ms():
                self._token = token
                self.generation += 1
            self.last_error = None
            return self._token

    async def keep_renewed(self, client: RedisClient, metrics: Metrics) -> None:
        """Replace the token ahead of its expiry and AUTH every live connection with the new one;
        runs until cancelled (under the app's supervisor). A failed renewal is retried with backoff
        while the current token lasts; after that, new connections fail and /readyz says why."""
        delay = ENTRA_RETRY_MIN_SECONDS
        while True:
            wait = self.renew_at - time.time()
            if self._token is not None and wait > 0:
                await asyncio.sleep(wait)
            current = self._token
            try:
                token = await self._renew(current)
            except AuthenticationError:
                metrics.redis_failures.labels(reason="auth").inc()
                log.warning("cannot renew the Entra token for Redis", extra={"reason": self.last_error})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = ENTRA_RETRY_MIN_SECONDS
            if token is current:
                # The credential handed back the same token (its own cache): ask again a little later.
                await asyncio.sleep(max(ENTRA_RETRY_MIN_SECONDS, (token.ttl() / 1000) / 4))
                continue
            generation = self.generation  # the token's (no await since _renew returned it)
            await _re_authenticate(client, token, metrics)
            self.pooled_generation = generation


async def _re_authenticate(client: RedisClient, token: SimpleToken, metrics: Metrics) -> None:
    """``AUTH`` every pooled connection of ``client`` (every node's in cluster mode) with ``token``.

    A connection pool re-authenticates its idle connections at once and its busy ones when they are
    returned. A cluster node re-authenticates only its idle ones: its busy ones are marked to
    reconnect when their command is done (a new connection authenticates with the new token): once
    ``re_auth_callback`` returns, every connection of the node is idle and re-authenticated, or busy.
    The startup nodes too: redis-py keeps the connection it read the slot map through in a node object
    of their own, idle until the next topology refresh asks them first."""
    if isinstance(client, RedisCluster):
        nodes = {id(node): node for node in client.get_nodes()}
        nodes.update((id(node), node) for node in client.nodes_manager.startup_nodes.values())
        for node in nodes.values():
            await _re_authenticate_pool(node, token, metrics, node.disconnect_free_connections)
            node.update_active_connections_for_reconnect()
    else:
        pool = client.connection_pool
        await _re_authenticate_pool(pool, token, metrics, lambda: pool.disconnect(inuse_connections=False))
    log.info("redis connections re-authenticated with a renewed Entra token")


async def _re_authenticate_pool(
    pool: Any, token: SimpleToken, metrics: Metrics, drop_idle: Callable[[], Awaitable[None]]
) -> None:
    """``pool.re_auth_callback(token)``; if that fails, the pool's idle connections go (new ones
    authenticate with the new token)."""
    try:
        await pool.re_auth_callback(token)
    except REDIS_FAILURES as exc:
        metrics.redis_failures.labels(reason=_failure_reason(exc)).inc()
        log.warning("redis re-authentication failed", extra={"reason": type(exc).__name__})
        with contextlib.suppress(*REDIS_FAILURES):
            await drop_idle()


def _token_claim(token: str, claim: str) -> str | None:
    """A claim of our own identity's token, read without verification (it came from Entra over TLS)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    value = claims.get(claim) if isinstance(claims, dict) else None
    return value if isinstance(value, str) else None


class TokenCache:
    """L1 (bounded LRU of decrypted tokens) in front of an optional shared Redis.

    Also remembers, per key, permanent failures and Entra's throttling: in Redis for every replica,
    and in process (bounded) for when Redis is not there.
    """

    def __init__(
        self,
        metrics: Metrics,
        options: CacheOptions,
        *,
        redis: RedisClient | None,
        sealer: Sealer | None,
        credentials: EntraRedisCredentials | None = None,
    ) -> None:
        if sealer is not None and redis is None:
            raise ValueError("a sealer needs Redis")
        self._metrics = metrics
        self._options = options
        self._redis = redis
        self._sealer = sealer
        self._credentials = credentials
        # The cache's concurrent Redis calls wait here for their turn: a burst queues instead of
        # opening a connection each (a cluster node's pool and a sentinel pool refuse, not queue).
        self._calls = asyncio.Semaphore(options.redis_max_concurrent_calls)
        self._failures_in_a_row = 0
        self._l1: OrderedDict[TokenKey, AccessToken] = OrderedDict()
        # key -> (monotonic end, body): only the body-sized fields, never an exception object.
        self._failures: OrderedDict[TokenKey, tuple[float, dict[str, Any]]] = OrderedDict()
        self._throttles: OrderedDict[tuple[str, str], float] = OrderedDict()  # (app, tenant) -> end
        self._claimed: OrderedDict[str, float] = OrderedDict()  # single-use markers -> monotonic end
        self._redis_down_until = 0.0
        self._failing_since: float | None = None  # first timeout since the last success
        self.redis_last_error: str | None = None  # "operation: REASON" of the last failure, for /readyz

    @property
    def shared(self) -> bool:
        """Redis is configured (it is used once the cache key is loaded)."""
        return self._redis is not None

    @property
    def key_loaded(self) -> bool:
        return self._sealer is not None

    def attach_sealer(self, sealer: Sealer) -> None:
        """Start using Redis: the cache key loaded after start-up (until then, L1 only)."""
        if self._redis is None:
            raise ValueError("a sealer needs Redis")
        self._sealer = sealer

    @property
    def shared_available(self) -> bool:
        """Redis is configured and not in its post-error back-off."""
        return self._redis_usable() is not None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        if self._credentials is not None:
            await self._credentials.close()

    # --- L1 ---------------------------------------------------------------------------------

    def get_local(self, key: TokenKey) -> AccessToken | None:
        token = self._l1.get(key)
        if token is not None and token.remaining_seconds() <= 0:
            del self._l1[key]
            self._metrics.cached_tokens.set(len(self._l1))
            return None
        return token

    def put_local(self, key: TokenKey, token: AccessToken) -> None:
        current = self._l1.get(key)
        if current is not None and current.expires_on >= token.expires_on:
            return  # never replace a token with one that dies sooner
        self._l1[key] = token
        self._l1.move_to_end(key)
        while len(self._l1) > self._options.l1_max_tokens:
            self._l1.popitem(last=False)
        self._metrics.cached_tokens.set(len(self._l1))

    # --- the operations the service uses ----------------------------------------------------

    async def lookup(self, key: TokenKey) -> Lookup:
        """The shared token, remembered failure and throttle of ``key`` in one round-trip.

        Without Redis (or while backing off) only this process's memory answers. With Redis, Redis
        alone says whether a failure is remembered: it is what every replica shares and what a purge
        clears, so a purge after consent is granted takes effect everywhere at once.
        """
        local_throttle = self._throttled_locally(key)
        if self._sealer is None or self._redis_usable() is None:
            return Lookup(failure=self._remembered_locally(key), throttled_seconds=local_throttle)
        names = (_Names.token(key), _Names.failure(key), _Names.throttle(key))

        async def pipeline(redis: RedisClient) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.get(names[0])
                pipe.get(names[1])
                pipe.pttl(names[2])
                return list(await pipe.execute(raise_on_error=False))

        results = await self._guarded("lookup", pipeline)
        if isinstance(results, _Down):
            self._metrics.cache_lookups.inc("redis", "error")
            return Lookup(failure=self._remembered_locally(key), throttled_seconds=local_throttle)
        for result in results:
            if isinstance(result, Exception):  # a wrong-type key, say: that key's miss, not an outage
                self._record_failure("lookup", result)
        blob, failure_blob, throttle_ms = results
        token = self._open_token(names[0], blob)
        failure = self._open_failure(names[1], failure_blob)
        shared_throttle = 0.0
        if isinstance(throttle_ms, int) and throttle_ms > 0:
            shared_throttle = min(throttle_ms / 1000, MAX_THROTTLE_SECONDS)
        return Lookup(token, failure, max(local_throttle, shared_throttle))

    @staticmethod
    def new_holder() -> str:
        """A lease holder's identity: one per acquisition, kept across its attempts to take the lease."""
        return secrets.token_hex(16)

    @contextlib.asynccontextmanager
    async def lease(self, key: TokenKey, lease_seconds: float, holder: str) -> AsyncIterator[Lease]:
        """Hold ``key``'s acquisition lease for the block (released on exit, whatever happens).

        A timed-out attempt while Redis otherwise answers is ``HELD``: the lease may have been set
        (by us: the next attempt with the same ``holder`` gets it) or be another replica's, and
        acquiring directly would make a second Entra request. Only Redis being down is ``UNAVAILABLE``.
        """
        name, fence = _Names.lease(key), holder
        taken = await self._guarded(
            "lease", lambda redis: redis.eval(_TAKE, 1, name, fence, int(lease_seconds * 1000))
        )
        if taken is DOWN:
            yield Lease.UNAVAILABLE
            return
        if taken is SLOW or not taken:
            yield Lease.HELD
            return
        try:
            yield Lease.ACQUIRED
        finally:
            # Always attempted, even while backing off: a holder that got its token must not leave
            # other replicas' callers waiting for the whole lease.
            await self._guarded(
                "release", lambda redis: redis.eval(_RELEASE, 1, name, fence), even_backing_off=True
            )

    async def store(self, key: TokenKey, token: AccessToken) -> None:
        """Keep a fresh token in L1 and in Redis (TTL = its real remaining lifetime)."""
        self.put_local(key, token)
        ttl_ms = int(token.remaining_seconds() * 1000)
        if self._sealer is None or ttl_ms <= 0:
            return
        name = _Names.token(key)
        sealed = self._sealer.seal(json.dumps(token.to_record()).encode(), name.encode())
        await self._guarded("set", lambda redis: redis.set(name, sealed, px=ttl_ms), even_backing_off=True)

    async def remember(self, key: TokenKey, error: BrokerError, ttl_seconds: float) -> None:
        """Remember a permanent failure of ``key`` for ``ttl_seconds``, here and for every replica."""
        if ttl_seconds <= 0:
            return
        body = remembered_body(error)
        self._failures[key] = (time.monotonic() + ttl_seconds, body)
        self._failures.move_to_end(key)
        while len(self._failures) > self._options.local_max_entries:
            self._failures.popitem(last=False)
        if self._sealer is None:
            return
        name, ttl_ms = _Names.failure(key), int(ttl_seconds * 1000)
        sealed = self._sealer.seal(json.dumps(body).encode(), name.encode())
        await self._guarded("remember", lambda redis: redis.set(name, sealed, px=ttl_ms))

    async def throttle(self, key: TokenKey, seconds: float) -> None:
        """Tell every replica that Entra asked this (app, tenant) to hold off for ``seconds``."""
        if seconds <= 0:
            return
        app_tenant = (key.app, key.tenant)
        self._throttles[app_tenant] = time.monotonic() + seconds
        self._throttles.move_to_end(app_tenant)
        while len(self._throttles) > self._options.local_max_entries:
            self._throttles.popitem(last=False)
        if self._sealer is not None:
            name, ttl_ms = _Names.throttle(key), int(seconds * 1000)
            await self._guarded("throttle", lambda redis: redis.set(name, b"1", px=ttl_ms))

    def purge_local(self, tenant: str) -> int:
        """Forget this process's tokens, failures and throttles for ``tenant``; tokens dropped."""
        tenant = tenant.lower()
        keys = [k for k in self._l1 if k.tenant == tenant]
        for key in keys:
            del self._l1[key]
        for failed in [k for k in self._failures if k.tenant == tenant]:
            del self._failures[failed]
        for app_tenant in [t for t in self._throttles if t[1] == tenant]:
            del self._throttles[app_tenant]
        self._metrics.cached_tokens.set(len(self._l1))
        return len(keys)

    async def ping(self) -> bool:
        """Whether Redis takes a write (``True`` without Redis); ends any back-off, for /readyz.

        A real write, not PING: a demoted master (``READONLY``), a plain client on a Cluster
        (``MOVED``), a rejected token or password and a missing ACL permission all answer PING. The
        probe writes one short-lived key in each of several hash slots spread over the slot space, so
        a Cluster read as one server answers MOVED for some of them. ``redis_last_error`` says why.
        """
        if self._redis is None:
            self._metrics.redis_probe_ok.set(1)  # nothing to fail
            return True
        self._redis_down_until = 0.0

        async def probe(redis: RedisClient) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for name in _Names.probes():
                    pipe.set(name, b"1", px=PROBE_TTL_MS)
                return list(await pipe.execute(raise_on_error=False))

        results = await self._guarded("probe", probe, even_backing_off=True)
        if isinstance(results, _Down):
            ok = False
        else:
            failed = [result for result in results if isinstance(result, Exception)]
            for result in failed[:1]:
                self._record_failure("probe", result)
            ok = not failed
        self._metrics.redis_probe_ok.set(1 if ok else 0)
        return ok

    async def listen_for_purges(self) -> None:
        """Apply every purge broadcast (any replica, the CLI) to this process; runs until cancelled.

        Losing Redis ends the call with a warning (the supervisor restarts it with backoff); any
        other failure propagates to the supervisor, which logs and counts it.
        """
        if self._redis is None:
            return
        try:
            if isinstance(self._redis, RedisCluster):
                await self._redis.initialize()  # its pub/sub needs the slot map first
            pubsub = await self._subscribe()
            try:
                generation = self._credentials.pooled_generation if self._credentials else 0
                # With Entra tokens, look for a renewed one every second (a token's renewal margin is
                # minutes); otherwise the wait only bounds how long a cancellation takes.
                poll_seconds = 1.0 if self._credentials else 5.0
                while True:
                    if self._credentials is not None and self._credentials.pooled_generation != generation:
                        # A renewed Entra token, now on every pooled connection: move to one before
                        # the old token expires. Subscribe first, then leave: no gap (a purge seen
                        # twice is applied twice, harmlessly).
                        generation = self._credentials.pooled_generation
                        fresh = await self._subscribe()
                        pubsub, old = fresh, pubsub
                        with contextlib.suppress(*REDIS_FAILURES):
                            await old.aclose()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_seconds)
                    if message is None or message.get("type") != "message":
                        continue
                    tenant = bytes(message["data"])[:256].decode(errors="replace")
                    dropped = self.purge_local(tenant)
                    log.info("purge broadcast received", extra={"tenant": tenant, "dropped": dropped})
            finally:
                with contextlib.suppress(*REDIS_FAILURES):
                    await pubsub.aclose()
        except _LISTENER_FAILURES as exc:
            if isinstance(exc, RuntimeError | AttributeError) and not _raised_by_client(exc):
                raise  # ours: the supervisor logs it with its traceback
            self._record_failure("subscribe", exc, count=False)
            log.warning("purge listener lost Redis; restarting", extra={"reason": type(exc).__name__})

    async def _subscribe(self) -> Any:
        assert self._redis is not None  # noqa: S101 - checked by the caller
        pubsub: Any = self._redis.pubsub()  # PubSub | ClusterPubSub: the same surface here
        try:
            await pubsub.subscribe(PURGE_CHANNEL)
        except BaseException:
            with contextlib.suppress(*REDIS_FAILURES):
                await pubsub.aclose()
            raise
        return pubsub

    async def keep_credentials_renewed(self) -> None:
        """Renew the Entra token for Redis and re-authenticate live connections (supervised)."""
        if self._credentials is not None and self._redis is not None:
            await self._credentials.keep_renewed(self._redis, self._metrics)

    # --- internals --------------------------------------------------------------------------

    def _redis_usable(self) -> RedisClient | None:
        if self._sealer is None or time.monotonic() < self._redis_down_until:
            return None  # no Redis, no cache key yet (nothing may be stored unsealed), or backing off
        return self._redis

    async def _guarded(
        self, operation: str, call: Callable[[RedisClient], Awaitable[T]], *, even_backing_off: bool = False
    ) -> T | _Down:
        """Run one Redis call under the fail-open rule.

        The client already retried connection errors (a dropped connection costs a reconnect). What
        still fails is ``DOWN`` for this call only: a command error (a wrong-type key, ``MOVED``,
        ``READONLY``, ``NOPERM``) concerns that key, and one failed connection does not pause
        unrelated keys. Redis is skipped for ``REDIS_BACKOFF_SECONDS`` only once it looks down:
        ``REDIS_DOWN_AFTER_FAILURES`` calls in a row failed to connect, or calls kept timing out for
        that long with no success in between. A timeout before that is ``SLOW`` (that call only: on a
        loaded host the event loop, not Redis, is late, and a burst waits for pooled connections).
        Every failure is logged and counted by reason."""
        redis = self._redis if even_backing_off else self._redis_usable()
        if redis is None:
            return DOWN
        try:
            async with asyncio.timeout(self._options.redis_wait_seconds):
                await self._calls.acquire()
        except TimeoutError:
            self._record_failure(operation, MaxConnectionsError("no connection available"))
            return SLOW
        try:
            result = await _call(call, redis)
        except ResponseError as exc:
            self._record_failure(operation, exc)
            log.warning(
                "redis refused a command", extra={"operation": operation, "reason": _failure_reason(exc)}
            )
            return DOWN
        except REDIS_FAILURES as exc:
            self._record_failure(operation, exc)
            now = time.monotonic()
            if _is_slow(exc):
                if self._failing_since is None:
                    self._failing_since = now
                if now - self._failing_since < REDIS_BACKOFF_SECONDS:
                    log.warning("redis call timed out", extra={"operation": operation})
                    return SLOW
            else:
                self._failures_in_a_row += 1
                if self._failures_in_a_row < REDIS_DOWN_AFTER_FAILURES:
                    log.warning(
                        "redis call failed", extra={"operation": operation, "reason": _failure_reason(exc)}
                    )
                    return DOWN
            self._redis_down_until = now + REDIS_BACKOFF_SECONDS
            log.warning(
                "redis unavailable, failing open",
                extra={"operation": operation, "reason": _failure_reason(exc)},
            )
            return DOWN
        finally:
            self._calls.release()
        self.redis_last_error = None
        self._failing_since = None
        self._failures_in_a_row = 0
        return result

    def _record_failure(self, operation: str, exc: BaseException, *, count: bool = True) -> None:
        """Count a failure by reason and keep it for /readyz (class and reason only: redis-py's
        messages can quote the URL, and so its password)."""
        reason = _failure_reason(exc)
        if count:
            self._metrics.redis_errors.inc()
        self._metrics.redis_failures.labels(reason=reason).inc()
        detail = self._credentials.last_error if reason == "auth" and self._credentials else None
        self.redis_last_error = f"{operation}: {reason} ({detail or type(exc).__name__})"

    def _open(self, name: str, blob: Any) -> dict[str, Any] | None:
        """A sealed JSON object read from ``name``; ``None`` (counted, logged) when it is not one."""
        if self._sealer is None or not isinstance(blob, bytes) or len(blob) > MAX_VALUE_BYTES:
            return None
        try:
            record = json.loads(self._sealer.open(blob, name.encode()))
        except (SealError, ValueError):
            record = None
        if not isinstance(record, dict):
            # Wrong key (a misconfigured replica) or a tampered value: ignore it, loudly.
            log.warning("redis entry does not open; ignoring it", extra={"cache_key": name})
            return None
        return record

    def _open_token(self, name: str, blob: Any) -> AccessToken | None:
        if blob is None:
            self._metrics.cache_lookups.inc("redis", "miss")
            return None
        record = self._open(name, blob)
        try:
            token = AccessToken.from_record(record) if record is not None else None
        except (ValueError, KeyError, TypeError):
            token = None
        self._metrics.cache_lookups.inc("redis", "hit" if token else "error")
        return token

    def _open_failure(self, name: str, blob: Any) -> BrokerError | None:
        if blob is None:
            return None
        record = self._open(name, blob)
        return error_from_body(record) if record is not None else None

    def _remembered_locally(self, key: TokenKey) -> BrokerError | None:
        entry = self._failures.get(key)
        if entry is None:
            return None
        until, body = entry
        if time.monotonic() >= until:
            del self._failures[key]
            return None
        return error_from_body(body)

    def _throttled_locally(self, key: TokenKey) -> float:
        app_tenant = (key.app, key.tenant)
        until = self._throttles.get(app_tenant)
        if until is None:
            return 0.0
        remaining = until - time.monotonic()
        if remaining <= 0:
            del self._throttles[app_tenant]
            return 0.0
        return remaining

    # --- onboarding: single-use markers ----------------------------------

    async def claim_once(self, scope: str, name: str, ttl_seconds: float) -> bool:
        """True the first time ``(scope, name)`` is claimed within ``ttl_seconds``, on any replica.

        Redis ``SET NX`` makes the claim cluster-wide. Decided failure mode: without Redis (or while
        it fails) the claim is this process's, in a bounded memory, so onboarding keeps working; a
        replay on another replica then costs one more proof-of-consent token request, never a grant
        (the callback trusts only Entra's answer). Claims Redis confirmed are remembered here too.
        """
        now = time.monotonic()
        while self._claimed and next(iter(self._claimed.values())) <= now:
            self._claimed.popitem(last=False)
        marker = _Names.once(scope, name)
        if self._claimed.get(marker, now) > now:
            return False
        ttl_ms = max(1, int(ttl_seconds * 1000))
        claimed = await self._guarded("claim", lambda redis: redis.set(marker, b"1", nx=True, px=ttl_ms))
        if claimed is not DOWN and claimed is not SLOW and not claimed:
            return False  # another replica (or an earlier request here) claimed it
        self._claimed[marker] = now + ttl_seconds
        while len(self._claimed) > self._options.local_max_entries:
            self._claimed.popitem(last=False)
        return True

    # --- tenants (tenants.py): domain mappings, the registry, the sweep's lease, offboarding ---------

    async def read_domain(self, domain: str) -> DomainRecord | None:
        """What any replica learnt about ``domain`` (its tenant, or that Entra does not know it);
        ``None`` when nothing is remembered or Redis cannot say."""
        if self._redis_usable() is None:
            return None
        name = _Names.domain(domain)
        blob = await self._guarded("read_domain", lambda redis: redis.get(name))
        if isinstance(blob, _Down) or blob is None:
            return None
        record = self._open(name, blob)
        if record is None:
            return None
        tenant = record.get("tenant")
        if tenant is None:
            return DomainRecord(None)
        return DomainRecord(tenant) if isinstance(tenant, str) and GUID_RE.fullmatch(tenant) else None

    async def write_domain(self, domain: str, tenant: str | None, ttl_seconds: float) -> None:
        """Remember for every replica, for ``ttl_seconds``, that ``domain`` names ``tenant`` (``None``:
        Entra does not know it), and which domains name a tenant (for offboarding)."""
        if self._sealer is None or ttl_seconds <= 0:
            return
        name, ttl_ms = _Names.domain(domain), int(ttl_seconds * 1000)
        sealed = self._sealer.seal(json.dumps({"tenant": tenant}).encode(), name.encode())

        async def write(redis: RedisClient) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(name, sealed, px=ttl_ms)
                if tenant is not None:
                    pipe.sadd(_Names.domains_of(tenant), domain)
                    pipe.pexpire(_Names.domains_of(tenant), ttl_ms)
                return list(await pipe.execute())

        await self._guarded("write_domain", write)

    async def update_registry(
        self,
        tenant: str,
        fields: Sequence[str],
        change: Callable[[dict[str, dict[str, Any] | None]], dict[str, dict[str, Any]]],
    ) -> dict[str, dict[str, Any] | None] | None:
        """Read ``fields`` of ``tenant``'s registry entry, write what ``change`` makes of them, and
        index the tenant; return what was read (``None``: Redis could not be used, nothing written).

        Optimistic concurrency: the hash is WATCHed from the read to the write, and a write another
        replica made in between makes this one start again from a fresh read, so concurrent outcomes
        merge instead of overwriting each other. ``change`` must be a quick pure function.
        """
        if self._sealer is None or self._redis_usable() is None:
            return None
        sealer, name = self._sealer, _Names.registry(tenant)
        wanted = list(fields)

        async def transact(redis: RedisClient) -> dict[str, dict[str, Any] | None] | None:
            async with redis.pipeline(transaction=True) as pipe:
                for _ in range(REGISTRY_WRITE_ATTEMPTS):
                    try:
                        await pipe.watch(name)
                        blobs = await pipe.hmget(name, wanted)
                        before = {
                            field: self._open(f"{name}#{field}", blob) if blob is not None else None
                            for field, blob in zip(wanted, blobs, strict=True)
                        }
                        after = change(before)
                        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                        if after:
                            pipe.hset(
                                name,
                                mapping={
                                    field: sealer.seal(json.dumps(value).encode(), f"{name}#{field}".encode())
                                    for field, value in after.items()
                                },
                            )
                        await pipe.execute()
                    except WatchError:
                        continue
                    return before
            log.warning("registry entry kept changing under this write; dropped", extra={"tenant": tenant})
            return None

        before = await self._guarded("registry_write", transact)
        if isinstance(before, _Down) or before is None:
            return None
        # Outside the transaction: the index is another key (another Cluster slot); adding is idempotent.
        await self._guarded("registry_index", lambda redis: redis.zadd(_Names.registry_index(), {tenant: 0}))
        return before

    async def registry_entries(self, tenants: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]] | None:
        """The registry entries of ``tenants`` (field -> value), one round-trip; a tenant without an
        entry is absent, a field that does not open is skipped; ``None`` when Redis cannot be used."""
        if self._sealer is None or self._redis_usable() is None:
            return None
        names = [_Names.registry(tenant) for tenant in tenants]

        async def read(redis: RedisClient) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(name)
                return list(await pipe.execute(raise_on_error=False))

        results = await self._guarded("registry_read", read)
        if isinstance(results, _Down):
            return None
        entries: dict[str, dict[str, dict[str, Any]]] = {}
        for tenant, name, fields in zip(tenants, names, results, strict=True):
            if not isinstance(fields, dict):
                if isinstance(fields, Exception):
                    self._metrics.redis_errors.inc()  # a wrong-type key: that tenant's miss
                continue
            opened: dict[str, dict[str, Any]] = {}
            for raw_field, blob in list(fields.items())[:MAX_REGISTRY_FIELDS]:
                field = _text(raw_field)
                record = self._open(f"{name}#{field}", blob)
                if record is not None:
                    opened[field] = record
            if opened:
                entries[tenant] = opened
        return entries

    async def registry_tenants(self, after: str, count: int) -> list[str] | None:
        """Up to ``count`` members of the registry index after ``after`` in lexical order (from the
        start when empty), as stored (the caller validates them); ``None`` when Redis cannot be used."""
        if self._sealer is None or self._redis_usable() is None:
            return None
        low = f"({after}" if after else "-"
        members = await self._guarded(
            "registry_index",
            lambda redis: redis.zrangebylex(_Names.registry_index(), low, "+", start=0, num=count),
        )
        if isinstance(members, _Down):
            return None
        return [_text(member)[:128] for member in members]

    async def take_sweep_lease(self, holder: str, lease_seconds: float) -> bool:
        """Take, or keep (re-entrant for ``holder``), the lease of the one replica that sweeps."""
        name = _Names.sweep_lease()
        taken = await self._guarded(
            "sweep_lease", lambda redis: redis.eval(_TAKE, 1, name, holder, int(lease_seconds * 1000))
        )
        return not isinstance(taken, _Down) and bool(taken)

    async def release_sweep_lease(self, holder: str) -> None:
        name = _Names.sweep_lease()
        await self._guarded(
            "sweep_release", lambda redis: redis.eval(_RELEASE, 1, name, holder), even_backing_off=True
        )

    async def throttled_seconds(self, key: TokenKey) -> float:
        """How long Entra asked ``key``'s (app, tenant) to hold off (a re-check honours it too), without
        reading the token: a check is not a cache lookup and must not count as one."""
        local = self._throttled_locally(key)
        if self._redis_usable() is None:
            return local
        name = _Names.throttle(key)
        remaining_ms = await self._guarded("throttled", lambda redis: redis.pttl(name))
        if isinstance(remaining_ms, int) and remaining_ms > 0:
            return max(local, min(remaining_ms / 1000, MAX_THROTTLE_SECONDS))
        return local

    async def forget_failure(self, key: TokenKey) -> None:
        """Forget ``key``'s remembered permanent failure here and for every replica (a re-check)."""
        self._failures.pop(key, None)
        if self._sealer is not None:
            name = _Names.failure(key)
            await self._guarded("forget", lambda redis: redis.delete(name))

    async def offboard(self, tenant: str, domains: Sequence[str]) -> tuple[dict[str, Any], int]:
        """Delete every Redis entry of ``tenant`` (tokens, leases, remembered failures, throttles,
        registry entry) and of the domains that name it (their mappings, and entries keyed by a
        domain before tenants were canonical), then tell every replica (``listen_for_offboarding``).

        Returns what was removed, by kind (``domains``: the domains whose mapping went), and how many
        replicas heard the broadcast. Without Redis there is nothing shared: ``({}, 0)``. Unlike the
        request path this does not fail open: ``SharedCacheError`` when Redis cannot be used.
        """
        if self._redis is None:
            return {}, 0
        if self._sealer is None:
            raise SharedCacheError("cache key not loaded")
        redis = self._redis
        try:
            names: list[str] = []
            for spelling in (tenant, *domains):
                for pattern in _Names.tenant_patterns(spelling):
                    found = redis.scan_iter(match=pattern, count=1000)
                    names.extend([_text(name) async for name in found])
            mapped = await redis.smembers(_Names.domains_of(tenant))
            candidates = set(domains) | {_text(member)[:253] for member in mapped}
            removed_domains = []
            for domain in sorted(d for d in candidates if DOMAIN_RE.fullmatch(d)):
                blob = await redis.get(_Names.domain(domain))
                record = self._open(_Names.domain(domain), blob) if blob is not None else None
                # Only a mapping to this tenant: a domain that moved to another tenant keeps its own.
                if record is not None and record.get("tenant") == tenant:
                    names.append(_Names.domain(domain))
                    removed_domains.append(domain)
            names.append(_Names.registry(tenant))
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.delete(name)
                pipe.delete(_Names.domains_of(tenant))
                pipe.zrem(_Names.registry_index(), tenant)
                deleted = list(await pipe.execute())
            message = json.dumps({"tenant": tenant, "domains": sorted(candidates)[:64]})
            notified = int(await redis.publish(OFFBOARD_CHANNEL, message))
        except REDIS_FAILURES as exc:
            # The class name only: redis-py's messages can quote the URL (and its password).
            raise SharedCacheError(type(exc).__name__) from None
        removed: dict[str, Any] = dict.fromkeys(_REMOVED_AS.values(), 0)
        for name, count in zip(names, deleted, strict=False):
            label = _REMOVED_AS.get(name.split(":", 3)[2])
            if label is not None:
                removed[label] += int(count)
        removed["domains"] = removed_domains
        return removed, notified

    async def listen_for_offboarding(self, forget: Callable[[str, list[str]], object]) -> None:
        """Apply every offboarding broadcast to this process (``forget(tenant, domains)``); runs until
        cancelled, under the same rules as ``listen_for_purges``."""
        if self._redis is None:
            return
        try:
            async with self._redis.pubsub() as pubsub:
                await pubsub.subscribe(OFFBOARD_CHANNEL)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None or message.get("type") != "message":
                        continue
                    found = _offboard_message(bytes(message["data"]))
                    if found is None:
                        log.warning("malformed offboarding broadcast ignored")
                        continue
                    forget(*found)
                    log.info("offboarding broadcast received", extra={"tenant": found[0]})
        except REDIS_FAILURES as exc:
            log.warning("offboarding listener lost Redis; restarting", extra={"reason": type(exc).__name__})


_CLIENT_DIR = str(Path(redis_package.__file__).parent)


async def _call(call: Callable[[RedisClient], Awaitable[T]], redis: RedisClient) -> T:
    """``call(redis)``, once more when the client failed inside its own code.

    redis-py's Cluster client, meeting a connection that the server dropped while another task was
    using the node, raises ``RuntimeError`` (uvloop: a write on a closed transport) or
    ``AttributeError`` (a writer already torn down) instead of ``ConnectionError``: its retry never
    sees them. The cache's calls are idempotent (reads, SET, the re-entrant lease, compare-and-delete,
    PUBLISH), so one more try on a fresh connection is safe; a second such failure is a connection
    error (fail open), never an unhandled 500.
    """
    for attempt in range(2):
        try:
            return await call(redis)
        except (RuntimeError, AttributeError) as exc:
            if not _raised_by_client(exc):
                raise
            if attempt:
                raise RedisConnectionError(f"redis client failure ({type(exc).__name__})") from None
            log.debug("redis client failure; retrying", extra={"reason": type(exc).__name__})
    raise AssertionError("unreachable")  # pragma: no cover


def _raised_by_client(exc: BaseException) -> bool:
    """Whether ``exc`` came out of redis-py's own code (raised there, or below it in asyncio's streams
    and the event loop it calls), not out of ours."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.startswith(_CLIENT_DIR):
            return True
        frame = frame.tb_next
    return False


def _is_slow(exc: BaseException) -> bool:
    """A timeout, or no pooled connection free in time: lateness, not (yet) an outage."""
    return isinstance(exc, RedisTimeoutError | MaxConnectionsError) or (
        isinstance(exc, RedisConnectionError) and "No connection available" in str(exc)
    )


def _failure_reason(exc: BaseException) -> str:
    """A bounded label for a Redis failure: what an operator must fix differs for each."""
    if isinstance(exc, AskError):
        return "moved"  # a Cluster read as one server (redis_mode: cluster)
    if isinstance(exc, ReadOnlyError):
        return "readonly"  # a replica or a demoted master (redis_mode: sentinel)
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return "auth"
    if isinstance(exc, NoPermissionError):
        return "noperm"  # the ACL lacks a command or key pattern (README: the minimal ACL)
    if isinstance(exc, ResponseError):
        return "command"
    if _is_slow(exc):
        return "timeout" if isinstance(exc, RedisTimeoutError) else "pool"
    return "connection"


async def purge_tenant(
    options: RedisOptions, tenant: str, *, credentials: EntraRedisCredentials | None = None
) -> tuple[int, int]:
    """Delete every entry of ``tenant`` from Redis (tokens, leases, failures, throttles), then tell
    every replica to drop its in-process copies. Returns (entries removed, replicas notified).

    In cluster mode the scan covers every primary, and the listeners counted are those subscribed on
    every node (``PUBSUB NUMSUB`` per node, summed: ``PUBLISH`` answers for one node only, although
    the message reaches all of them)."""
    tenant = tenant.lower()
    redis = connect_redis(options, credentials=credentials)
    try:
        names: list[Any] = []
        for pattern in _Names.tenant_patterns(tenant):
            names.extend([name async for name in redis.scan_iter(match=pattern, count=1000)])
        removed = int(await redis.delete(*names)) if names else 0
        published = int(await redis.publish(PURGE_CHANNEL, tenant))
        notified = await _subscribers(redis) if isinstance(redis, RedisCluster) else published
    except REDIS_FAILURES as exc:
        # The reason and class name only: redis-py's messages can quote the URL (and its password).
        raise SharedCacheError(f"{_failure_reason(exc)} ({type(exc).__name__})") from None
    finally:
        await redis.aclose()
    return removed, notified


def _text(value: bytes | str) -> str:
    """A name read back from Redis (bytes, as the client does not decode) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _offboard_message(data: bytes) -> tuple[str, list[str]] | None:
    """(tenant, domains) of an offboarding broadcast, or ``None`` when it is not one (pub/sub is not
    sealed: anything that can publish can send anything, so only well-formed names are acted on)."""
    if len(data) > MAX_BROADCAST_BYTES:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    tenant = body.get("tenant") if isinstance(body, Mapping) else None
    domains = body.get("domains") if isinstance(body, Mapping) else None
    if not isinstance(tenant, str) or not GUID_RE.fullmatch(tenant) or not isinstance(domains, list):
        return None
    return tenant, [d for d in domains[:64] if isinstance(d, str) and DOMAIN_RE.fullmatch(d)]


async def _subscribers(cluster: RedisCluster) -> int:
    """Purge listeners subscribed anywhere in the cluster."""
    total = 0
    for node in cluster.get_nodes():
        counts = await cluster.execute_command("PUBSUB NUMSUB", PURGE_CHANNEL, target_nodes=node)
        total += int(dict(_pairs(counts)).get(PURGE_CHANNEL.encode(), 0))
    return total


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """``PUBSUB NUMSUB``'s reply (a flat list, or pairs as redis-py parses it) as (channel, count)."""
    items = list(reply)
    if items and isinstance(items[0], tuple | list):
        return [(channel, count) for channel, count in items]
    return list(zip(items[::2], items[1::2], strict=True))
