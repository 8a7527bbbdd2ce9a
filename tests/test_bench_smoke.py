"""`make bench` keeps working: its smoke mode runs every part on tiny sizes (figures meaningless)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _smoke(module: str, summary: Path) -> dict[str, Any]:
    """``python -m MODULE --smoke --json SUMMARY``: it must exit 0; its JSON summary."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--json", str(summary)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == result.returncode, result.stdout[-3000:] + result.stderr[-3000:]
    data: dict[str, Any] = json.loads(summary.read_text())
    return data


SPREAD = ["max", "median", "min"]


def test_bench_smoke(tmp_path: Path) -> None:
    """The smoke run is valid (all 200s, no upstream call under load) and the herd costs one Entra
    request per tenant. Its summary reports every figure of the run: the cache-hit ratios and each
    server's CPU per request as min / median / max over the rounds, the memory per cached tenant, the
    memory growth after requests for nonexistent tenants, the cold path with and without Redis."""
    data = _smoke("bench", tmp_path / "bench.json")
    assert data["valid"] is True
    assert data["cold_herd"]["tenants"] == data["cold_herd"]["upstream_token_requests"]

    cache_hit = data["cache_hit"]
    for figures in (
        cache_hit["throughput_ratio"],
        cache_hit["p99_ratio"],
        cache_hit["cpu_us_per_request"]["broker"],
        cache_hit["cpu_us_per_request"]["baseline"],
    ):
        assert SPREAD == sorted(figures)
        assert figures["min"] <= figures["median"] <= figures["max"]
    assert cache_hit["throughput_ratio"]["median"] == data["targets"]["throughput_ratio"]["value"]
    assert ">= 0.9" == data["targets"]["throughput_ratio"]["target"]

    per_tenant = data["memory"]["per_cached_tenant"]
    assert data["settings"]["tenants"] == per_tenant["tenants"]
    assert per_tenant["rss_after_mb"] >= per_tenant["rss_before_mb"] > 0
    assert "memory_per_cached_tenant_bytes" in data["targets"]
    growth = data["memory"]["growth_nonexistent_tenants"]
    assert data["settings"]["memory_requests"] == growth["requests"]
    assert ["404"] == list(growth["statuses"])
    assert growth["growth_mb"] == data["targets"]["memory_growth_nonexistent_tenants_mb"]["value"]

    cold = data["cold_path"]
    assert data["settings"]["cold_latency_ms"] == cold["entra_latency_ms"]
    for label in ("with_redis", "without_redis"):
        assert data["settings"]["cold_tenants"] == cold[label]["tenants"]
        assert cold[label]["tenants"] == cold[label]["upstream_token_requests"]
        assert 0 == cold[label]["tenants_not_one_token_request"]
        assert SPREAD == sorted(cold[label]["broker_overhead_ms"])
        # The injected latency is on the path, and subtracted.
        assert cold[label]["first_token_ms"]["min"] >= cold["entra_latency_ms"]


def test_memory_bench_smoke(tmp_path: Path) -> None:
    """`python -m bench.memory --smoke` runs: every request for a nonexistent tenant is a 404, and it
    reports resident memory before and after (its figures mean nothing at this size)."""
    data = _smoke("bench.memory", tmp_path / "memory.json")
    assert ["404"] == list(data["statuses"])
    assert data["statuses"]["404"] >= data["requests"]
    assert data["rss_before_mb"] > 0
    assert data["rss_after_mb"] > 0
