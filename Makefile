# The same commands CI runs (.ci/run calls `make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install run test unit lint deploy-check bench demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/install-system-deps.sh tests/node/package-lock.json
	bash scripts/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the service and test tools, tests/node's npm packages (and system deps if missing)

run: $(STAMP)  ## run the service (BROKER_CONFIG or the embedded defaults; see README)
	$(BIN)/token-broker serve

lint: $(STAMP)  ## ruff and mypy --strict
	$(BIN)/ruff check broker tests scripts bench
	$(BIN)/mypy

unit: $(STAMP)  ## the test suite only
	$(BIN)/python -m pytest -q

deploy-check: $(STAMP)  ## helm lint/template + kubernetes-validate, yamllint, hadolint
	bash deploy/validate.sh

bench: $(STAMP)  ## benchmarks: cache-hit vs bare aiohttp, cold herd, flat lookup (bench/README.md)
	$(BIN)/python -m bench

demo: $(STAMP)  ## redis + emulator + two replicas on loopback: consent link, token, cache hit, metrics
	$(BIN)/python scripts/demo.py

test: lint deploy-check unit  ## everything CI checks: lint, deployment files, the whole suite

clean:  ## remove the virtualenv, tools and caches
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
