"""Every Prometheus metric of the broker, registered on an injected ``CollectorRegistry``, plus the
process, Python platform and GC collectors.

Nothing touches the global registry, so two apps in one process (tests) do not collide. Labels are
bounded: caller and app names come from the configuration, outcomes and layers from fixed sets, AADSTS
codes from Entra's finite list. Tenant ids are never labels (unbounded); per-tenant detail is in logs.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
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
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from broker import __version__

_M = TypeVar("_M", Counter, Histogram)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REMAINING_BUCKETS = (60, 300, 600, 900, 1200, 1800, 2400, 3000, 3600, 4800, 5400)


class LoopCounter(Collector):
    """A labelled counter that only the event loop's thread updates: ``inc(*label_values)`` adds one
    to a plain float, without the lock, label validation and child lookup of ``Counter.labels().inc()``
    (the per-request path counts several of them). Exposed exactly as ``prometheus_client.Counter``
    (``_total`` and ``_created`` per label set). Label values come from fixed sets and the
    configuration, so the series are bounded; a scrape from another thread reads plain numbers."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._series: dict[tuple[str, ...], list[float]] = {}  # label values -> [value, created]
        registry.register(self)

    def inc(self, *label_values: str) -> None:
        series = self._series.get(label_values)
        if series is None:
            series = self._series[label_values] = [0.0, time.time()]
        series[0] += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self.labelnames)
        for label_values, (value, created) in list(self._series.items()):
            family.add_metric(label_values, value, created=created)
        yield family


class LoopHistogram(Collector):
    """A histogram that only the event loop's thread updates (``LoopCounter``'s reasons): one bisect
    and two additions per observation. Exposed exactly as ``prometheus_client.Histogram``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._bounds = [*map(float, buckets), float("inf")]
        # prometheus_client's own spelling of the bounds ("0.0005", "1.0", "+Inf"); it is untyped.
        self._le = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        # label values -> [count per bucket..., sum, created]
        self._series: dict[tuple[str, ...], list[float]] = {}
        if not self.labelnames:
            self._new(())  # an unlabelled histogram is exposed before its first observation
        registry.register(self)

    def _new(self, label_values: tuple[str, ...]) -> list[float]:
        series = self._series[label_values] = [0.0] * (len(self._bounds) + 1) + [time.time()]
        return series

    def observe(self, value: float, *label_values: str) -> None:
        series = self._series.get(label_values) or self._new(label_values)
        series[bisect_left(self._bounds, value)] += 1  # the first bucket whose bound is >= value
        series[-2] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self.labelnames)
        for label_values, series in list(self._series.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(self._le, series, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(label_values, buckets, series[-2])
            labels = dict(zip(self.labelnames, label_values, strict=True))
            family.samples.append(Sample(f"{self._name}_created", labels, series[-1]))
        yield family


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
        # Updated on every request: lock-free, on the event loop's thread only.
        self.token_requests = LoopCounter(
            "broker_token_requests", "Token requests by caller and outcome.", ["caller", "outcome"], r
        )
        self.token_request_seconds = LoopHistogram(
            "broker_token_request_seconds",
            "Token request latency by outcome.",
            ["outcome"],
            _LATENCY_BUCKETS,
            r,
        )
        self.cache_lookups = LoopCounter(
            "broker_cache_lookups",
            "Token cache lookups by layer (l1|redis) and result (hit|miss|error).",
            ["layer", "result"],
            r,
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
        self.served_token_remaining_seconds = LoopHistogram(
            "broker_served_token_remaining_seconds",
            "Remaining lifetime of tokens handed to callers.",
            [],
            _REMAINING_BUCKETS,
            r,
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
