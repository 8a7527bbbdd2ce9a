"""The baseline: a bare aiohttp app on uvloop that parses the same JSON request as ``POST /v1/token``
and answers a JSON body of exactly the broker's response size, with nothing else (no auth, no cache,
no logging, no metrics). ``python -m bench.baseline --port P --body-bytes N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop
from aiohttp import web

# Same shape as the broker's 200 body; access_token is padded so the whole body has the target size.
_TENANT_SAMPLE = "00000000-0000-4000-8000-000000000000"
_RESOURCE_SAMPLE = "https://api.security.microsoft.com"


def _dumps(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _template(token: str, tenant: str, resource: str) -> dict[str, object]:
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 3599,
        "expires_on": 1800000000,
        "tenant_id": tenant,
        "resource": resource,
        "roles": ["Incident.Read.All", "AdvancedHunting.Read.All"],
    }


def build_app(body_bytes: int) -> web.Application:
    pad = max(0, body_bytes - len(_dumps(_template("", _TENANT_SAMPLE, _RESOURCE_SAMPLE))))
    token = "x" * pad

    async def token_handler(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.Response(
            body=_dumps(_template(token, body["tenant"], body["resource"])),
            content_type="application/json",
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/token", token_handler)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int, body_bytes: int) -> None:
    runner = web.AppRunner(build_app(body_bytes), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.body_bytes))


if __name__ == "__main__":
    main()
