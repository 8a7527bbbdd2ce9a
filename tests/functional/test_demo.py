"""`make demo` keeps working: the walk-through runs end to end, and the stack then keeps running for
someone to try until Ctrl-C, stopping what it started."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end() -> None:
    """The demo gets a token, a cache hit on the other replica, a consent error, onboards the
    unconsented tenant through an invite and the emulated consent page (tokens for it afterwards),
    and exits 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--once"],
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
    assert "the page says: Your organization is connected" in result.stdout
    assert "tenant_id=fa0fa0fa-0000-4000-8000-000000000002" in result.stdout
    assert "== stopping everything the demo started" in result.stdout


def test_demo_keeps_the_stack_running_and_its_printed_commands_work() -> None:
    """Without --once the demo stays up after the walk-through and prints commands that work as
    printed: the consented tenant's curl gets a token, and so does the one onboarded on the way; Ctrl-C
    then stops everything and exits 0."""
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 120
        while not any(line.strip().startswith("caller key:") for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = demo.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        curls = [
            line.strip() for line in lines if line.strip().startswith("curl -s http") and "/v1/token" in line
        ]
        assert 2 == len(curls), "".join(lines)
        answers = [
            subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30, check=True).stdout
            for curl in curls
        ]
        assert '"access_token"' in answers[0]
        assert '"access_token"' in answers[1]  # fabrikam, onboarded during the walk-through
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert 0 == demo.returncode
    assert "== stopping everything the demo started" in output
