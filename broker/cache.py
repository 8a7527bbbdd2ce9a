"""The token cache: L1 in process, then Redis shared by every replica; plus the cross-replica lease.

Redis holds only AES-GCM ciphertext bound to its key name (``crypto.py``); its TTL follows the token's
real expiry. Decided failure mode: Redis fails *open*. A Redis error is logged, counted
(``broker_redis_errors_total``) and the request carries on from L1 or by acquiring directly; after an
error Redis is skipped for a short back-off so requests do not each pay the timeout while it is down.

The lease (``SET NX PX`` with a random fencing value, deleted only by its holder through a
compare-and-delete script) makes one replica acquire a key while the others poll for its result; a
crashed holder blocks the key no longer than the lease.
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import RedisError

from broker.crypto import SealError
from broker.tokens import AccessToken, TokenKey

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from broker.crypto import Sealer
    from broker.metrics import Metrics

log = logging.getLogger(__name__)

_PREFIX = "tb:v1"
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
REDIS_BACKOFF_SECONDS = 1.0
PURGE_CHANNEL = f"{_PREFIX}:purge"


T = TypeVar("T")


class _Down(enum.Enum):
    """What a guarded Redis call returns when Redis is not configured, backing off, or failed."""

    DOWN = enum.auto()


DOWN = _Down.DOWN


def _name(kind: str, key: TokenKey) -> str:
    """``tb:v1:{tok|lock|neg}:{app}:{tenant}:{resource}``: readable, so `cache purge` can SCAN it."""
    return f"{_PREFIX}:{kind}:{key.app}:{key.tenant}:{key.resource}"


class TokenCache:
    """L1 (bounded LRU of decrypted tokens) in front of an optional shared Redis."""

    def __init__(
        self, metrics: Metrics, *, redis: Redis | None, sealer: Sealer | None, l1_max_tokens: int
    ) -> None:
        if (redis is None) != (sealer is None):
            raise ValueError("Redis needs a sealer and a sealer needs Redis")
        self._metrics = metrics
        self._redis = redis
        self._sealer = sealer
        self._l1: OrderedDict[TokenKey, AccessToken] = OrderedDict()
        self._l1_max = l1_max_tokens
        self._redis_down_until = 0.0
        self.redis_last_error: str | None = None

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def shared_available(self) -> bool:
        """Redis is configured and not in its post-error back-off."""
        return self._redis_usable() is not None

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
        while len(self._l1) > self._l1_max:
            self._l1.popitem(last=False)
        self._metrics.cached_tokens.set(len(self._l1))

    # --- Redis ------------------------------------------------------------------------------

    def _redis_usable(self) -> Redis | None:
        if self._redis is None or time.monotonic() < self._redis_down_until:
            return None
        return self._redis

    async def _guarded(self, operation: str, call: Callable[[Redis], Awaitable[T]]) -> T | _Down:
        """Run one Redis call under the fail-open rule: ``DOWN`` when Redis is unusable or the call
        fails (then logged, counted, and Redis skipped for ``REDIS_BACKOFF_SECONDS``)."""
        redis = self._redis_usable()
        if redis is None:
            return DOWN
        try:
            result = await call(redis)
        except (RedisError, OSError) as exc:
            self._metrics.redis_errors.inc()
            self._redis_down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            self.redis_last_error = f"{operation}: {type(exc).__name__}"
            log.warning(
                "redis unavailable, failing open",
                extra={"operation": operation, "reason": type(exc).__name__},
            )
            return DOWN
        self.redis_last_error = None
        return result

    async def get_shared(self, key: TokenKey) -> AccessToken | None:
        """The token Redis holds for ``key``, opened and checked; ``None`` on miss or error."""
        if self._sealer is None or self._redis_usable() is None:
            return None  # no Redis, or backing off after an error: not a lookup
        sealer, name = self._sealer, _name("tok", key)
        blob = await self._guarded("get", lambda redis: redis.get(name))
        if blob is DOWN:
            self._metrics.cache_lookups.labels(layer="redis", result="error").inc()
            return None
        if blob is None:
            self._metrics.cache_lookups.labels(layer="redis", result="miss").inc()
            return None
        try:
            raw = blob if isinstance(blob, bytes) else str(blob).encode()
            token = AccessToken.from_record(json.loads(sealer.open(raw, name.encode())))
        except (SealError, ValueError, KeyError, TypeError):
            # Wrong key (a misconfigured replica) or a tampered value: treat as a miss, loudly.
            self._metrics.cache_lookups.labels(layer="redis", result="error").inc()
            log.warning("redis entry does not open; ignoring it", extra={"cache_key": name})
            return None
        self._metrics.cache_lookups.labels(layer="redis", result="hit").inc()
        return token

    async def put_shared(self, key: TokenKey, token: AccessToken) -> None:
        ttl_ms = int(token.remaining_seconds() * 1000)
        if self._sealer is None or ttl_ms <= 0:
            return
        name = _name("tok", key)
        sealed = self._sealer.seal(json.dumps(token.to_record()).encode(), name.encode())
        await self._guarded("set", lambda redis: redis.set(name, sealed, px=ttl_ms))

    async def try_lease(self, key: TokenKey, lease_seconds: float) -> str | None:
        """Take the key's lease; the fencing value on success, ``""`` when Redis is unusable
        (fail open: acquire directly), ``None`` when another replica holds it."""
        fence = secrets.token_hex(16)
        taken = await self._guarded(
            "lease", lambda redis: redis.set(_name("lock", key), fence, nx=True, px=int(lease_seconds * 1000))
        )
        if taken is DOWN:
            return ""
        return fence if taken else None

    async def release_lease(self, key: TokenKey, fence: str) -> None:
        if fence:
            await self._guarded("release", lambda redis: redis.eval(_RELEASE, 1, _name("lock", key), fence))

    async def put_negative(self, key: TokenKey, body: dict[str, Any], ttl_seconds: float) -> None:
        if ttl_seconds > 0:
            value, ttl_ms = json.dumps(body), int(ttl_seconds * 1000)
            await self._guarded("negative", lambda redis: redis.set(_name("neg", key), value, px=ttl_ms))

    async def get_negative(self, key: TokenKey) -> dict[str, Any] | None:
        raw = await self._guarded("negative", lambda redis: redis.get(_name("neg", key)))
        if raw is DOWN or raw is None:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def set_throttle(self, app: str, tenant: str, seconds: float) -> None:
        """Tell every replica that Entra asked this (app, tenant) to hold off for ``seconds``."""
        if seconds > 0:
            name, ttl_ms = f"{_PREFIX}:throttle:{app}:{tenant}", int(seconds * 1000)
            await self._guarded("throttle", lambda redis: redis.set(name, b"1", px=ttl_ms))

    async def throttled_for(self, app: str, tenant: str) -> float:
        """Seconds left of a throttle another replica (or this one) recorded; 0 when none."""
        remaining_ms = await self._guarded(
            "throttle", lambda redis: redis.pttl(f"{_PREFIX}:throttle:{app}:{tenant}")
        )
        return 0.0 if remaining_ms is DOWN else max(0.0, remaining_ms / 1000)

    async def ping(self) -> bool:
        """Whether Redis answers (``True`` without Redis); ends any back-off, for /readyz."""
        if self._redis is None:
            return True
        self._redis_down_until = 0.0
        return await self._guarded("ping", lambda redis: redis.ping()) is not DOWN

    def purge_local(self, tenant: str) -> int:
        """Forget this process's tokens for ``tenant`` (on a purge broadcast)."""
        keys = [k for k in self._l1 if k.tenant == tenant.lower()]
        for key in keys:
            del self._l1[key]
        self._metrics.cached_tokens.set(len(self._l1))
        return len(keys)


async def purge_shared(redis: Redis, tenant: str) -> tuple[int, int]:
    """Delete a tenant's tokens, remembered failures and throttle from Redis, then tell every
    replica to drop its L1 copies. Returns (entries removed, replicas notified)."""
    tenant = tenant.lower()
    names: list[Any] = []
    for kind in ("tok", "neg"):
        async for name in redis.scan_iter(match=f"{_PREFIX}:{kind}:*:{tenant}:*"):
            names.append(name)
    async for name in redis.scan_iter(match=f"{_PREFIX}:throttle:*:{tenant}"):
        names.append(name)
    removed = int(await redis.delete(*names)) if names else 0
    notified = int(await redis.publish(PURGE_CHANNEL, tenant))
    return removed, notified
