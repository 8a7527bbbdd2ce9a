"""Every Prometheus metric of the broker, registered on an injected ``CollectorRegistry``, plus the
process, Python platform and GC collectors.

Nothing touches the global registry, so two apps in one process (tests) do not collide. Labels are
bounded: caller and app names come from the configuration, outcomes and layers from fixed sets, AADSTS
codes from Entra's finite list. Tenant ids are never labels (unbounded); per-tenant detail is in logs.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from broker import __version__

_M = TypeVar("_M", Counter, Histogram)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REMAINING_BUCKETS = (60, 300, 600, 900, 1200, 1800, 2400, 3000, 3600, 4800, 5400)


class Metrics:
    """The broker's metrics; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* (memory, CPU, open fds), python_info and python_gc_*: the client registers these on
        # its global registry by default, which the broker never serves, so register them here.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.token_requests = Counter(
            "broker_token_requests",
            "Token requests by caller and outcome.",
            ["caller", "outcome"],
            registry=r,
        )
        self.token_request_seconds = Histogram(
            "broker_token_request_seconds",
            "Token request latency by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "broker_cache_lookups",
            "Token cache lookups by layer (l1|redis) and result (hit|miss|error).",
            ["layer", "result"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "broker_upstream_requests",
            "Entra token requests by app, outcome and AADSTS code.",
            ["app", "outcome", "aadsts"],
            registry=r,
        )
        self.upstream_request_seconds = Histogram(
            "broker_upstream_request_seconds",
            "Entra token request latency by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_unreachable = Counter(
            "broker_upstream_unreachable",
            "Entra token requests that could not reach Entra ID, by cause (dns, connection_refused, "
            "connection_reset, tls, proxy, timeout, connection_error).",
            ["cause"],
            registry=r,
        )
        self.singleflight_coalesced = Counter(
            "broker_singleflight_coalesced",
            "Requests that waited on another request's acquisition.",
            registry=r,
        )
        self.refresh = Counter(
            "broker_refresh",
            "Background refreshes ahead of expiry by outcome.",
            ["outcome"],
            registry=r,
        )
        self.keyvault_requests = Counter(
            "broker_keyvault_requests",
            "Key Vault requests (secret and certificate reads, key signatures) by outcome "
            "(ok, not_found, error, throttled).",
            ["outcome"],
            registry=r,
        )
        self.redis_errors = Counter(
            "broker_redis_errors",
            "Redis operations that failed (the broker fails open).",
            registry=r,
        )
        self.negative_cache_hits = Counter(
            "broker_negative_cache_hits",
            "Requests answered from the remembered permanent failures.",
            registry=r,
        )
        self.cached_tokens = Gauge(
            "broker_cached_tokens",
            "Tokens held in this process's L1 cache.",
            registry=r,
        )
        self.served_token_remaining_seconds = Histogram(
            "broker_served_token_remaining_seconds",
            "Remaining lifetime of tokens handed to callers.",
            buckets=_REMAINING_BUCKETS,
            registry=r,
        )
        self.credential_failures = Counter(
            "broker_credential_failures",
            "App credential rejected by Entra (after a reload) by app.",
            ["app"],
            registry=r,
        )
        self.rate_limited = Counter(
            "broker_rate_limited",
            "Requests refused because the caller spent its Entra acquisition budget, by caller.",
            ["caller"],
            registry=r,
        )
        self.refused_connections = Counter(
            "broker_refused_connections",
            "Connections answered 503 and closed because max_connections were open.",
            registry=r,
        )
        self.background_task_failures = Counter(
            "broker_background_task_failures",
            "Background tasks (credential refresh, purge listener) that died and were restarted.",
            ["task"],
            registry=r,
        )
        self.consent_callbacks = Counter(
            "broker_consent_callbacks",
            "Admin-consent callbacks by outcome (connected, missing_roles, declined, invalid, expired, "
            "used, propagating, failed).",
            ["outcome"],
            registry=r,
        )
        # Tenants (tenants.py). States and apps are fixed sets; tenant ids are never labels.
        self.tenants = Gauge(
            "broker_tenants",
            "Registered (tenant, resource) entries by app and state, counted over the whole registry by "
            "the replica running the re-validation sweep (other replicas export none: use max).",
            ["app", "state"],
            registry=r,
        )
        self.tenant_transitions = Counter(
            "broker_tenant_transitions",
            "Registry state changes of a (tenant, app, resource) by app, from and to state "
            "(from=new for a first record); each change is counted once, by the replica that wrote it.",
            ["app", "from", "to"],
            registry=r,
        )
        self.tenant_checks = Counter(
            "broker_tenant_checks",
            "Re-validation acquisitions by trigger (sweep|admin) and outcome.",
            ["trigger", "outcome"],
            registry=r,
        )
        self.tenant_resolutions = Counter(
            "broker_tenant_resolutions",
            "Domain to tenant GUID resolutions by source (redis|discovery) and outcome (ok|unknown|error).",
            ["source", "outcome"],
            registry=r,
        )
        self.redis_failures = Counter(
            "broker_redis_failures",
            "Failed Redis calls by reason: connection, timeout, pool, moved (a Cluster read as one "
            "server), readonly (a replica or demoted master), auth, noperm (the ACL), command.",
            ["reason"],
            registry=r,
        )
        self.redis_probe_ok = Gauge(
            "broker_redis_probe_ok",
            "1 when /readyz's last write probe of Redis succeeded (or there is no Redis), 0 when it failed.",
            registry=r,
        )
        self.build_info = Info("broker_build", "token-broker build information.", registry=r)
        self.build_info.info({"version": __version__})
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}

    def child(self, metric: _M, *label_values: str) -> _M:
        """``metric.labels(*label_values)``, memoised: ``labels()`` validates, builds a key and takes a
        lock on every call, which the per-request path pays several times. Label sets are bounded
        (configured names, fixed outcomes), so the memo is too."""
        key = (metric, label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found  # type: ignore[return-value]
