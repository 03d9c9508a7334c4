#!/usr/bin/env bash
# What `make bench` needs beyond scripts/setup.sh, installed only when missing:
#   - pglogical (postgresql-15-pglogical), pgcopydb, and pgbench (postgresql-contrib);
#   - a check that the PostgreSQL the benchmark runs ($PG_CONFIG) has pglogical: a relocated
#     copy made before pglogical was installed lacks it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
APT_PACKAGES=(postgresql-15-pglogical pgcopydb postgresql-contrib)

say() { printf '==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# pgrx's own configuration stays on setup.sh's default (the system PostgreSQL): the benchmark
# installs into $PG_CONFIG with `cargo pgrx install --pg-config`, which needs no `pgrx init`
# for it, and other users of this machine's ~/.pgrx keep theirs.
env -u PG_CONFIG "$here/setup.sh"

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
    say "benchmark packages present (pglogical, pgcopydb, pgbench)"
fi

pkglibdir=$("$PG_CONFIG" --pkglibdir)
bindir=$("$PG_CONFIG" --bindir)
for file in "$pkglibdir/pglogical.so" "$bindir/pgbench"; do
    if [ ! -e "$file" ]; then
        echo "error: $file is missing: $PG_CONFIG is a PostgreSQL without pglogical or pgbench." >&2
        echo "       A relocated copy must be made after installing postgresql-15-pglogical." >&2
        exit 1
    fi
done
command -v pgcopydb >/dev/null || { echo "error: pgcopydb is not on PATH" >&2; exit 1; }
say "benchmark prerequisites ready for $PG_CONFIG"
