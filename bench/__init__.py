"""token-broker's benchmark suite (``make bench`` / ``python -m bench``); not part of the test suite.

See ``bench/README.md``: it measures the performance targets (README.md, *Performance*) as ratios
taken in one run on one machine (cache-hit path against a bare aiohttp baseline, CPU per request,
memory per cached tenant and under a flood of nonexistent tenants, the cold path with and without
Redis, the cold herd across three replicas, flat lookup with 10 vs N cached tenants).
"""
