"""The ``token-broker`` command line, run as an operator runs it (a subprocess)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import run_cli

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
HASH = "a" * 64
PASSWORD = "Sup3r/S3cret-Passw0rd"


def _env() -> dict[str, str]:
    """The test's environment without any BROKER_* setting that could change what is validated."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


def broken_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "outbound_ca_file": str(tmp_path / "missing-ca.pem"),
        "redis_url": f"redis://:{PASSWORD}@cache:6379/0",
        "cache_encryption_key": {"env": "CACHE_KEY"},
        "apps": {
            "defender": {
                "client_id": CLIENT_ID,
                "credential": {"file": str(tmp_path / "missing-secret")},
                "resources": ["https://api.security.microsoft.com"],
                "resoures": ["https://api.securitycenter.microsoft.com"],
            }
        },
        "callers": {"soar": {"api_key_sha256": HASH, "tenants": ["*"], "apps": ["defendr"]}},
        "service_account_auth": {"issuer": "https://issuer.example", "jwks_file": str(tmp_path / "jwks")},
    }


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_config_problems_exit_2_all_named_without_traceback_or_secret(tmp_path: Path, command: str) -> None:
    """check-config and serve both exit 2 on a bad configuration, naming every problem at once (missing
    files, a misspelt key with its suggestion, an unknown app, an unparsable redis_url), with no
    traceback and nothing of the Redis password on stdout or stderr."""
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(broken_config(tmp_path)), encoding="utf-8")
    result = run_cli(command, "--config", str(path), env=_env())
    output = result.stdout + result.stderr
    expected = [
        f"outbound_ca_file: file {tmp_path / 'missing-ca.pem'} does not exist",
        f"apps.defender.credential.file: file {tmp_path / 'missing-secret'} does not exist",
        f"service_account_auth.jwks_file: file {tmp_path / 'jwks'} does not exist",
        "apps.defender.resoures: unknown key (did you mean 'resources'?)",
        "callers.soar.apps: unknown app 'defendr' (did you mean 'defender'?)",
        "redis_url: ",
        "percent-encode the password",
    ]
    assert (2, []) == (result.returncode, [line for line in expected if line not in result.stderr])
    assert "Traceback" not in output
    leaked = [part for part in (PASSWORD, *PASSWORD.split("/")) if part in output]
    assert [] == leaked


def test_bad_redis_url_from_the_environment_is_not_echoed(tmp_path: Path) -> None:
    """BROKER_REDIS_URL (from a Kubernetes Secret) that cannot be parsed: exit 2, the variable named,
    its value nowhere in the output."""
    config = broken_config(tmp_path)
    config["apps"]["defender"]["credential"] = {"env": "APP_SECRET"}
    del config["apps"]["defender"]["resoures"], config["outbound_ca_file"], config["service_account_auth"]
    config["callers"]["soar"]["apps"] = ["defender"]
    config["redis_url"] = "redis://cache:6379/0"
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert 0 == run_cli("check-config", "--config", str(path), env=_env()).returncode
    url = f"rediss://default:{PASSWORD}@cache:6380/0"
    result = run_cli("check-config", "--config", str(path), env={**_env(), "BROKER_REDIS_URL": url})
    assert 2 == result.returncode
    assert "redis_url: " in result.stderr
    assert "BROKER_REDIS_URL" in result.stderr
    assert [] == [part for part in (PASSWORD, *PASSWORD.split("/")) if part in result.stdout + result.stderr]
