"""`make demo` keeps working: the script runs end to end and stops what it started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end() -> None:
    """The demo gets a token, a cache hit on the other replica, a consent error, and exits 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "same token: True; Entra token requests so far: 1" in result.stdout
    assert "cache_layer=redis" in result.stdout
    assert '"error": "consent_required"' in result.stdout
    assert "== stopping everything the demo started" in result.stdout
