"""pytest fixtures for the emulator; enable with ``pytest_plugins = ["emulator.pytest_plugin"]``.

* ``emulator_process`` (session): one emulator subprocess for the whole run, on a free port, its
  state (CA, ready file, log) in a pytest temporary directory; stopped at the end.
* ``emulator`` (function): the same handle after :meth:`Emulator.reset`, with the Key Vault SDK's
  process-wide challenge cache cleared, so every test starts from the base state.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest

from .client import Emulator, start_emulator


@pytest.fixture(scope="session")
def emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A running emulator shared by the session."""
    handle = start_emulator(tmp_path_factory.mktemp("emulator"), timeout=30.0)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def emulator(emulator_process: Emulator) -> Emulator:
    """The session's emulator, reset to its base state for this test."""
    emulator_process.reset()
    _clear_key_vault_challenge_cache()
    return emulator_process


def _clear_key_vault_challenge_cache() -> None:
    # Each Key Vault SDK caches the vault's challenge (tenant, resource) per host:port for the whole
    # process; a test that changed the vault's answer must not leak it into the next one.
    for package in ("secrets", "keys", "certificates"):
        try:
            module = importlib.import_module(f"azure.keyvault.{package}._shared.http_challenge_cache")
        except ImportError:  # the Key Vault SDKs are optional for tests that only use Entra
            continue
        module.clear()
