#!/usr/bin/env bash
# Installs everything the integration tests need (idempotent; fast when already done):
#   - Debian packages listed in APT_PACKAGES (only those not yet installed)
#   - .venv with tests/clients/python/requirements.txt (temporal CLI/dev server + Python SDK,
#     moto_server: a local AWS KMS API for the aws-kms provider tests)
#   - tests/clients/ts/node_modules (TypeScript client)
# Requires only python3, node/npm (and apt-get for APT_PACKAGES) on a fresh machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

# Debian packages the tests need (space separated):
#   chromium     the codec server's Web UI test drives it headless through playwright-core
#                (tests/clients/ts), which downloads no browser
#   nginx-light  an mTLS-enforcing gRPC upstream (grpc_pass) for the upstream credential tests
#   softhsm2     a PKCS#11 token (/usr/lib/softhsm/libsofthsm2.so) for the pkcs11 key provider tests
APT_PACKAGES="${APT_PACKAGES:-chromium nginx-light softhsm2}"

log() { echo "setup: $*" >&2; }

sha256_of() { sha256sum "$1" | awk '{print $1}'; }

# ---------------------------------------------------------------- apt
install_apt_packages() {
    local missing=() pkg
    for pkg in $APT_PACKAGES; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        [ -n "$APT_PACKAGES" ] && log "apt packages already installed: $APT_PACKAGES"
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            log "ERROR: need root or sudo to install: ${missing[*]}"
            return 1
        fi
    fi
    log "installing apt packages: ${missing[*]}"
    local aptlog
    aptlog="$(mktemp)"
    if ! { ${sudo[@]+"${sudo[@]}"} apt-get update -qq &&
           ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
               apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$aptlog" 2>&1; then
        cat "$aptlog" >&2
        rm -f "$aptlog"
        log "ERROR: apt-get failed"
        return 1
    fi
    rm -f "$aptlog"
}

# ---------------------------------------------------------------- python
setup_python() {
    local req="tests/clients/python/requirements.txt"
    local stamp=".venv/.requirements-stamp"
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        python3 -m venv .venv
        rm -f "$stamp"
    fi
    local want
    want="$(sha256_of "$req")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/temporal ] && [ -x .venv/bin/moto_server ]; then
        log "python deps up to date"
        return 0
    fi
    log "pip install -r $req"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req" >&2
    echo "$want" > "$stamp"
}

# ---------------------------------------------------------------- node
setup_node() {
    local dir="tests/clients/ts"
    local stamp="$dir/node_modules/.portcullis-stamp"
    local lock="$dir/package-lock.json"
    local src="$lock"
    [ -f "$lock" ] || src="$dir/package.json"
    local want
    want="$(sha256_of "$src")"
    if [ -d "$dir/node_modules" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "node deps up to date"
        return 0
    fi
    if [ -f "$lock" ]; then
        log "npm ci in $dir"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    else
        log "npm install in $dir (no lockfile)"
        (cd "$dir" && npm install --no-audit --no-fund --loglevel=error >&2)
        src="$lock"
        want="$(sha256_of "$src")"
    fi
    echo "$want" > "$stamp"
}

install_apt_packages
setup_python
setup_node
log "done ($ROOT)"
