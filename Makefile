# The two commands of the README, and the steps they are made of.
#
#   make demo   a real assessment between two local PostgreSQL clusters
#   make test   every test: formatting, lints, unit, SQL-surface and end-to-end
#   make e2e-slow  the long fault-injection scenarios (tests/faults_slow.rs); CI runs it too
#   make bench  cloudmig against pg_dump, pgcopydb, native replication and pglogical
#
# Each installs what it needs first (scripts/setup.sh, idempotent; the benchmark also
# scripts/setup-bench.sh).

PG_CONFIG ?= /usr/bin/pg_config
# cargo pgrx test starts its own throwaway cluster; PostgreSQL refuses to run
# as root, so it runs as the postgres OS user in a scratch directory.
PGRX_TEST_PGDATA ?= /tmp/cloudmig-pgrx-test-data
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo --sudo)

.PHONY: demo test setup install lint unit e2e e2e-slow setup-bench bench

setup:
	scripts/setup.sh

install: setup
	cargo pgrx install --pg-config $(PG_CONFIG) $(SUDO)

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit: setup
	rm -rf $(PGRX_TEST_PGDATA)
	cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_TEST_PGDATA)

e2e: install
	cargo test -p cloudmig-e2e --tests -- --test-threads=2

test: lint unit e2e

# The fault-injection scenarios that take minutes each (ignored by `make e2e`).
e2e-slow: install
	cargo test -p cloudmig-e2e --test faults_slow -- --ignored --test-threads=2

demo: install
	cargo run -q -p cloudmig-e2e --bin cloudmig-demo

# The benchmark installs a release build of cloudmig into the PostgreSQL of $(PG_CONFIG) and runs
# its clusters with that installation's binaries, so a private copy works as well as the system's:
#   make bench PG_CONFIG=/opt/pg-bench/usr/lib/postgresql/15/bin/pg_config
# Its parameters are environment variables or flags (BENCH_ARGS), see `cloudmig-bench --help`:
#   make bench BENCH_SCALE=20 BENCH_REPS=5 BENCH_SECTIONS=apply,copy
#   make bench BENCH_SECTIONS=copy BENCH_LINK=direct,30ms-1gbit,30ms-100mbit   (emulated links)
BENCH_ARGS ?=

setup-bench:
	PG_CONFIG=$(PG_CONFIG) scripts/setup-bench.sh

bench: setup-bench
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(SUDO)
	CLOUDMIG_PG_BINDIR="$$($(PG_CONFIG) --bindir)" CLOUDMIG_BUILD_PROFILE=release \
		cargo run -q -p cloudmig-e2e --bin cloudmig-bench -- $(BENCH_ARGS)
