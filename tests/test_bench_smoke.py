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


def test_bench_smoke(tmp_path: Path) -> None:
    """The smoke run is valid (all 200s, no upstream call under load) and the herd costs one Entra
    request per tenant."""
    data = _smoke("bench", tmp_path / "bench.json")
    assert data["valid"] is True
    assert data["cold_herd"]["tenants"] == data["cold_herd"]["upstream_token_requests"]


def test_memory_bench_smoke(tmp_path: Path) -> None:
    """`python -m bench.memory --smoke` runs: every request for a nonexistent tenant is a 404, and it
    reports resident memory before and after (its figures mean nothing at this size)."""
    data = _smoke("bench.memory", tmp_path / "memory.json")
    assert ["404"] == list(data["statuses"])
    assert data["statuses"]["404"] >= data["requests"]
    assert data["rss_before_mb"] > 0
    assert data["rss_after_mb"] > 0
