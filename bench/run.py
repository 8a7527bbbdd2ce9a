"""``make bench`` / ``python -m bench`` (from the repository root): token-broker's performance targets,
measured as ratios in one run on this machine.

It starts, on loopback: a redis-server, the Entra ID + Key Vault emulator (the ``emulator`` package), two
broker processes configured as deployed (Redis + AES-GCM sealed shared cache, app secret in Key Vault,
INFO logging with one ``broker.audit`` JSON line per request written to a log file), one more with the
same configuration but no Redis, and the baseline (``bench/baseline.py``: a bare aiohttp app on uvloop).
With more than one CPU, the servers under test run pinned to the last CPU and everything else (wrk,
this script, redis, the emulator) to the others (``--no-pin``: nothing pinned). Then:

1. **cache-hit**: warms ``--tenants`` tenants through broker *L* (real Entra acquisitions from the
   emulator; its RSS before and after gives the memory per cached tenant) and 10 through broker *S*;
   drives ``POST /v1/token`` over the warmed tenants at ``--connections`` with wrk (or the asyncio
   fallback) for ``--duration`` seconds, against broker L, the baseline and broker S in turn,
   ``--rounds`` times (interleaved, order rotated each round); throughput and p99 ratios per round and
   each server's CPU time per request, as min / median / max over the rounds.
2. **flat lookup**: p50 of L (N cached) over p50 of S (10 cached), per round.
3. **tenant spelling**: ``--spelling-tenants`` more tenants, each with a verified domain, asked for
   on broker S one request at a time, half first by GUID and half first by domain (a domain costs
   Entra's discovery document too), then by the other spelling (one Entra token request per tenant
   in all); then, all cached, driven by domain and by GUID in interleaved rounds. Ratios: first
   request by domain / by GUID (p50), cached requests/s and p50 by domain / by GUID.
4. **cold path**: with the emulator answering token requests ``--cold-latency-ms`` late, the time to
   the first token of ``--cold-tenants`` never-requested tenants, one at a time, on broker S (Redis)
   and on the broker without Redis, minus that latency: what the broker adds on a miss.
5. **cold herd**: three more replicas sharing the Redis (started with L and S, idle until now);
   ``--herd-requests`` concurrent requests spread over ``--herd-tenants`` never-requested tenants;
   Entra token requests counted by the emulator and the wall time.
6. **memory growth**: ``bench.memory`` (one more broker, in-process cache) after ``--memory-requests``
   requests for distinct nonexistent tenants.

Prints a table with PASS/FAIL per target and writes a JSON summary (``--json``, default
``bench-results.json`` in the repository root). ``--smoke`` is a short run with tiny sizes, to keep
this script working from a test; its figures mean nothing. Exit status: 0 when every run worked
(every measured request answered 2xx, no upstream call during load, one Entra token request per
cold-path tenant), 1 otherwise; ``--check`` also fails on a missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench import loadgen, memory
from broker.callers import new_api_key
from emulator import Emulator, start_emulator
from emulator.stack import BrokerProcess, RedisServer, free_port
from emulator.world import BENCH_WORLD, DEFENDER_XDR, broker_config, broker_environment

ROOT = Path(__file__).resolve().parents[1]

URL_PATH = "/v1/token"
SMALL_SET = 10

TARGET_RPS_RATIO = 0.9
TARGET_P99_RATIO = 2.0
TARGET_FLAT_RATIO = 1.1
TARGET_SPELLING_RPS_RATIO = 0.9  # cached by domain is as fast as by GUID (within noise)
TARGET_BYTES_PER_TENANT = 8192  # resident memory per cached tenant (8 KB)
TARGET_GROWTH_MB = memory.TARGET_GROWTH_MB  # 10,000 requests for distinct nonexistent tenants

REDIS_ONLY_SETTINGS = ("redis_url", "cache_encryption_key")  # the cache key seals Redis entries only


def tenant_id(n: int, kind: int = 0) -> str:
    """Deterministic tenant GUIDs: kind 0 = warmed set, kind 1 = cold-herd set, kind 2 = spelling set,
    kind 3 = cold-path set."""
    return f"{n:08x}-{kind:04x}-4000-8000-{n:012x}"


def tenant_domain(n: int) -> str:
    """The verified domain of spelling-set tenant ``n``."""
    return f"bench-{n}.example.com"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the world in the emulator ------------------------------------------------------------------


@dataclass
class World:
    emulator: Emulator
    redis: RedisServer
    caller_key: str
    config: dict[str, Any]
    env: dict[str, str]
    warm_tenants: list[str]
    herd_tenants: list[str]
    spelled_tenants: list[tuple[str, str]]  # (GUID, domain)
    cold_tenants: list[str]

    @property
    def config_without_redis(self) -> dict[str, Any]:
        """The same broker configuration with the in-process cache only (no ``redis_url``)."""
        return {k: v for k, v in self.config.items() if k not in REDIS_ONLY_SETTINGS}


def build_world(
    emulator: Emulator,
    redis: RedisServer,
    n_warm: int,
    n_herd: int,
    n_spelled: int = 0,
    n_cold: int = 0,
    workers: int = 4,
) -> World:
    BENCH_WORLD.seed(emulator)
    warm = [tenant_id(i) for i in range(1, n_warm + 1)]
    herd = [tenant_id(i, 1) for i in range(1, n_herd + 1)]
    spelled = [(tenant_id(i, 2), tenant_domain(i)) for i in range(1, n_spelled + 1)]
    cold = [tenant_id(i, 3) for i in range(1, n_cold + 1)]
    domains = dict(spelled)
    local = threading.local()

    def add(tenant: str) -> None:
        handle = getattr(local, "emulator", None)
        if handle is None:
            handle = local.emulator = Emulator(emulator.base_url, emulator.ca_path)
        BENCH_WORLD.add_customer(handle, tenant, [domains[tenant]] if tenant in domains else [])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(add, warm + herd + [guid for guid, _ in spelled] + cold))
    key, key_hash = new_api_key()
    config = broker_config(
        emulator,
        BENCH_WORLD,
        # Warming makes one acquisition per tenant through this one caller: lift its per-minute budget
        # (default 120), which would otherwise answer most of the warm-up 429.
        {"bench": {**BENCH_WORLD.caller(key_hash), "max_acquisitions_per_minute": 100_000}},
        redis_url=redis.url,
        log_level="INFO",  # as deployed: one broker.audit JSON line per request, to a file
    )
    env = broker_environment(emulator)
    return World(emulator, redis, key, config, env, warm, herd, spelled, cold)


# --- pinning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Where processes run: the servers under test on ``servers``, everything else (the load generator,
    this script, redis, the emulator) on ``others``; nothing pinned when ``enabled`` is false."""

    enabled: bool
    servers: frozenset[int]
    others: frozenset[int]

    @classmethod
    def choose(cls, *, wanted: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not wanted or len(cpus) < 2:
            return cls(enabled=False, servers=frozenset(cpus), others=frozenset(cpus))
        return cls(enabled=True, servers=frozenset(cpus[-1:]), others=frozenset(cpus[:-1]))

    def describe(self) -> str:
        if not self.enabled:
            return "nothing pinned: load generator, servers, redis and emulator share the cores"
        return (
            f"servers under test (brokers, baseline) pinned to CPU {cpu_list(self.servers)}; load generator, "
            f"this script, redis and emulator to CPU {cpu_list(self.others)}"
        )

    def server(self, pid: int) -> None:
        if self.enabled:
            pin(pid, self.servers)

    def other(self, pid: int) -> None:
        if self.enabled:
            pin(pid, self.others)


def cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of ``pid`` (and so every thread it starts later) on ``cpus``."""
    for task in [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]:
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(task, cpus)


def start_brokers(
    workdir: Path, config: dict[str, Any], env: dict[str, str], names: Sequence[str], pinning: Pinning
) -> list[BrokerProcess]:
    """Start one broker per name, side by side on every CPU (imports are CPU-bound), then pin each one,
    every thread, to the server CPUs."""
    brokers = [BrokerProcess(workdir, config, env, name) for name in names]
    with ThreadPoolExecutor(len(brokers)) as pool:
        list(pool.map(lambda b: b.start(), brokers))
    for broker in brokers:
        assert broker.process is not None  # noqa: S101 - started above
        pinning.server(broker.process.pid)
    return brokers


class Baseline:
    """``python -m bench.baseline`` as a child process."""

    def __init__(self, body_bytes: int, pinning: Pinning) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.baseline",
                "--port",
                str(self.port),
                "--body-bytes",
                str(body_bytes),
            ],
            cwd=ROOT,
        )
        pinning.server(self.process.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"baseline exited with {self.process.returncode}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError("baseline not ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# --- HTTP helpers -------------------------------------------------------------------------------


async def _post_all(
    jobs: Sequence[tuple[str, str]], key: str, *, concurrency: int | None
) -> tuple[list[int], float]:
    """POST /v1/token for each (base_url, tenant); all at once when concurrency is None."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    semaphore = asyncio.Semaphore(concurrency or len(jobs) or 1)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(base_url: str, tenant: str) -> int:
            async with semaphore:
                body = json.dumps({"tenant": tenant, "resource": DEFENDER_XDR})
                async with session.post(f"{base_url}{URL_PATH}", data=body, headers=headers) as response:
                    await response.read()
                    return response.status

        started = time.perf_counter()
        statuses = await asyncio.gather(*(one(u, t) for u, t in jobs), return_exceptions=True)
        wall = time.perf_counter() - started
    return [s if isinstance(s, int) else -1 for s in statuses], wall


def post_all(
    jobs: Sequence[tuple[str, str]], key: str, *, concurrency: int | None
) -> tuple[list[int], float]:
    import uvloop

    return uvloop.run(_post_all(jobs, key, concurrency=concurrency))


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def metric_value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def l1_counts(broker: BrokerProcess) -> tuple[float, float]:
    text = broker.metrics_text()
    name = "broker_cache_lookups_total"
    return (
        metric_value(text, name, 'layer="l1",result="hit"'),
        metric_value(text, name, 'layer="l1",result="miss"'),
    )


def machine(pinning: Pinning) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "pinned": pinning.enabled,
        "server_cpus": sorted(pinning.servers),
        "other_cpus": sorted(pinning.others),
        "note": pinning.describe(),
    }


# --- measurement --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    tenants: list[str]
    pid: int
    script: Path | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)


def drive(target: Target, args: argparse.Namespace, key: str, seconds: float) -> dict[str, Any]:
    cpu_before = process_cpu_seconds(target.pid)
    if args.loadgen == "wrk":
        assert target.script is not None  # noqa: S101
        result = loadgen.run_wrk(
            target.script,
            target.url,
            connections=args.connections,
            threads=args.threads,
            seconds=seconds,
            url_path=URL_PATH,
            cpus=args.pinning.others if args.pinning.enabled else None,
        )
    else:
        result = loadgen.run_python(
            target.url,
            target.tenants,
            key,
            DEFENDER_XDR,
            URL_PATH,
            connections=args.connections,
            seconds=seconds,
        )
    cpu = process_cpu_seconds(target.pid) - cpu_before
    result["server_cpu_s"] = round(cpu, 3)
    result["server_cpu_us_per_request"] = round(cpu / max(1, result["requests"]) * 1e6, 1)
    return result


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """Minimum, median and maximum of ``values`` (over the rounds, or over the tenants of the cold path)."""
    return {
        "min": round(min(values), digits),
        "median": round(float(statistics.median(values)), digits),
        "max": round(max(values), digits),
    }


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds (and min / median / max of each figure under ``over_rounds``)."""
    keys = {"rps": 1, "p50_ms": 3, "p99_ms": 3, "server_cpu_us_per_request": 1}
    over_rounds = {key: spread([r[key] for r in runs], digits) for key, digits in keys.items()}
    return {
        **{key: figures["median"] for key, figures in over_rounds.items()},
        "over_rounds": over_rounds,
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }


def run_rounds(targets: Sequence[Target], args: argparse.Namespace, key: str) -> None:
    if args.warmup > 0:
        for target in targets:
            drive(target, args, key, args.warmup)
    for round_no in range(args.rounds):
        shift = round_no % len(targets)
        order = list(targets[shift:]) + list(targets[:shift])
        for target in order:
            result = drive(target, args, key, args.duration)
            result["round"] = round_no + 1
            target.runs.append(result)
            log(
                f"round {round_no + 1}/{args.rounds} {target.name:<9} rps={result['rps']:8.0f} "
                f"p50={result['p50_ms']:7.2f}ms p99={result['p99_ms']:7.2f}ms "
                f"cpu/req={result['server_cpu_us_per_request']:6.0f}us errors={result['errors']}"
            )


def side_by_side(pair: Sequence[Target], args: argparse.Namespace, key: str) -> dict[str, Any]:
    """Broker L and the baseline loaded at the same moment (one wrk each), sharing the server CPU: the
    scheduler gives each the same share of the same CPU at the same time, so the ratio of their
    requests/s follows their CPU costs per request whatever the machine's speed does between rounds
    (which interleaving only averages out). It reads lower than the interleaved ratio: the two also
    share that CPU's caches, and the broker's working set is the larger (bench/README.md). Reported
    beside the interleaved ratio, not a target."""
    seconds = max(1.0, args.duration / 2)
    ratios, errors = [], 0
    with ThreadPoolExecutor(len(pair)) as pool:
        for round_no in range(args.rounds):
            broker, base = pool.map(lambda target: drive(target, args, key, seconds), pair)
            errors += broker["errors"] + base["errors"]
            ratios.append(broker["rps"] / base["rps"] if base["rps"] else 0.0)
            log(
                f"side by side {round_no + 1}/{args.rounds}: broker rps={broker['rps']:8.0f} "
                f"baseline rps={base['rps']:8.0f} ratio={ratios[-1]:.3f}"
            )
    return {
        "rounds": args.rounds,
        "seconds": seconds,
        "rps_ratio": spread(ratios),
        "per_round": [round(r, 3) for r in ratios],
        "errors": errors,
    }


def cold_herd(world: World, herd: Sequence[BrokerProcess], n_requests: int) -> dict[str, Any]:
    """``herd``: replicas started with the others but never asked anything yet (empty L1)."""
    replicas = len(herd)
    app_id = BENCH_WORLD.app.client_id
    try:
        seen_before = {e["tenant_id"] for e in world.emulator.requests("token", client_id=app_id)} & set(
            world.herd_tenants
        )
        if seen_before:
            raise RuntimeError("cold-herd tenants were requested before the herd")
        jobs = [
            (herd[i % replicas].url, world.herd_tenants[i % len(world.herd_tenants)])
            for i in range(n_requests)
        ]
        statuses, wall = post_all(jobs, world.caller_key, concurrency=None)
        herd_set = set(world.herd_tenants)
        upstream = [
            e for e in world.emulator.requests("token", client_id=app_id) if e["tenant_id"] in herd_set
        ]
        ok = sum(1 for s in statuses if s == 200)
        return {
            "replicas": replicas,
            "requests": n_requests,
            "tenants": len(world.herd_tenants),
            "ok": ok,
            "failed": n_requests - ok,
            "statuses": sorted({str(s) for s in statuses}),
            "upstream_token_requests": len(upstream),
            "upstream_distinct_tenants": len({e["tenant_id"] for e in upstream}),
            "wall_s": round(wall, 3),
        }
    finally:
        for broker in herd:
            broker.stop()


def _timed_ms(session: requests.Session, url: str, key: str, tenant: str) -> float:
    started = time.perf_counter()
    response = session.post(
        f"{url}{URL_PATH}",
        json={"tenant": tenant, "resource": DEFENDER_XDR},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    took = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{tenant}: HTTP {response.status_code} {response.text[:200]}")
    return took


def tenant_spelling(
    world: World, broker: BrokerProcess, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """First requests by GUID and by domain (one at a time, alternating), the other spelling next, then
    cached requests by domain and by GUID in interleaved rounds, all on ``broker``."""
    assert broker.process is not None  # noqa: S101
    pairs = world.spelled_tenants
    guid_first, domain_first = pairs[0::2], pairs[1::2]
    first: dict[str, list[float]] = {"guid": [], "domain": []}
    second: dict[str, list[float]] = {"domain_after_guid": [], "guid_after_domain": []}
    with requests.Session() as session:
        _timed_ms(session, broker.url, world.caller_key, world.warm_tenants[0])  # connection up
        for (guid, _), (_, domain) in zip(guid_first, domain_first, strict=False):
            first["guid"].append(_timed_ms(session, broker.url, world.caller_key, guid))
            first["domain"].append(_timed_ms(session, broker.url, world.caller_key, domain))
        for _, domain in guid_first:
            second["domain_after_guid"].append(_timed_ms(session, broker.url, world.caller_key, domain))
        for guid, _ in domain_first:
            second["guid_after_domain"].append(_timed_ms(session, broker.url, world.caller_key, guid))
    app_id = BENCH_WORLD.app.client_id
    guids = {guid for guid, _ in pairs}
    upstream = [e for e in world.emulator.requests("token", client_id=app_id) if e["tenant_id"] in guids]
    targets = [
        Target("by-guid", broker.url, [guid for guid, _ in pairs], broker.process.pid),
        Target("by-domain", broker.url, [domain for _, domain in pairs], broker.process.pid),
    ]
    if args.loadgen == "wrk":
        for target in targets:
            target.script = loadgen.write_wrk_script(
                workdir / f"spelling-{target.name}.lua",
                target.tenants,
                world.caller_key,
                DEFENDER_XDR,
                URL_PATH,
            )
    misses_before = l1_counts(broker)[1]
    run_rounds(targets, args, world.caller_key)
    cached = {target.name: summarise(target.runs) for target in targets}
    return {
        "tenants": len(pairs),
        "first_request_ms": {k: round(statistics.median(v), 2) for k, v in first.items() if v},
        "other_spelling_ms": {k: round(statistics.median(v), 2) for k, v in second.items() if v},
        "upstream_token_requests": len(upstream),
        "cached": cached,
        "l1_misses_during_load": int(l1_counts(broker)[1] - misses_before),
    }


def cold_path(world: World, brokers: dict[str, BrokerProcess], latency_ms: float) -> dict[str, Any]:
    """Time to the first token for never-requested tenants, one request at a time, on each of
    ``brokers`` (by label; the tenants are split between them, asked alternately), while the emulator
    answers every token request ``latency_ms`` late; that latency subtracted is what the broker itself
    adds on a miss. Each of those requests must cost exactly one Entra token request."""
    app_id = BENCH_WORLD.app.client_id
    labels = list(brokers)
    share = {label: world.cold_tenants[i :: len(labels)] for i, label in enumerate(labels)}
    wanted = set(world.cold_tenants)
    if wanted & {e["tenant_id"] for e in world.emulator.requests("token", client_id=app_id)}:
        raise RuntimeError("cold-path tenants were requested before the cold path")
    first_ms: dict[str, list[float]] = {label: [] for label in labels}
    sessions = {label: requests.Session() for label in labels}
    try:
        for label in labels:  # connection up, on a tenant each broker has cached
            _timed_ms(sessions[label], brokers[label].url, world.caller_key, world.warm_tenants[0])
        world.emulator.add_fault("token", "latency", latency_seconds=latency_ms / 1000, count=-1)
        try:
            for i in range(min(len(v) for v in share.values())):
                order = labels[i % len(labels) :] + labels[: i % len(labels)]
                for label in order:
                    took = _timed_ms(sessions[label], brokers[label].url, world.caller_key, share[label][i])
                    first_ms[label].append(took)
        finally:
            world.emulator.clear_faults()
    finally:
        for session in sessions.values():
            session.close()
    token_requests = Counter(
        e["tenant_id"] for e in world.emulator.requests("token", client_id=app_id) if e["tenant_id"] in wanted
    )
    discovery = Counter(
        e["tenant_id"] for e in world.emulator.requests("discovery") if e["tenant_id"] in wanted
    )
    result: dict[str, Any] = {"entra_latency_ms": latency_ms}
    for label in labels:
        asked = share[label][: len(first_ms[label])]
        result[label] = {
            "broker": brokers[label].config_path.stem,
            "tenants": len(asked),
            "first_token_ms": spread(first_ms[label], 2),
            "broker_overhead_ms": spread([ms - latency_ms for ms in first_ms[label]], 2),
            "upstream_token_requests": sum(token_requests[t] for t in asked),
            "tenants_not_one_token_request": sum(1 for t in asked if token_requests[t] != 1),
            "discovery_requests": sum(discovery[t] for t in asked),
        }
    return result


def profile_broker(target: Target, args: argparse.Namespace, key: str, out_dir: Path) -> dict[str, Any]:
    """py-spy (if installed) samples broker L during one more (unreported) load run: top functions by
    own and inclusive samples, as a share of the samples where the broker's threads were busy. It pauses
    the process for each sample (complete stacks), so that run's throughput is lower."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    collapsed = out_dir / "broker-profile.txt"
    seconds = max(2, round(args.duration))
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(target.pid),
            "--duration",
            str(seconds + 1),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(collapsed),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    drive(target, args, key, seconds)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not collapsed.exists():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    return {"collapsed_stacks": str(collapsed), **summarise_profile(collapsed)}


_IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)", "Condition.wait (threading.py)")


def summarise_profile(path: Path, top: int = 40) -> dict[str, Any]:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames or frames[-1].startswith(_IDLE_LEAVES):
            continue  # an idle MSAL pool thread waiting for work: not CPU
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"function": f, "percent": round(100 * c / max(1, total), 1)} for f, c in rows]

    return {"samples": total, "top_self": ranked(own), "top_inclusive": ranked(inclusive)}


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (10)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported (5)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (64)")
    parser.add_argument("--threads", type=int, help="wrk threads (1 when pinned, else 2)")
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants warmed in broker L (10000)")
    parser.add_argument("--warm-concurrency", type=int, default=32, help="concurrent warming requests (32)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per target first (2)")
    parser.add_argument("--herd-requests", type=int, default=1000, help="cold-herd requests (1000)")
    parser.add_argument("--herd-tenants", type=int, default=100, help="cold-herd tenants (100)")
    parser.add_argument("--herd-replicas", type=int, default=3, help="cold-herd replicas (3)")
    parser.add_argument(
        "--spelling-tenants",
        type=int,
        default=40,
        help="tenants with a domain, first asked by GUID or domain (40)",
    )
    parser.add_argument(
        "--cold-tenants",
        type=int,
        default=20,
        help="never-requested tenants asked one at a time on each cold-path broker (20)",
    )
    parser.add_argument(
        "--cold-latency-ms",
        type=float,
        default=50.0,
        help="Entra token latency injected in the emulator for the cold path (50)",
    )
    parser.add_argument(
        "--memory-requests",
        type=int,
        default=10_000,
        help="requests for distinct nonexistent tenants in the memory-growth run (10000)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the servers under test and the load generator to separate CPUs",
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="wrk if installed, else a bounded asyncio client (auto)",
    )
    parser.add_argument("--profile", action="store_true", help="also sample broker L with py-spy")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "token-broker-bench-profile",
        help="where --profile writes the collapsed stacks",
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, tiny sizes: checks the script")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results.json", help="JSON summary path")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.rounds, args.warmup = 1.0, 1, 0.0
        args.tenants, args.herd_requests, args.herd_tenants = 20, 60, 6
        args.spelling_tenants, args.cold_tenants = 4, 3
        args.memory_requests = memory.SMOKE_REQUESTS
        args.connections = min(args.connections, 8)
    args.memory_warm_requests = memory.SMOKE_WARM_REQUESTS if args.smoke else memory.WARM_REQUESTS
    args.pinning = Pinning.choose(wanted=not args.no_pin)
    if args.threads is None:
        args.threads = 1 if args.pinning.enabled else 2
    if args.loadgen == "auto":
        args.loadgen = "wrk" if loadgen.wrk_available() else "python"
    if args.tenants < SMALL_SET:
        parser.error(f"--tenants must be at least {SMALL_SET}")
    if args.spelling_tenants < 2 or args.spelling_tenants % 2:
        parser.error("--spelling-tenants must be even and at least 2 (half first by GUID, half by domain)")
    if args.cold_tenants < 1 or args.memory_requests < 1:
        parser.error("--cold-tenants and --memory-requests must be at least 1")
    return args


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="token-broker-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    pinning: Pinning = args.pinning
    info = machine(pinning)
    log(f"{info['nproc']} CPUs ({info['cpu_model']}), load generator: {args.loadgen}; {pinning.describe()}")
    stack = contextlib.ExitStack()
    with workspace(args.keep) as work, stack:
        redis = RedisServer(work)
        redis.start()
        stack.callback(redis.stop)
        assert redis.process is not None  # noqa: S101 - started above
        pinning.other(redis.process.pid)
        emulator = start_emulator(work / "emulator", timeout=30)
        stack.callback(emulator.stop)
        assert emulator.process is not None  # noqa: S101 - started by start_emulator
        pinning.other(emulator.process.pid)
        t0 = time.monotonic()
        world = build_world(
            emulator, redis, args.tenants, args.herd_tenants, args.spelling_tenants, 2 * args.cold_tenants
        )
        timings: dict[str, float] = {"emulator_setup_s": round(time.monotonic() - t0, 2)}
        log(
            f"emulator: {args.tenants} + {args.herd_tenants} + {args.spelling_tenants} + "
            f"{2 * args.cold_tenants} tenants in {timings['emulator_setup_s']} s"
        )

        # The herd replicas and the cold-path broker without Redis start now too (in parallel, to save
        # time); the herd replicas stay idle until the herd.
        big, small, *herd_brokers = start_brokers(
            work,
            world.config,
            world.env,
            ["broker-L", "broker-S"] + [f"herd-{i + 1}" for i in range(args.herd_replicas)],
            pinning,
        )
        (no_redis,) = start_brokers(work, world.config_without_redis, world.env, ["broker-no-redis"], pinning)
        for broker in (big, small, *herd_brokers, no_redis):
            stack.callback(broker.stop)
        # This script (the python load generator, the warming, herd and cold-path client) and what it
        # starts from now on (wrk, the baseline until it is pinned) off the server CPUs.
        pinning.other(os.getpid())
        assert big.process is not None  # noqa: S101
        assert small.process is not None  # noqa: S101
        t0 = time.monotonic()
        rss_before = memory.rss_mb(big.process.pid)
        statuses, _ = post_all(
            [(big.url, t) for t in world.warm_tenants], world.caller_key, concurrency=args.warm_concurrency
        )
        rss_after = memory.rss_mb(big.process.pid)
        for broker in (small, no_redis):
            statuses += post_all(
                [(broker.url, t) for t in world.warm_tenants[:SMALL_SET]],
                world.caller_key,
                concurrency=args.warm_concurrency,
            )[0]
        timings["warm_s"] = round(time.monotonic() - t0, 2)
        if any(s != 200 for s in statuses):
            raise RuntimeError(f"warming failed: statuses {sorted(set(statuses))} (see {work})")
        upstream_warm = emulator.counters()["token"]
        per_tenant = {
            "tenants": args.tenants,
            "rss_before_mb": round(rss_before, 1),
            "rss_after_mb": round(rss_after, 1),
            "bytes_per_tenant": round((rss_after - rss_before) * 1024 * 1024 / args.tenants),
            "target_bytes": TARGET_BYTES_PER_TENANT,
        }
        log(
            f"warmed {args.tenants} tenants in broker L and {SMALL_SET} in broker S and the broker without "
            f"Redis in {timings['warm_s']} s; broker L RSS {rss_before:.1f} MB → {rss_after:.1f} MB"
        )

        sample = requests.post(
            f"{big.url}{URL_PATH}",
            json={"tenant": world.warm_tenants[0], "resource": DEFENDER_XDR},
            headers={"Authorization": f"Bearer {world.caller_key}"},
            timeout=10,
        )
        body_bytes = len(sample.content)
        baseline = Baseline(body_bytes, pinning)
        stack.callback(baseline.stop)
        baseline_bytes = len(
            requests.post(
                f"{baseline.url}{URL_PATH}",
                json={"tenant": world.warm_tenants[0], "resource": DEFENDER_XDR},
                timeout=10,
            ).content
        )

        targets = [
            Target("broker", big.url, world.warm_tenants, big.process.pid),
            Target("baseline", baseline.url, world.warm_tenants, baseline.process.pid),
            Target(f"broker-{SMALL_SET}", small.url, world.warm_tenants[:SMALL_SET], small.process.pid),
        ]
        if args.loadgen == "wrk":
            targets[0].script = targets[1].script = loadgen.write_wrk_script(
                work / "tenants-all.lua", world.warm_tenants, world.caller_key, DEFENDER_XDR, URL_PATH
            )
            targets[2].script = loadgen.write_wrk_script(
                work / f"tenants-{SMALL_SET}.lua",
                targets[2].tenants,
                world.caller_key,
                DEFENDER_XDR,
                URL_PATH,
            )
        l1_before = [l1_counts(big), l1_counts(small)]
        t0 = time.monotonic()
        run_rounds(targets, args, world.caller_key)
        timings["load_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        together = side_by_side(targets[:2], args, world.caller_key)
        timings["side_by_side_s"] = round(time.monotonic() - t0, 2)
        l1_after = [l1_counts(big), l1_counts(small)]
        upstream_during_load = emulator.counters()["token"] - upstream_warm
        l1_misses_during_load = sum(a[1] - b[1] for a, b in zip(l1_after, l1_before, strict=True))
        l1_hits_during_load = sum(a[0] - b[0] for a, b in zip(l1_after, l1_before, strict=True))

        profile: dict[str, Any] = {"skipped": "run with --profile"}
        if args.profile:
            profile = profile_broker(targets[0], args, world.caller_key, args.profile_dir)
        t0 = time.monotonic()
        spelling = tenant_spelling(world, small, args, work)
        timings["spelling_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        cold = cold_path(world, {"with_redis": small, "without_redis": no_redis}, args.cold_latency_ms)
        timings["cold_path_s"] = round(time.monotonic() - t0, 2)
        baseline.stop()  # stop() is idempotent: the exit stack calls them again harmlessly
        big.stop()
        small.stop()
        no_redis.stop()
        audit_lines = sum(1 for line in big.log_path.open("rb") if b'"broker.audit"' in line)
        log_bytes = big.log_path.stat().st_size

        t0 = time.monotonic()
        herd = cold_herd(world, herd_brokers, args.herd_requests)
        timings["herd_s"] = round(time.monotonic() - t0, 2)

        t0 = time.monotonic()
        growth = memory.measure(
            emulator,
            work,
            requests_total=args.memory_requests,
            warm_total=args.memory_warm_requests,
            on_start=pinning.server,
        )
        timings["memory_growth_s"] = round(time.monotonic() - t0, 2)
        log(memory.describe(growth))

        timings["total_s"] = round(time.monotonic() - began, 1)
        results = report(
            args,
            info,
            targets,
            {
                "herd": herd,
                "spelling": spelling,
                "cold_path": cold,
                "memory": {"per_cached_tenant": per_tenant, "growth_nonexistent_tenants": growth},
                "profile": profile,
                "side_by_side": together,
            },
            timings,
            body_bytes,
            baseline_bytes,
            {
                "upstream_token_requests_during_load": upstream_during_load,
                "l1_hits_during_load": int(l1_hits_during_load),
                "l1_misses_during_load": int(l1_misses_during_load),
                "broker_L_audit_lines": audit_lines,
                "broker_L_log_bytes": log_bytes,
            },
        )
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"JSON summary: {args.json}")
    if not results["valid"]:
        log("INVALID RUN: " + "; ".join(results["problems"]))
        return 1
    if args.check and not all(t["pass"] for t in results["targets"].values()):
        return 1
    return 0


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    targets: Sequence[Target],
    parts: dict[str, Any],
    timings: dict[str, float],
    body_bytes: int,
    baseline_bytes: int,
    checks: dict[str, Any],
) -> dict[str, Any]:
    """The JSON summary; prints the table (min / median / max over the rounds, verdicts on medians)."""
    herd, spelling, cold, profile = parts["herd"], parts["spelling"], parts["cold_path"], parts["profile"]
    together = parts["side_by_side"]
    per_tenant = parts["memory"]["per_cached_tenant"]
    growth = parts["memory"]["growth_nonexistent_tenants"]
    broker, base, small = (summarise(t.runs) for t in targets)
    rounds = list(zip(targets[0].runs, targets[1].runs, targets[2].runs, strict=True))
    rps_ratios = spread([b["rps"] / x["rps"] if x["rps"] else 0.0 for b, x, _ in rounds])
    p99_ratios = spread([b["p99_ms"] / x["p99_ms"] if x["p99_ms"] else float("inf") for b, x, _ in rounds])
    # The same ratio for broker S (10 cached tenants): what serving 10,000 different tokens costs.
    small_rps_ratios = spread([s["rps"] / x["rps"] if x["rps"] else 0.0 for _, x, s in rounds])
    flat_ratios = spread([b["p50_ms"] / s["p50_ms"] if s["p50_ms"] else float("inf") for b, _, s in rounds])
    by_guid, by_domain = spelling["cached"]["by-guid"], spelling["cached"]["by-domain"]
    spelling_rps_ratio = by_domain["rps"] / by_guid["rps"] if by_guid["rps"] else 0.0
    spelling_p50_ratio = by_domain["p50_ms"] / by_guid["p50_ms"] if by_guid["p50_ms"] else float("inf")
    first_ms = spelling["first_request_ms"]
    first_ratio = first_ms["domain"] / first_ms["guid"] if first_ms.get("guid") else float("inf")
    spelling["ratios"] = {
        "first_request_p50_domain_over_guid": round(first_ratio, 3),
        "cached_rps_domain_over_guid": round(spelling_rps_ratio, 3),
        "cached_p50_domain_over_guid": round(spelling_p50_ratio, 3),
    }
    paired = [
        {
            "round": b["round"],
            "rps_ratio": round(b["rps"] / x["rps"], 3),
            "p99_ratio": round(b["p99_ms"] / x["p99_ms"], 3),
            "flat_ratio": round(b["p50_ms"] / s["p50_ms"], 3),
        }
        for b, x, s in rounds
    ]
    target_results = {
        "throughput_ratio": {
            "value": rps_ratios["median"],
            "target": f">= {TARGET_RPS_RATIO}",
            "pass": rps_ratios["median"] >= TARGET_RPS_RATIO,
        },
        "p99_ratio": {
            "value": p99_ratios["median"],
            "target": f"<= {TARGET_P99_RATIO}",
            "pass": p99_ratios["median"] <= TARGET_P99_RATIO,
        },
        "flat_lookup_ratio": {
            "value": flat_ratios["median"],
            "target": f"<= {TARGET_FLAT_RATIO}",
            "pass": flat_ratios["median"] <= TARGET_FLAT_RATIO,
        },
        "memory_per_cached_tenant_bytes": {
            "value": per_tenant["bytes_per_tenant"],
            "target": f"<= {TARGET_BYTES_PER_TENANT}",
            "pass": per_tenant["bytes_per_tenant"] <= TARGET_BYTES_PER_TENANT,
        },
        "memory_growth_nonexistent_tenants_mb": {
            "value": growth["growth_mb"],
            "target": f"<= {TARGET_GROWTH_MB:g}",
            "pass": bool(growth["met"]),
        },
        "cold_herd_upstream": {
            "value": herd["upstream_token_requests"],
            "target": f"== {herd['tenants']}",
            "pass": herd["upstream_token_requests"] == herd["tenants"],
        },
        "spelling_cached_rps_ratio": {
            "value": round(spelling_rps_ratio, 3),
            "target": f">= {TARGET_SPELLING_RPS_RATIO}",
            "pass": spelling_rps_ratio >= TARGET_SPELLING_RPS_RATIO,
        },
        "spelling_upstream": {
            "value": spelling["upstream_token_requests"],
            "target": f"== {spelling['tenants']}",
            "pass": spelling["upstream_token_requests"] == spelling["tenants"],
        },
    }
    problems = []
    if broker["errors"] or base["errors"] or small["errors"] or together["errors"]:
        problems.append("non-2xx or socket errors during load")
    if checks["upstream_token_requests_during_load"] or checks["l1_misses_during_load"]:
        problems.append("load runs were not all L1 cache hits")
    if herd["failed"]:
        problems.append(f"cold herd: {herd['failed']} requests failed ({herd['statuses']})")
    if by_guid["errors"] or by_domain["errors"] or spelling["l1_misses_during_load"]:
        problems.append("tenant spelling: errors or L1 misses during the cached runs")
    problems.extend(
        f"cold path {label}: a first request did not cost exactly one Entra token request"
        for label in ("with_redis", "without_redis")
        if cold[label]["tenants_not_one_token_request"]
    )
    if not growth["all_unknown_tenant_404"]:
        problems.append(f"memory growth: not every answer was 404 ({growth['statuses']})")
    results = {
        "machine": info,
        "settings": {
            "loadgen": args.loadgen,
            "connections": args.connections,
            "threads": args.threads,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "tenants": args.tenants,
            "small_set": SMALL_SET,
            "cold_tenants": args.cold_tenants,
            "cold_latency_ms": args.cold_latency_ms,
            "memory_requests": args.memory_requests,
            "pinned": args.pinning.enabled,
            "smoke": args.smoke,
            "broker": "1 process per target, redis_url configured (hits served from L1), "
            "log_level INFO, audit JSON lines to a log file",
            "response_bytes": {"broker": body_bytes, "baseline": baseline_bytes},
        },
        "cache_hit": {
            "throughput_ratio": rps_ratios,
            "p99_ratio": p99_ratios,
            "cpu_us_per_request": {
                "broker": broker["over_rounds"]["server_cpu_us_per_request"],
                "baseline": base["over_rounds"]["server_cpu_us_per_request"],
            },
            "broker": broker,
            "baseline": base,
            "paired_round_ratios": paired,
            "side_by_side": together,
            f"throughput_ratio_broker_{SMALL_SET}_tenants": small_rps_ratios,
        },
        "flat_lookup": {
            "ratio": flat_ratios,
            f"broker_{SMALL_SET}_tenants": small,
            f"broker_{args.tenants}_tenants": broker,
        },
        "memory": parts["memory"],
        "cold_path": cold,
        "cold_herd": herd,
        "tenant_spelling": spelling,
        "targets": target_results,
        "checks": checks,
        "timings": timings,
        "profile": profile,
        "runs": {t.name: t.runs for t in targets},
        "valid": not problems,
        "problems": problems,
    }

    def verdict(name: str) -> str:
        return "PASS" if target_results[name]["pass"] else "FAIL"

    def row(label: str, figures: dict[str, float], fmt: str, target: str = "", name: str = "") -> list[str]:
        return [
            label,
            *(format(figures[k], fmt) for k in ("min", "median", "max")),
            target,
            verdict(name) if name else "",
        ]

    def single(label: str, value: float, fmt: str, target: str = "", name: str = "") -> list[str]:
        return [label, "", format(value, fmt), "", target, verdict(name) if name else ""]

    with_redis, without_redis = cold["with_redis"], cold["without_redis"]
    rows = [
        ["measure", "min", "median", "max", "target", "verdict"],
        row(
            "cache-hit rps, broker / baseline",
            rps_ratios,
            ".2f",
            f">= {TARGET_RPS_RATIO}",
            "throughput_ratio",
        ),
        row("cache-hit p99, broker / baseline", p99_ratios, ".2f", f"<= {TARGET_P99_RATIO:g}", "p99_ratio"),
        row("  broker rps", broker["over_rounds"]["rps"], ".0f"),
        row("  baseline rps", base["over_rounds"]["rps"], ".0f"),
        row("  broker p99 ms", broker["over_rounds"]["p99_ms"], ".2f"),
        row("  baseline p99 ms", base["over_rounds"]["p99_ms"], ".2f"),
        row("  broker CPU us/request", broker["over_rounds"]["server_cpu_us_per_request"], ".0f"),
        row("  baseline CPU us/request", base["over_rounds"]["server_cpu_us_per_request"], ".0f"),
        row("  rps ratio, side by side on one CPU", together["rps_ratio"], ".2f", "reported"),
        row(f"  rps ratio, broker {SMALL_SET} tenants / baseline", small_rps_ratios, ".2f", "reported"),
        row(
            f"flat lookup p50, {args.tenants} / {SMALL_SET} tenants",
            flat_ratios,
            ".2f",
            f"<= {TARGET_FLAT_RATIO}",
            "flat_lookup_ratio",
        ),
        single(
            "memory per cached tenant, KB",
            per_tenant["bytes_per_tenant"] / 1024,
            ".2f",
            f"<= {TARGET_BYTES_PER_TENANT // 1024}",
            "memory_per_cached_tenant_bytes",
        ),
        single(
            f"memory growth, {growth['requests']} nonexistent, MB",
            growth["growth_mb"],
            "+.2f",
            f"<= {TARGET_GROWTH_MB:g}",
            "memory_growth_nonexistent_tenants_mb",
        ),
        row("cold path overhead ms, with Redis", with_redis["broker_overhead_ms"], ".2f", "reported"),
        row("cold path overhead ms, without Redis", without_redis["broker_overhead_ms"], ".2f", "reported"),
        single(
            "cold herd Entra token requests",
            herd["upstream_token_requests"],
            "d",
            f"== {herd['tenants']}",
            "cold_herd_upstream",
        ),
        single(
            "cached rps by domain / by GUID",
            spelling_rps_ratio,
            ".2f",
            f">= {TARGET_SPELLING_RPS_RATIO}",
            "spelling_cached_rps_ratio",
        ),
        single(
            "spelling Entra token requests",
            spelling["upstream_token_requests"],
            "d",
            f"== {spelling['tenants']}",
            "spelling_upstream",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}; load generator {args.loadgen} "
        f"-c{args.connections}"
        + (f" -t{args.threads}" if args.loadgen == "wrk" else "")
        + f", {args.rounds} x {args.duration:g}s interleaved (min / median / max over the rounds; "
        "verdicts on the median)"
    )
    print(f"pinning: {info['note']}")
    print(
        f"broker: one process, Redis configured (hits from L1), INFO audit log to a file; "
        f"bodies {body_bytes} B (baseline {baseline_bytes} B)"
    )
    print()
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i in (0, 4) else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    print()
    print(
        f"memory      broker L RSS {per_tenant['rss_before_mb']:.1f} MB before warming "
        f"{per_tenant['tenants']} tenants, {per_tenant['rss_after_mb']:.1f} MB after: "
        f"{per_tenant['bytes_per_tenant']} B/tenant; " + memory.describe(growth)
    )
    print(
        f"cold path   Entra latency {cold['entra_latency_ms']:g} ms subtracted; first token median "
        f"{with_redis['first_token_ms']['median']:.2f} ms with Redis ({with_redis['tenants']} tenants, "
        f"{with_redis['upstream_token_requests']} Entra token requests, "
        f"{with_redis['discovery_requests']} discovery), "
        f"{without_redis['first_token_ms']['median']:.2f} ms without ({without_redis['tenants']} tenants, "
        f"{without_redis['upstream_token_requests']} Entra token requests, "
        f"{without_redis['discovery_requests']} discovery)"
    )
    print(
        f"cold herd   {herd['replicas']} replicas, {herd['requests']} req, {herd['tenants']} tenants: "
        f"wall={herd['wall_s']:.2f}s, ok={herd['ok']}/{herd['requests']}"
    )
    other = spelling["other_spelling_ms"]
    print(
        f"spelling    {spelling['tenants']} tenants, first request p50: by GUID {first_ms['guid']:.2f}ms, "
        f"by domain {first_ms['domain']:.2f}ms, ratio={first_ratio:.2f}; the other spelling next: domain "
        f"{other['domain_after_guid']:.2f}ms, GUID {other['guid_after_domain']:.2f}ms; "
        f"cached by domain/GUID: rps {by_domain['rps']:.0f}/{by_guid['rps']:.0f}, "
        f"p50 {by_domain['p50_ms']:.2f}/{by_guid['p50_ms']:.2f}ms ratio={spelling_p50_ratio:.2f}"
    )
    print(
        f"checks      upstream during load={checks['upstream_token_requests_during_load']}, "
        f"L1 misses during load={checks['l1_misses_during_load']}, broker L audit lines="
        f"{checks['broker_L_audit_lines']} ({checks['broker_L_log_bytes'] / 1e6:.0f} MB)"
    )
    print(f"timings     {', '.join(f'{k}={v}' for k, v in timings.items())}")
    if profile.get("top_self"):
        print(
            "profile     top self: "
            + "; ".join(f"{r['percent']}% {r['function']}" for r in profile["top_self"][:8])
        )
    if args.smoke:
        print("(smoke mode: tiny sizes; the figures mean nothing)")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
