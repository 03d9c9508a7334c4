# The two commands of the README, and the steps they are made of.
#
#   make demo   a real assessment between two local PostgreSQL clusters
#   make test   every test: formatting, lints, unit, SQL-surface and end-to-end
#
# Both install what they need first (scripts/setup.sh, idempotent).

PG_CONFIG ?= /usr/bin/pg_config
# cargo pgrx test starts its own throwaway cluster; PostgreSQL refuses to run
# as root, so it runs as the postgres OS user in a scratch directory.
PGRX_TEST_PGDATA ?= /tmp/cloudmig-pgrx-test-data
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo --sudo)

.PHONY: demo test setup install lint unit e2e

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

demo: install
	cargo run -q -p cloudmig-e2e --bin cloudmig-demo
