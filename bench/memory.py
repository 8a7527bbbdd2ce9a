"""``python -m bench.memory``: what a flood of requests for tenants that do not exist costs a replica.

A caller allowed ``tenants: ["*"]`` can ask for any GUID; each nonexistent one is an Entra refusal
(AADSTS90002) that the broker remembers briefly. The target: resident memory after 10,000 requests for
10,000 distinct nonexistent tenants stays within 10 MB of before (every per-key structure is bounded
and a remembered failure keeps its body fields, not the exception).

It starts the emulator and one broker process (in-process cache, as deployed otherwise; the caller's
acquisition budget lifted so every request reaches Entra), warms it with 500 such requests (imports,
pools, allocator arenas), reads its RSS, sends ``--requests`` more for fresh tenants (``--concurrency``
at a time), reads its RSS again, and prints both and the growth against the target. ``--smoke`` is a
tiny run whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from broker.callers import new_api_key
from emulator import Emulator, start_emulator
from emulator.stack import BrokerProcess
from emulator.world import BENCH_WORLD, DEFENDER_XDR, broker_config, broker_environment

TARGET_GROWTH_MB = 10.0
WARM_REQUESTS = 500
SMOKE_REQUESTS = 200
SMOKE_WARM_REQUESTS = 50


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` from /proc (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def missing_tenant(n: int) -> str:
    return f"{n:08x}-dead-4000-8000-{n:012x}"


async def flood(url: str, key: str, tenants: Sequence[str], concurrency: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    queue = list(tenants)
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while queue:
                tenant = queue.pop()
                body = {"tenant": tenant, "resource": DEFENDER_XDR}
                async with session.post(f"{url}/v1/token", json=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def measure(
    emulator: Emulator,
    workdir: Path,
    *,
    requests_total: int,
    warm_total: int = WARM_REQUESTS,
    concurrency: int = 16,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Start one broker on ``emulator`` (already seeded with ``BENCH_WORLD``), flood it as described
    above, stop it; the summary. ``on_start(pid)`` runs once the broker is up (``python -m bench``
    pins it there)."""
    key, key_hash = new_api_key()
    callers = {"flood": {**BENCH_WORLD.caller(key_hash), "max_acquisitions_per_minute": 100_000}}
    config: dict[str, Any] = broker_config(emulator, BENCH_WORLD, callers, log_level="WARNING")
    broker = BrokerProcess(workdir, config, broker_environment(emulator), "broker-memory")
    broker.start()
    try:
        assert broker.process is not None  # noqa: S101 - started above
        pid = broker.process.pid
        if on_start is not None:
            on_start(pid)
        warm = asyncio.run(
            flood(broker.url, key, [missing_tenant(n) for n in range(warm_total)], concurrency)
        )
        before = rss_mb(pid)
        started = time.monotonic()
        tenants = [missing_tenant(n) for n in range(warm_total, warm_total + requests_total)]
        statuses = asyncio.run(flood(broker.url, key, tenants, concurrency))
        seconds = time.monotonic() - started
        after = rss_mb(pid)
    finally:
        broker.stop()
    growth = after - before
    return {
        "requests": requests_total,
        "warm_requests": warm_total,
        "statuses": {str(k): v for k, v in (warm + statuses).items()},
        "all_unknown_tenant_404": set(statuses) <= {404} and set(warm) <= {404},
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "growth_mb": round(growth, 2),
        "target_mb": TARGET_GROWTH_MB,
        "seconds": round(seconds, 1),
        "met": growth <= TARGET_GROWTH_MB,
    }


def describe(summary: dict[str, Any]) -> str:
    """One line: the requests, the statuses, RSS before and after, the growth against the target."""
    return (
        f"{summary['requests']} requests for distinct nonexistent tenants in {summary['seconds']:.1f} s "
        f"(statuses {summary['statuses']}): RSS {summary['rss_before_mb']:.1f} MB → "
        f"{summary['rss_after_mb']:.1f} MB, growth {summary['growth_mb']:+.2f} MB "
        f"(target ≤ {TARGET_GROWTH_MB:.0f} MB: {'PASS' if summary['met'] else 'FAIL'})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="a few hundred requests (figures mean nothing)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="token-broker-bench-memory-") as work:
        emulator = start_emulator(Path(work) / "emulator")
        try:
            BENCH_WORLD.seed(emulator)
            summary = measure(
                emulator,
                Path(work),
                requests_total=SMOKE_REQUESTS if args.smoke else args.requests,
                warm_total=SMOKE_WARM_REQUESTS if args.smoke else WARM_REQUESTS,
                concurrency=args.concurrency,
            )
        finally:
            emulator.stop()
    print(describe(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0 if summary["all_unknown_tenant_404"] else 1


if __name__ == "__main__":
    sys.exit(main())
