# The same commands CI runs (.ci/run calls `make test`).
#
# What each target installs, and no more: `run` needs only Python with pip (a .venv holding the service
# and its runtime dependencies; no root, no system packages); `install`, `lint`, `unit`, `test` and `demo`
# add the test tools (redis-server and promtool from Debian, which needs root when they are missing, and
# the [test] extras); `bench` adds its load generator (wrk).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP   := $(VENV)/.installed-run
TEST_STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
SYSTEM_DEPS := scripts/install-system-deps.sh

.PHONY: help venv install run test unit lint deploy-check bench demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP) $(SYSTEM_DEPS) tests/node/package-lock.json
	bash $(SYSTEM_DEPS) test
	$(BIN)/python -m pip install --quiet -e '.[test]'
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(BENCH_STAMP): $(TEST_STAMP) $(SYSTEM_DEPS)
	bash $(SYSTEM_DEPS) bench
	touch $@

venv: $(RUN_STAMP)  ## create .venv with the service and its runtime dependencies only (Python + pip)

install: $(TEST_STAMP)  ## .venv with the service and the test tools (redis-server, promtool, node/npm if missing; tests/node's npm packages)

run: $(RUN_STAMP)  ## run the service (BROKER_CONFIG or the embedded defaults; see README); needs only Python
	$(BIN)/token-broker serve

lint: $(TEST_STAMP)  ## ruff and mypy --strict
	$(BIN)/ruff check broker tests scripts bench emulator
	$(BIN)/ruff format --check broker tests scripts bench emulator
	$(BIN)/mypy

unit: $(TEST_STAMP)  ## the test suite only
	$(BIN)/python -m pytest -q

deploy-check: $(RUN_STAMP)  ## helm lint/template + kubernetes-validate, yamllint, hadolint
	bash deploy/validate.sh

bench: $(BENCH_STAMP)  ## benchmarks: cache-hit vs bare aiohttp, cold herd, flat lookup (bench/README.md)
	$(BIN)/python -m bench

demo: $(TEST_STAMP)  ## redis + emulator + two replicas on loopback: consent link, token, cache hit, metrics
	$(BIN)/python scripts/demo.py

test: lint deploy-check unit  ## everything CI checks: lint, deployment files, the whole suite

clean:  ## remove the virtualenv, tools and caches
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
