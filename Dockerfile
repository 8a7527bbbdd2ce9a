# syntax=docker/dockerfile:1
#
# token-broker container image.
#
#   docker build -t token-broker:0.1.0 .
#   # reproducible: pin the base by digest as well as by tag
#   docker build --build-arg PYTHON_DIGEST=@sha256:<digest of python:3.11-slim-bookworm> -t token-broker:0.1.0 .
#
# Runtime contract: runs as uid/gid 10001, writes nothing outside /tmp (works with a read-only root filesystem
# and an emptyDir/tmpfs at /tmp), listens on 8080 (API) and 9090 (metrics), drains and exits 0 on SIGTERM
# (tini forwards it). Configuration: `--config FILE` or $BROKER_CONFIG; the Helm chart and
# deploy/docker-compose.yml mount it at /etc/token-broker/broker.yaml and set BROKER_CONFIG. (Without either
# the broker falls back to its embedded laptop defaults, which listen on 127.0.0.1 only.)
# BROKER_LISTEN_HOST/BROKER_LISTEN_PORT and BROKER_METRICS_HOST/BROKER_METRICS_PORT override the file's
# listen and metrics addresses; the HEALTHCHECK follows them.

# Base image: pinned by tag; PYTHON_DIGEST (empty, or "@sha256:...") additionally pins it by digest.
ARG PYTHON_TAG=3.11-slim-bookworm
ARG PYTHON_DIGEST=""

# ---------------------------------------------------------------------------------------------------------
# build: a self-contained virtualenv at /opt/venv holding the broker and its dependencies.
# All dependencies ship manylinux wheels, so no compiler is needed.
FROM python:${PYTHON_TAG}${PYTHON_DIGEST} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /src
# pyproject.toml names README.md as the package readme, so both are needed to build.
COPY pyproject.toml README.md ./
COPY broker ./broker
# Non-editable install; pip byte-compiles the installed modules here, so the read-only runtime never needs to.
RUN pip install --no-cache-dir . \
    && pip check

# ---------------------------------------------------------------------------------------------------------
# dev: build stage plus the emulator package and its [emulator] extra. Used by deploy/docker-compose.yml to run
# the Entra ID / Key Vault emulator (python -m emulator); never shipped (the runtime stage copies the build
# stage's virtualenv, which holds the broker only).
FROM build AS dev
COPY emulator ./emulator
# The [emulator] extra is range-pinned in pyproject.toml; this stage is for local demos only.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[emulator]" \
    && install -d -o 10001 -g 10001 -m 0750 /state
USER 10001:10001

# ---------------------------------------------------------------------------------------------------------
# runtime
FROM python:${PYTHON_TAG}${PYTHON_DIGEST} AS runtime

# Debian bookworm's tini; override with --build-arg when the base moves to another release or architecture.
ARG TINI_VERSION=0.19.0-1+b3

LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="Hands internal callers short-lived Entra ID app tokens for customer tenants." \
      org.opencontainers.image.version="0.1.0"

RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin broker

# Only the virtualenv crosses over: no build context, no pip cache, owned by root and read-only for the app.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp

USER 10001:10001
WORKDIR /tmp

EXPOSE 8080 9090

# No curl in the image: `token-broker healthcheck` probes /healthz on the port the broker was configured
# with (its config file, BROKER_LISTEN_PORT), on loopback when it listens on a wildcard address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["token-broker", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "token-broker"]
CMD ["serve"]
