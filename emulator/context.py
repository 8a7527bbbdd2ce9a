"""Keys and helpers shared by the emulator's HTTP modules (kept apart to avoid import cycles).

Holds the typed ``aiohttp`` keys for the application state and the per-request log record, plus
:func:`base_url` (URLs the emulator hands out follow the address the client used, 127.0.0.1 or
localhost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiohttp import web

from .state import EmulatorState

STATE: Final = web.AppKey("emulator_state", EmulatorState)


@dataclass
class RequestInfo:
    """What the request log records about one request; handlers fill in what they learn."""

    endpoint: str
    raw_tenant: str | None
    tenant_id: str | None
    client_id: str | None = None
    resource: str | None = None
    credential: str | None = None  # how a token request authenticated (see RequestRecord)


REQUEST_INFO: Final = web.RequestKey("emulator_request_info", RequestInfo)


def base_url(request: web.Request) -> str:
    """The base URL as the client addressed us, e.g. ``https://127.0.0.1:8443``."""
    return f"{request.scheme}://{request.host}"
