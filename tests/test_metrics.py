"""The broker's metrics registry: process, platform and GC series beside the broker's own."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest

from broker.metrics import LoopCounter, LoopHistogram, Metrics


def test_registry_exposes_process_python_and_gc_series() -> None:
    """/metrics shows the process (memory, CPU, fds), the Python platform and GC series, on the
    broker's own registry: a dashboard can see a leak or a GC storm without another exporter."""
    text = generate_latest(Metrics().registry).decode()
    wanted = [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "python_info",
        "python_gc_objects_collected_total",
    ]
    assert [] == [name for name in wanted if f"\n{name}" not in text]


def test_two_instances_in_one_process_do_not_clash() -> None:
    """Two Metrics() (two apps in one test process) each register their own collectors without a
    duplicated-timeseries error, and neither touches the global registry."""
    before = generate_latest(REGISTRY)
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    for metrics in (first, second):
        assert 1 == generate_latest(metrics.registry).count(b"\nprocess_resident_memory_bytes ")
    assert before.count(b"broker_") == generate_latest(REGISTRY).count(b"broker_")


def test_loop_metrics_are_exposed_exactly_as_prometheus_client_metrics() -> None:
    """``LoopCounter`` and ``LoopHistogram`` (the lock-free per-request metrics) and the
    prometheus_client classes they replace, given the same updates, expose the same text, bucket
    edges included (a value on a bound counts in that bucket); only the _created times differ."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("t_requests", "Requests.", ["caller", "outcome"], registry=theirs)
    loop_counter = LoopCounter("t_requests", "Requests.", ["caller", "outcome"], ours)
    histogram = Histogram("t_seconds", "Latency.", ["outcome"], buckets=(0.0005, 0.001, 2.5), registry=theirs)
    loop_histogram = LoopHistogram("t_seconds", "Latency.", ["outcome"], (0.0005, 0.001, 2.5), ours)
    plain = Histogram("t_remaining", "Remaining.", buckets=(60, 3600), registry=theirs)
    loop_plain = LoopHistogram("t_remaining", "Remaining.", [], (60, 3600), ours)
    for n, value in enumerate((0.0001, 0.0005, 0.00051, 0.001, 2.5, 7.0, 0.0)):
        outcome = "ok" if n % 3 else "access_denied"
        counter.labels("soar", outcome).inc()
        loop_counter.inc("soar", outcome)
        histogram.labels(outcome).observe(value)
        loop_histogram.observe(value, outcome)
        plain.observe(value * 1000)
        loop_plain.observe(value * 1000)

    def text(registry: CollectorRegistry) -> str:
        return re.sub(r"(_created(?:\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())

    assert text(theirs) == text(ours)
    assert 'outcome="ok"} 4.0' in text(ours)
