#!/usr/bin/env bash
# System packages the test suite needs, from Debian: redis-server (the tests start their own on a
# free port), promtool (from the prometheus package: checks and unit-tests the alert rules) and wrk
# (the benchmarks' load generator; the suite runs a smoke of them).
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # the benchmarks' load generator
command -v node >/dev/null 2>&1 || missing+=(nodejs)  # Node.js Azure SDK clients in the drop-in tests
command -v npm >/dev/null 2>&1 || missing+=(npm)      # installs them from tests/node/package-lock.json
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Install the binaries only: no package may start a service on this machine.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
