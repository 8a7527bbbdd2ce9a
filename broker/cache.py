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

import json
import logging
import secrets
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

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


def token_key_name(key: TokenKey) -> str:
    return f"{_PREFIX}:tok:{key.app}:{key.tenant}:{key.resource}"


def _lock_name(key: TokenKey) -> str:
    return f"{_PREFIX}:lock:{key.app}:{key.tenant}:{key.resource}"


def _negative_name(key: TokenKey) -> str:
    return f"{_PREFIX}:neg:{key.app}:{key.tenant}:{key.resource}"


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

    def _redis_failed(self, operation: str, exc: Exception) -> None:
        self._metrics.redis_errors.inc()
        self._redis_down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
        self.redis_last_error = f"{operation}: {type(exc).__name__}"
        log.warning(
            "redis unavailable, failing open", extra={"operation": operation, "reason": type(exc).__name__}
        )

    def _redis_ok(self) -> None:
        self.redis_last_error = None

    async def get_shared(self, key: TokenKey) -> AccessToken | None:
        """The token Redis holds for ``key``, opened and checked; ``None`` on miss or error."""
        redis = self._redis_usable()
        if redis is None or self._sealer is None:
            return None
        name = token_key_name(key)
        try:
            blob = await redis.get(name)
        except (RedisError, OSError) as exc:
            self._metrics.cache_lookups.labels(layer="redis", result="error").inc()
            self._redis_failed("get", exc)
            return None
        self._redis_ok()
        if blob is None:
            self._metrics.cache_lookups.labels(layer="redis", result="miss").inc()
            return None
        try:
            record = json.loads(
                self._sealer.open(blob if isinstance(blob, bytes) else blob.encode(), name.encode())
            )
            token = AccessToken.from_record(record)
        except (SealError, ValueError, KeyError, TypeError):
            # Wrong key (a misconfigured replica) or a tampered value: treat as a miss, loudly.
            self._metrics.cache_lookups.labels(layer="redis", result="error").inc()
            log.warning("redis entry does not open; ignoring it", extra={"cache_key": name})
            return None
        self._metrics.cache_lookups.labels(layer="redis", result="hit").inc()
        return token

    async def put_shared(self, key: TokenKey, token: AccessToken) -> None:
        redis = self._redis_usable()
        ttl_ms = int(token.remaining_seconds() * 1000)
        if redis is None or self._sealer is None or ttl_ms <= 0:
            return
        name = token_key_name(key)
        sealed = self._sealer.seal(json.dumps(token.to_record()).encode(), name.encode())
        try:
            await redis.set(name, sealed, px=ttl_ms)
        except (RedisError, OSError) as exc:
            self._redis_failed("set", exc)
        else:
            self._redis_ok()

    async def try_lease(self, key: TokenKey, lease_seconds: float) -> str | None:
        """Take the key's lease; the fencing value on success, ``""`` when Redis is unusable
        (fail open: acquire directly), ``None`` when another replica holds it."""
        redis = self._redis_usable()
        if redis is None:
            return ""
        fence = secrets.token_hex(16)
        try:
            taken = await redis.set(_lock_name(key), fence, nx=True, px=int(lease_seconds * 1000))
        except (RedisError, OSError) as exc:
            self._redis_failed("lease", exc)
            return ""
        return fence if taken else None

    async def release_lease(self, key: TokenKey, fence: str) -> None:
        redis = self._redis_usable()
        if redis is None or not fence:
            return
        try:
            await redis.eval(_RELEASE, 1, _lock_name(key), fence)
        except (RedisError, OSError) as exc:
            self._redis_failed("release", exc)

    async def put_negative(self, key: TokenKey, body: dict[str, Any], ttl_seconds: float) -> None:
        redis = self._redis_usable()
        if redis is None or ttl_seconds <= 0:
            return
        try:
            await redis.set(_negative_name(key), json.dumps(body), px=int(ttl_seconds * 1000))
        except (RedisError, OSError) as exc:
            self._redis_failed("negative", exc)

    async def get_negative(self, key: TokenKey) -> dict[str, Any] | None:
        redis = self._redis_usable()
        if redis is None:
            return None
        try:
            raw = await redis.get(_negative_name(key))
        except (RedisError, OSError) as exc:
            self._redis_failed("negative", exc)
            return None
        if raw is None:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def set_throttle(self, app: str, tenant: str, seconds: float) -> None:
        """Tell every replica that Entra asked this (app, tenant) to hold off for ``seconds``."""
        redis = self._redis_usable()
        if redis is None or seconds <= 0:
            return
        try:
            await redis.set(f"{_PREFIX}:throttle:{app}:{tenant}", b"1", px=int(seconds * 1000))
        except (RedisError, OSError) as exc:
            self._redis_failed("throttle", exc)

    async def throttled_for(self, app: str, tenant: str) -> float:
        """Seconds left of a throttle another replica (or this one) recorded; 0 when none."""
        redis = self._redis_usable()
        if redis is None:
            return 0.0
        try:
            remaining_ms = await redis.pttl(f"{_PREFIX}:throttle:{app}:{tenant}")
        except (RedisError, OSError) as exc:
            self._redis_failed("throttle", exc)
            return 0.0
        return max(0.0, remaining_ms / 1000)

    async def ping(self) -> bool:
        if self._redis is None:
            return True
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            self._redis_failed("ping", exc)
            return False
        self._redis_down_until = 0.0
        self._redis_ok()
        return True

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
