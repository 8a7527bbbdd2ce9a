"""The broker's metrics registry: process, platform and GC series beside the broker's own."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from broker.metrics import Metrics


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
