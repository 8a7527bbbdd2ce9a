"""No access token, client secret, cache encryption key or caller API key appears in any log line
(at DEBUG), error body, metric or CLI output, across success, failure and rotation scenarios."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import requests
import yaml

from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    MDE,
    TENANT_A,
    TENANT_B,
    TENANT_UNCONSENTED,
    World,
    ask,
)
from tests.support import BrokerProcess, run_cli

StartBroker = Callable[..., BrokerProcess]


def test_nothing_secret_leaks(
    world: World, start_broker: StartBroker, redis_url: str, tmp_path: Path
) -> None:
    """Run the usual scenarios at DEBUG, collect every output, and search it for every secret."""
    config = world.broker_config(redis_url, log_level="DEBUG")
    broker = start_broker(config, world.env)
    outputs: list[str] = []
    tokens: list[str] = []

    def call(key: str | None, body: dict[str, object]) -> None:
        response = ask(broker, key, body)
        if response.status_code == 200:
            tokens.append(response.json()["access_token"])
        else:
            outputs.append(response.text)
        outputs.append(str(response.headers))

    call(world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    call(world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    call(world.soar_key, {"tenant": TENANT_B, "resource": MDE, "roles": ["Machine.Isolate"]})
    call(world.soar_key, {"tenant": TENANT_UNCONSENTED, "resource": DEFENDER})
    call(world.hunter_key, {"tenant": TENANT_B, "resource": DEFENDER})
    call(world.soar_key + "x", {"tenant": TENANT_A, "resource": DEFENDER})
    old_secret = world.app_secret
    new_secret = world.emulator.rotate_app_secret(APP_ID, vault_secret="defender-app-secret")
    call(world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
    dead = world.emulator.rotate_app_secret(APP_ID)  # Key Vault keeps the now dead secret
    call(world.soar_key, {"tenant": TENANT_A, "resource": MDE})
    outputs.append(requests.get(f"{broker.url}/readyz", timeout=5).text)
    outputs.append(broker.metrics_text())
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(config))
    world.emulator.rotate_app_secret(APP_ID, vault_secret="defender-app-secret")
    probe = run_cli(
        "probe",
        "--config",
        str(path),
        "--tenant",
        TENANT_A,
        "--resource",
        DEFENDER,
        env={**world.env, "PATH": "/usr/bin:/bin"},
    )
    assert 0 == probe.returncode, probe.stderr
    outputs += [probe.stdout, probe.stderr]
    broker.stop()
    outputs.append(broker.log_text())
    assert len(tokens) >= 3
    haystack = "\n".join(outputs)
    assert '"logger":"broker.audit"' in haystack  # the logs really are in there
    secrets = {
        "old app secret": old_secret,
        "new app secret": new_secret,
        "dead app secret": dead,
        "cache key": world.cache_key,
        "soar key": world.soar_key,
        "hunter key": world.hunter_key,
        "broker identity secret": world.emulator.broker_identity.client_secret,
    }
    for i, token in enumerate(tokens):
        secrets[f"token {i}"] = token
        secrets[f"token {i} signature"] = token.rsplit(".", 1)[1]
    leaked = [name for name, value in secrets.items() if value in haystack]
    assert [] == leaked
