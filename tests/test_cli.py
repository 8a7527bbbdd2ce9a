"""The ``token-broker`` command line, run as an operator runs it (a subprocess)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.support import free_port, run_cli, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent

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


def _healthz_app(status: int) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if status == 200 else "down"}, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    return app


def test_healthcheck_follows_the_configured_port(tmp_path: Path) -> None:
    """`token-broker healthcheck` probes /healthz on the port the configuration gives, from the file or
    from BROKER_LISTEN_PORT (what the Helm chart sets), on loopback for a wildcard host: exit 0 when it
    answers 200, 1 when it answers otherwise or nothing listens there, and 1 (not Docker's reserved 2)
    for a bad configuration."""
    config = broken_config(tmp_path)
    del config["apps"]["defender"]["resoures"], config["outbound_ca_file"], config["service_account_auth"]
    del config["redis_url"], config["cache_encryption_key"]
    config["callers"]["soar"]["apps"] = ["defender"]  # the credential file is absent: not checked here
    up, down, idle = free_port(), free_port(), free_port()
    path = tmp_path / "broker.yaml"
    wildcard = {"host": "0.0.0.0", "port": up}  # noqa: S104 - only written to the config under test
    path.write_text(yaml.safe_dump({**config, "listen": wildcard}))
    no_listen = tmp_path / "no-listen.yaml"
    no_listen.write_text(yaml.safe_dump(config))
    with serve_in_thread(_healthz_app(200), up), serve_in_thread(_healthz_app(503), down):
        results = [
            run_cli("healthcheck", "--config", str(path), env=_env()).returncode,
            run_cli(
                "healthcheck", "--config", str(no_listen), env={**_env(), "BROKER_LISTEN_PORT": str(up)}
            ).returncode,
            run_cli(
                "healthcheck", "--config", str(no_listen), env={**_env(), "BROKER_LISTEN_PORT": str(down)}
            ).returncode,
            run_cli(
                "healthcheck", "--config", str(no_listen), env={**_env(), "BROKER_LISTEN_PORT": str(idle)}
            ).returncode,
            run_cli("healthcheck", "--config", str(tmp_path / "absent.yaml"), env=_env()).returncode,
        ]
    assert [0, 0, 1, 1, 1] == results


def test_image_healthcheck_uses_the_configured_port() -> None:
    """The Dockerfile's HEALTHCHECK runs `token-broker healthcheck` (which reads the configuration and
    BROKER_LISTEN_PORT) instead of probing a hard-coded port."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"(?m)^HEALTHCHECK\b(?:[^\n]*\\\n)*[^\n]*", dockerfile)  # with continuation lines
    assert match is not None
    healthcheck = match.group(0)
    assert 'CMD ["token-broker", "healthcheck"]' in healthcheck
    assert [] == re.findall(r"\b(?:8080|9090)\b", healthcheck)
