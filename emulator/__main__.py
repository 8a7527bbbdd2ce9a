"""Run the Entra ID + Key Vault emulator: ``python -m emulator [options]``.

Options:

``--port N``
    Port to listen on (default 0: pick a free one; the ready file says which).
``--host ADDR``
    Address to bind (default 127.0.0.1). The control API answers loopback callers only.
``--san NAME``
    Extra DNS name / IP for the server certificate (repeatable), e.g. a compose service name.
``--state-dir DIR``
    Where ``ca.pem`` and the ready file ``emulator.json`` go (default: a new temporary directory,
    never the repository). ``emulator.json`` = ``{"base_url", "vault_url", "ca_path", "pid",
    "vault_tenant_id", "broker_client_id"}``, written atomically once the server accepts
    connections and removed on exit.
``--demo``
    Seed the demo world: tenants contoso (``contoso.onmicrosoft.com``) and fabrikam, the
    Defender app ``11111111-2222-3333-4444-555555555555`` consented in contoso with Defender roles,
    its client secret in the vault as ``defender-app-secret`` and a cache key for the broker as
    ``broker-cache-key``. See ``emulator.world.DEMO_WORLD``.

The broker's own Key Vault identity always exists: tenant ``world.VAULT_TENANT_ID``, client
``world.BROKER_CLIENT_ID``, secret ``world.BROKER_CLIENT_SECRET`` (a fake value). SIGTERM or
SIGINT stops the server cleanly.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from .server import run


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until signalled."""
    parser = argparse.ArgumentParser(
        prog="python -m emulator",
        description="Local TLS emulator of Microsoft Entra ID and Azure Key Vault.",
    )
    parser.add_argument("--port", type=int, default=0, help="listen port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--san", action="append", default=[], help="extra certificate name (repeatable)")
    parser.add_argument("--state-dir", type=Path, help="directory for ca.pem and emulator.json")
    parser.add_argument("--demo", action="store_true", help="seed the demo world (emulator.world.DEMO_WORLD)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    state_dir: Path = args.state_dir or Path(tempfile.mkdtemp(prefix="entra-kv-emulator-"))
    run(host=args.host, port=args.port, state_dir=state_dir, demo=args.demo, extra_names=args.san)


if __name__ == "__main__":
    main()
