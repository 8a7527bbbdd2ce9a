"""`make demo`: try token-broker with no Entra app of your own, on this machine.

Starts a redis-server, the Entra ID + Key Vault emulator (its demo world: tenant contoso has consented
the Defender app, fabrikam has not; the app secret and the cache key live only in the emulated Key
Vault) and two broker replicas sharing Redis; asks for tokens and prints what happened; onboards fabrikam
(an invite link, admin consent on the emulated Entra page, the broker's page proving it, then tokens for
fabrikam); then keeps the
stack running until Ctrl-C and prints a caller key and the exact commands to try against it.
``--once`` stops everything after the walk-through instead (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
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
from emulator import Emulator, start_emulator
from emulator.stack import BrokerProcess, RedisServer, free_port
from emulator.world import (
    CONTOSO_TENANT_ID,
    DEFENDER_CLIENT_ID,
    DEFENDER_XDR,
    DEMO_WORLD,
    FABRIKAM_TENANT_ID,
    XDR_ROLES,
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
        ("fabrikam.onmicrosoft.com", "onboarded by the walk-through (invite, consent): a token too"),
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
    print(
        "   # an onboarding invite link for a tenant, signed with the configured key (open it in a browser)"
    )
    print(
        f"   {sys.executable} -m broker.cli tenants invite --config {shlex.quote(str(replica.config_path))} "
        f"{FABRIKAM_TENANT_ID}"
    )
    print(f"   caller key: {key}  ({ca_note})")
    print(
        "\n   With your own Entra app: see README 'Quick start' (make venv, hash-key, "
        "BROKER_CLIENT_ID/BROKER_CLIENT_SECRET, make run)."
    )
    sys.stdout.flush()


def onboard(emulator: Emulator, replica: BrokerProcess, admin_key: str, tenant: str) -> None:
    """The customer's side of onboarding, with requests standing in for the admin's browser: the
    invite, the broker's redirect, Accept on the (emulated) Entra consent page, the broker's page."""
    step(f"onboarding fabrikam: an admin caller asks for an invite (POST /v1/tenants/{tenant}/invite)")
    invite = requests.post(
        f"{replica.url}/v1/tenants/{tenant}/invite",
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=30,
    )
    invite.raise_for_status()
    link = invite.json()
    expires = link["expires_at"]
    print(f"   HTTP {invite.status_code}: a link for fabrikam's Global Administrator (expires {expires}):")
    print(f"   {link['url'][:100]}...")

    step("the administrator opens it: the broker redirects to Entra's admin-consent page")
    start = requests.get(link["url"], allow_redirects=False, timeout=30)
    consent_url = start.headers["Location"]
    print(f"   HTTP {start.status_code} -> {consent_url.split('?')[0]}")
    with emulator.http_session() as entra:
        page = entra.get(consent_url, timeout=30)
        roles = re.findall(r"<li>([A-Za-z.]+) <span", page.text)
        print(f"   Entra shows: Permissions requested: {', '.join(roles)}")
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text))
        form = {name: html.unescape(value) for name, value in fields.items()} | {"action": "accept"}
        accepted = entra.post(page.url, data=form, allow_redirects=False, timeout=30)

    step("...and clicks Accept: Entra redirects back; the broker proves consent with a fresh token")
    callback = accepted.headers["Location"]
    print(
        f"   HTTP {accepted.status_code} -> {callback.split('?')[0]}?admin_consent=True&tenant=...&state=..."
    )
    result = requests.get(callback, timeout=120)
    heading = re.search(r'<h1 id="heading">([^<]+)</h1>', result.text)
    granted = re.findall(r"<li>([^<]+)</li>", result.text)
    print(f"   HTTP {result.status_code}, the page says: {heading.group(1) if heading else '?'}")
    print(f"   permissions granted: {', '.join(granted)}")


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
        admin_key, admin_hash = new_api_key()
        env = broker_environment(emulator)
        callers = {
            "demo": DEMO_WORLD.caller(key_hash),
            "onboarding": {**DEMO_WORLD.caller(admin_hash), "admin": True},
        }
        # Onboarding: customers' browsers reach replica-1's pages (http is allowed on loopback only);
        # the key signing invites lives in the vault; the callback is registered on the app.
        public_port = free_port()
        public_base_url = f"http://127.0.0.1:{public_port}"
        emulator.set_secret("broker-consent-key", base64.b64encode(os.urandom(32)).decode())
        emulator.add_redirect_uri(DEFENDER_CLIENT_ID, f"{public_base_url}/consent/callback")
        config = broker_config(
            emulator,
            DEMO_WORLD,
            callers,
            redis_url=redis.url,
            public_base_url=public_base_url,
            consent_signing_key={"secret": "broker-consent-key"},
        )
        config["apps"][DEMO_WORLD.app.name]["required_roles"] = {DEFENDER_XDR: list(XDR_ROLES)}
        for name, port in (("replica-1", public_port), ("replica-2", None)):
            replicas.append(BrokerProcess(work, config, env, name, port=port))
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

        onboard(emulator, replicas[0], admin_key, FABRIKAM_TENANT_ID)

        step("replica-2: fabrikam now gets tokens (the remembered consent_required was forgotten)")
        fabrikam = show(ask(replicas[1], FABRIKAM_TENANT_ID))
        print(f"   tenant_id={fabrikam.get('tenant_id')}, roles={fabrikam.get('roles')}")

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
        print(f"OK: fabrikam ({FABRIKAM_TENANT_ID}) onboarded through one invite link.")
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
