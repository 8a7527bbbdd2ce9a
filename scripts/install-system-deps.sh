#!/usr/bin/env bash
# System packages, from Debian, by group:
#   test   redis-server (the tests start their own on a free port), promtool (from the prometheus
#          package: checks and unit-tests the alert rules), and node + npm (the drop-in tests run the
#          unmodified Node.js Azure SDK clients, installed from tests/node/package-lock.json), and
#          chromium + chromium-driver (the onboarding pages are tested in a real headless browser).
#          `make install` / `make test`.
#   bench  wrk (the benchmarks' load generator; without it they fall back to a slower asyncio client).
#          `make bench`.
# Running the service needs none of them (`make run` never calls this script).
#
# Usage: install-system-deps.sh GROUP...        install what is missing (as root; else say what to run)
#        install-system-deps.sh --list GROUP...  print the groups' Debian packages, install nothing
set -euo pipefail

# command:package pairs per group
packages_of() {
    case "$1" in
        test) echo "redis-server:redis-server promtool:prometheus node:nodejs npm:npm chromium:chromium chromedriver:chromium-driver" ;;
        bench) echo "wrk:wrk" ;;
        *) echo "unknown group: $1 (test, bench)" >&2; exit 2 ;;
    esac
}

list=0
if [ "${1:-}" = --list ]; then
    list=1
    shift
fi
[ $# -gt 0 ] || { echo "usage: $0 [--list] GROUP... (test, bench)" >&2; exit 2; }

missing=()
for group in "$@"; do
    for pair in $(packages_of "$group"); do
        if [ "$list" = 1 ]; then
            echo "${pair#*:}"
        elif ! command -v "${pair%%:*}" >/dev/null 2>&1; then
            missing+=("${pair#*:}")
        fi
    done
done
[ "$list" = 1 ] && exit 0
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
