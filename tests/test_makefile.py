"""The Makefile's targets install what they need and no more: running the service needs only Python
and pip (no root, no system packages, no test tools); the test and bench tools come with their targets.

Checked statically with ``make -n`` in a scratch copy of the repository's build files, so nothing is
installed and the checkout's own .venv does not hide a step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")

SYSTEM_DEPS = "scripts/install-system-deps.sh"


@pytest.fixture
def clean_checkout(tmp_path: Path) -> Path:
    """The Makefile and the files its stamps depend on, without any .venv or .tools."""
    for name in ("Makefile", "pyproject.toml", SYSTEM_DEPS, "tests/node/package-lock.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def dry_run(checkout: Path, target: str) -> str:
    """The commands ``make TARGET`` would run on a clean checkout (``make -n``: none is executed)."""
    assert MAKE is not None
    # Not the flags of a make that runs this suite (`make unit` exports MAKEFLAGS, MAKELEVEL).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        [MAKE, "--no-print-directory", "-n", target],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    ).stdout


@pytest.mark.parametrize("target", ["venv", "run"])
def test_run_needs_only_python_and_pip(clean_checkout: Path, target: str) -> None:
    """`make venv` and `make run` (the README's "run it") create the venv with the service's runtime
    dependencies only: no system packages (which need root), no test extras."""
    commands = dry_run(clean_checkout, target)
    assert "-m pip install --quiet -e .\n" in commands
    assert [] == [word for word in (SYSTEM_DEPS, "apt-get", "sudo", "[test]") if word in commands]
    assert ("token-broker serve" in commands) == (target == "run")


@pytest.mark.parametrize("target", ["install", "test", "unit", "lint"])
def test_test_targets_install_the_test_tools(clean_checkout: Path, target: str) -> None:
    """`make install`/`make test` (what .ci/run calls on a clean machine) still install the test
    tools: redis-server and promtool (system packages) and the [test] extras; not the bench tools."""
    commands = dry_run(clean_checkout, target)
    assert (True, True, False) == (
        f"bash {SYSTEM_DEPS} test" in commands,
        "-e '.[test]'" in commands,
        f"bash {SYSTEM_DEPS} bench" in commands,
    )


def test_bench_installs_the_load_generator(clean_checkout: Path) -> None:
    """`make bench` adds its own tool (wrk) to what the tests need (the emulator lives in tests/)."""
    commands = dry_run(clean_checkout, "bench")
    assert (True, True) == (f"bash {SYSTEM_DEPS} bench" in commands, "-e '.[test]'" in commands)


def test_system_deps_script_names_its_groups() -> None:
    """The script installs per group: `test` (redis-server, prometheus for promtool, nodejs and npm
    for the Node.js SDK clients of the drop-in tests, chromium and chromium-driver for the onboarding
    pages' browser tests) and `bench` (wrk); `--list` prints a group's
    Debian packages without installing anything."""
    listed = [
        subprocess.run(
            ["bash", str(ROOT / SYSTEM_DEPS), "--list", group],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        for group in ("test", "bench")
    ]
    assert [["redis-server", "prometheus", "nodejs", "npm", "chromium", "chromium-driver"], ["wrk"]] == listed
