"""Serving the emulator: TLS material, the listening socket, the ready file, clean shutdown.

:func:`run` is what ``python -m emulator`` executes. It creates a throw-away trustme CA and a
server certificate for 127.0.0.1/localhost (plus any extra names), writes the CA to
``{state_dir}/ca.pem``, listens, and only then writes ``{state_dir}/emulator.json`` atomically (a
reader never sees a half-written file, and its existence means "accepting connections"). SIGTERM and
SIGINT stop it; the ready file is removed on the way out so a stale one is never trusted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import trustme
from aiohttp import web

from .app import build_app
from .state import EmulatorState
from .world import BROKER_CLIENT_ID, DEMO_WORLD, VAULT_TENANT_ID

READY_FILE: Final = "emulator.json"
CA_FILE: Final = "ca.pem"
DEFAULT_NAMES: Final = ("127.0.0.1", "localhost", "::1")


def make_server_tls(state_dir: Path, names: Sequence[str]) -> ssl.SSLContext:
    """Create a CA + server certificate; write the CA PEM; return the server's TLS context."""
    ca = trustme.CA(organization_name="Entra ID + Key Vault test emulator")
    leaf = ca.issue_cert(*names)
    ca.cert_pem.write_to_path(str(state_dir / CA_FILE))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    return context


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


async def serve(
    *,
    host: str,
    port: int,
    state_dir: Path,
    demo: bool,
    extra_names: Sequence[str] = (),
) -> None:
    """Serve until SIGTERM/SIGINT (``state_dir`` must exist)."""
    tls = make_server_tls(state_dir, [*DEFAULT_NAMES, *extra_names])
    state = EmulatorState()
    if demo:
        DEMO_WORLD.seed(state)
    # No access log: the control API's request log is the structured record, and an access
    # log line per request would only add noise to the test output.
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # binding ourselves makes --port 0 report the real port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = state_dir / READY_FILE
    try:
        await web.SockSite(runner, sock, ssl_context=tls).start()
        bound_port = sock.getsockname()[1]
        url_host = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host  # noqa: S104
        if ":" in url_host:
            url_host = f"[{url_host}]"
        base = f"https://{url_host}:{bound_port}"
        write_json_atomically(
            ready,
            {
                "base_url": base,
                "vault_url": base,
                "ca_path": str(state_dir / CA_FILE),
                "pid": os.getpid(),
                "vault_tenant_id": VAULT_TENANT_ID,
                "broker_client_id": BROKER_CLIENT_ID,
            },
        )
        print(f"emulator listening on {base} (ready file {ready})", flush=True)  # noqa: T201 - its console line
        await stop.wait()
    finally:
        ready.unlink(missing_ok=True)
        await runner.cleanup()
        sock.close()


def run(*, host: str, port: int, state_dir: Path, demo: bool, extra_names: Sequence[str] = ()) -> None:
    """Blocking entry point."""
    state_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(host=host, port=port, state_dir=state_dir, demo=demo, extra_names=extra_names))
