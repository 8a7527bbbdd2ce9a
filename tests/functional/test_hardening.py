"""What only a running broker can show: connection limits and timeouts, the per-caller budget over
HTTP, readiness that tells the truth, a degraded start, and an Entra that cannot be reached."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import requests

from tests.functional.conftest import DEFENDER, TENANT_A, TENANT_B, TENANT_C, World, ask
from tests.support import BrokerProcess, free_port

StartBroker = Callable[..., BrokerProcess]


def _connect(broker: BrokerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", broker.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading whatever it sends first)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def test_a_connection_that_never_finishes_its_headers_is_closed(
    world: World, start_broker: StartBroker
) -> None:
    """A client that sends half a request line and stalls (slowloris) is cut off after
    keepalive_seconds, instead of being held for aiohttp's default hour."""
    broker = start_broker(world.broker_config(keepalive_seconds=1), world.env)
    with _connect(broker) as sock:
        sock.sendall(b"POST /v1/token HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(sock, 6)


def test_a_body_that_trickles_in_is_answered_408(world: World, start_broker: StartBroker) -> None:
    """Headers promise 100 bytes, 10 arrive, then nothing: 408 invalid_request after
    body_timeout_seconds, audited, and the connection is not held."""
    broker = start_broker(world.broker_config(body_timeout_seconds=1), world.env)
    with _connect(broker) as sock:
        sock.sendall(
            b"POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + world.soar_key.encode() + b"\r\nContent-Length: 100\r\n\r\n"
            b'{"tenant":'
        )
        sock.settimeout(6)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"invalid_request"' in answer
    assert ["invalid_request"] == [line["outcome"] for line in broker.audit_lines()]


def test_connections_beyond_the_cap_are_refused_with_503(world: World, start_broker: StartBroker) -> None:
    """With max_connections 2, of four idle connections opened one after another at most two are
    held open and the others are answered 503 and closed (and counted); once they close, requests
    are served again."""
    broker = start_broker(world.broker_config(max_connections=2), world.env)
    opened = [_connect(broker) for _ in range(4)]
    answers = []
    try:
        for sock in opened:
            sock.settimeout(3)  # a refusal is written at once; generous for a loaded machine
            try:
                answers.append(sock.recv(4096))
            except TimeoutError:
                answers.append(b"")  # held open, waiting for a request
    finally:
        for sock in opened:
            sock.close()
    held = [answer for answer in answers if not answer]
    refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503")]
    assert len(held) <= 2, answers
    assert 4 == len(held) + len(refused), answers
    deadline = time.monotonic() + 10
    while True:
        try:
            if requests.get(f"{broker.url}/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # ≥: a health probe above may itself have been refused while the closed sockets were let go.
    assert len(refused) <= broker.metric("broker_refused_connections_total")


def test_the_acquisition_budget_over_http(world: World, start_broker: StartBroker) -> None:
    """One acquisition a minute: the second new tenant is 429 rate_limited with Retry-After, audited
    and counted, without an Entra request; the cached tenant keeps being served."""
    config = world.broker_config()
    config["callers"]["soar"]["max_acquisitions_per_minute"] = 1
    broker = start_broker(config, world.env)
    world.emulator.reset_counters()
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).status_code
    refused = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
    assert 429 == refused.status_code
    assert "rate_limited" == refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).status_code
    assert 0 == world.emulator.token_requests(tenant=TENANT_B)
    assert ["ok", "rate_limited", "ok"] == [line["outcome"] for line in broker.audit_lines()]
    assert 1 == broker.metric("broker_rate_limited_total")


def test_readiness_is_503_only_when_no_credential_ever_loaded_and_names_no_source(
    world: World, start_broker: StartBroker
) -> None:
    """An app credential from an unset environment variable: the broker starts, /readyz is 503
    not_ready (it cannot issue anything), and neither it nor /healthz names the variable."""
    config = world.broker_config()
    config["apps"]["defender"]["credential"] = {"env": "HARDENING_TEST_UNSET_VARIABLE"}
    broker = start_broker(config, world.env)
    ready = requests.get(f"{broker.url}/readyz", timeout=5)
    assert 503 == ready.status_code
    assert "not_ready" == ready.json()["status"]
    assert ["defender"] == ready.json()["checks"]["credentials"]["not_loaded"]
    assert "HARDENING_TEST_UNSET_VARIABLE" not in ready.text
    assert "HARDENING_TEST_UNSET_VARIABLE" in broker.log_text()


def test_a_cache_key_that_cannot_load_at_start_means_l1_until_it_loads(
    world: World, start_broker: StartBroker, redis_url: str, redis_server: object
) -> None:
    """Key Vault refuses the cache key at start: the broker starts anyway (it exited 1 with a
    traceback before), serves from its own memory with /readyz naming Redis degraded, and uses
    Redis once the key loads."""
    config = world.broker_config(redis_url)
    config["apps"]["defender"]["credential"] = {"env": "HARDENING_APP_SECRET"}
    world.emulator.add_fault("vault", "503", count=-1)
    broker = start_broker(config, {**world.env, "HARDENING_APP_SECRET": world.app_secret})
    assert "Traceback" not in broker.log_text()
    ready = requests.get(f"{broker.url}/readyz", timeout=5).json()
    assert ("degraded", "degraded") == (ready["status"], ready["checks"]["redis"]["status"])
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).status_code
    world.emulator.clear_faults()
    deadline = time.monotonic() + 30
    while requests.get(f"{broker.url}/readyz", timeout=5).json()["checks"]["redis"]["status"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_C, "resource": DEFENDER}).status_code
    assert "cache key loaded: using the shared cache" in broker.log_text()


def test_an_unreachable_entra_is_named_in_the_answer_the_log_and_a_metric(
    world: World, start_broker: StartBroker
) -> None:
    """authority_host on a port nobody listens on: 503 whose description says the connection was
    refused (not just "kept failing"), the log names the cause, and the metric counts it by cause."""
    config = world.broker_config(authority_host=f"https://127.0.0.1:{free_port()}", upstream_retry_seconds=1)
    broker = start_broker(config, world.env)
    response = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    assert 503 == response.status_code
    assert "connection was refused" in response.json()["error_description"]
    assert '"cause":"connection_refused"' in broker.log_text()
    assert broker.metric_samples()['broker_upstream_unreachable_total{cause="connection_refused"}'] >= 1
