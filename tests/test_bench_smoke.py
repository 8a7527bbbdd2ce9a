"""`make bench` keeps working: its smoke mode runs every part on tiny sizes (figures meaningless)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path: Path) -> None:
    """The smoke run is valid (all 200s, no upstream call under load) and the herd costs one Entra
    request per tenant."""
    summary = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(summary)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == result.returncode, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(summary.read_text())
    assert data["valid"] is True
    assert data["cold_herd"]["tenants"] == data["cold_herd"]["upstream_token_requests"]


def test_memory_bench_smoke(tmp_path: Path) -> None:
    """`python -m bench.memory --smoke` runs: every request for a nonexistent tenant is a 404, and it
    reports resident memory before and after (its figures mean nothing at this size)."""
    summary = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--smoke", "--json", str(summary)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == result.returncode, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(summary.read_text())
    assert ["404"] == list(data["statuses"])
    assert data["statuses"]["404"] >= data["requests"]
    assert data["rss_before_mb"] > 0
    assert data["rss_after_mb"] > 0
