"""`make demo`: try token-broker with no Entra app of your own, on this machine.

Starts a redis-server, the Entra ID + Key Vault emulator (its demo world: tenant contoso has consented
the Defender app, fabrikam has not; the app secret and the cache key live only in the emulated Key
Vault) and two broker replicas sharing Redis; asks for tokens and prints what happened; then keeps the
stack running until Ctrl-C and prints a caller key and the exact commands to try against it.
``--once`` stops everything after the walk-through instead (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import requests

from broker.callers import new_api_key
from broker.tokens import decode_claims
from emulator import start_emulator
from emulator.stack import BrokerProcess, RedisServer
from emulator.world import (
    CONTOSO_TENANT_ID,
    DEFENDER_CLIENT_ID,
    DEFENDER_XDR,
    DEMO_WORLD,
    FABRIKAM_TENANT_ID,
    broker_config,
    broker_environment,
)


def step(title: str) -> None:
    print(f"\n== {title}")


def show(response: requests.Response) -> dict[str, object]:
    body: dict[str, object] = response.json()
    print(f"   HTTP {response.status_code} (X-Request-ID {response.headers.get('X-Request-ID')})")
    return body


def try_it_yourself(replica: BrokerProcess, key: str, ca_note: str) -> None:
    """Print the caller key and the exact commands to try while the stack keeps running."""
    step("the stack keeps running: try it yourself (Ctrl-C stops everything)")
    auth = shlex.quote(f"Authorization: Bearer {key}")
    for tenant, what in (
        ("contoso.onmicrosoft.com", "consented: a token"),
        ("fabrikam.onmicrosoft.com", "not consented: consent_required and the consent link"),
    ):
        body = shlex.quote(json.dumps({"tenant": tenant, "resource": DEFENDER_XDR}))
        print(f"   # {what}")
        print(f"   curl -s {replica.url}/v1/token -H {auth} -H 'Content-Type: application/json' -d {body}")
    print("   # the metrics and readiness")
    print(f"   curl -s http://127.0.0.1:{replica.metrics_port}/metrics | grep ^broker_")
    print(f"   curl -s {replica.url}/readyz")
    print("   # the CLI against the same configuration (decoded claims, never the token)")
    print(
        f"   {sys.executable} -m broker.cli probe --config {shlex.quote(str(replica.config_path))} "
        f"--tenant contoso.onmicrosoft.com --resource {DEFENDER_XDR}"
    )
    print(f"   caller key: {key}  ({ca_note})")
    print(
        "\n   With your own Entra app: see README 'Quick start' (make venv, hash-key, "
        "BROKER_CLIENT_ID/BROKER_CLIENT_SECRET, make run)."
    )
    sys.stdout.flush()


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: received.append(number))
    while not received:
        signal.pause()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop everything after the walk-through")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="token-broker-demo-"))
    redis = RedisServer(work)
    emulator = None
    replicas: list[BrokerProcess] = []
    try:
        step("starting redis-server, the Entra ID + Key Vault emulator and two broker replicas")
        redis.start()
        emulator = start_emulator(work / "emulator", demo=True)
        key, key_hash = new_api_key()
        env = broker_environment(emulator)
        callers = {"demo": DEMO_WORLD.caller(key_hash)}
        config = broker_config(emulator, DEMO_WORLD, callers, redis_url=redis.url)
        for name in ("replica-1", "replica-2"):
            replicas.append(BrokerProcess(work, config, env, name))
            replicas[-1].start()
            print(f"   {name}: {replicas[-1].url} (metrics :{replicas[-1].metrics_port})")
        print(f"   emulator: {emulator.base_url}; redis: {redis.url}; files in {work}")

        def ask(replica: BrokerProcess, tenant: str) -> requests.Response:
            return requests.post(
                f"{replica.url}/v1/token",
                timeout=30,
                json={"tenant": tenant, "resource": DEFENDER_XDR},
                headers={"Authorization": f"Bearer {key}"},
            )

        step("the admin-consent link for a new customer tenant (token-broker consent-url)")
        config_path = work / "replica-1.yaml"
        link = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "consent-url",
                "--config",
                str(config_path),
                "--tenant",
                "fabrikam.onmicrosoft.com",
                "--redirect-uri",
                "https://partner.example/consented",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print("   " + link.stdout.strip())

        step("replica-1: token for contoso.onmicrosoft.com (cold: Key Vault secret → MSAL → emulated Entra)")
        first = show(ask(replicas[0], "contoso.onmicrosoft.com"))
        claims = decode_claims(str(first["access_token"]))
        print(
            textwrap.indent(
                json.dumps(
                    {k: claims.get(k) for k in ("tid", "aud", "appid", "roles", "exp", "uti")}, indent=2
                ),
                "   ",
            )
        )
        print(f"   expires_in={first['expires_in']} s; the token itself is not printed")

        step("replica-2: the same request (served from the shared, encrypted Redis entry)")
        second = show(ask(replicas[1], "contoso.onmicrosoft.com"))
        print(
            f"   same token: {second['access_token'] == first['access_token']}; "
            f"Entra token requests so far: {emulator.token_requests(client_id=DEFENDER_CLIENT_ID)}"
        )
        audit = replicas[1].audit_lines()
        print(
            f"   replica-2 audit line: cache_layer={audit[-1]['cache_layer']}, "
            f"latency_ms={audit[-1]['latency_ms']}"
        )

        step("fabrikam has not consented: the caller gets consent_required with the link")
        print(textwrap.indent(json.dumps(show(ask(replicas[0], FABRIKAM_TENANT_ID)), indent=2), "   "))

        step("metrics excerpt (replica-2)")
        for line in replicas[1].metrics_text().splitlines():
            if line.startswith(
                (
                    "broker_token_requests_total",
                    "broker_cache_lookups_total",
                    "broker_upstream_requests_total",
                )
            ):
                print("   " + line)
        print(f"\nOK: contoso ({CONTOSO_TENANT_ID}) served by both replicas with one Entra request.")
        if not args.once:
            try_it_yourself(replicas[0], key, "a demo key: it exists only in this stack's configuration")
            wait_for_interrupt()
        return 0
    finally:
        step("stopping everything the demo started")
        for replica in replicas:
            replica.stop()
        if emulator is not None:
            emulator.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
