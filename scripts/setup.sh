#!/usr/bin/env bash
# Installs what building and testing cloudmig needs on a Debian machine, and
# nothing twice: every step first checks whether it is already done.
#
#   - PostgreSQL 15 server, contrib and headers, clang (for pgrx's bindgen),
#     sudo (cargo pgrx test --runas), pg_cron (scheduling tests);
#   - cargo-pgrx 0.18.0 (0.19 needs a newer rustc than 1.95);
#   - pgrx's configuration pointing at the system PostgreSQL 15.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
APT_PACKAGES=(postgresql-15 postgresql-contrib postgresql-server-dev-15 libclang-dev clang sudo
              postgresql-15-cron)

say() { printf '==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " ${PGRX_VERSION}\$"; then
    say "installing cargo-pgrx ${PGRX_VERSION} (a few minutes)"
    cargo install cargo-pgrx --version "${PGRX_VERSION}" --locked --quiet
else
    say "cargo-pgrx ${PGRX_VERSION} present"
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "^pg15 = \"${PG_CONFIG}\"" "${PGRX_HOME}/config.toml"; then
    say "pointing pgrx at ${PG_CONFIG}"
    cargo pgrx init --pg15 "${PG_CONFIG}" >/dev/null
else
    say "pgrx configured for ${PG_CONFIG}"
fi
