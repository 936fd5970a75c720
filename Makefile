# Airlock — every target bootstraps what it needs from nothing on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := bubblewrap postgresql boinc-client xrootd-server xrootd-scitokens-plugins xrootd-client \
                globus-proxy-utils voms-clients \
                mariadb-server mariadb-client pkg-config libmariadb-dev swig libssl-dev gcc openssl

.PHONY: demo demo-xrootd test test-fast lint typecheck bench venv system-deps postgres mariadb clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## make demo: the whole system on the embedded default (SQLite and local folders)
demo: $(STAMP)
	@dpkg -s bubblewrap >/dev/null 2>&1 || $(MAKE) --no-print-directory APT_PACKAGES=bubblewrap system-deps \
	  || echo "bubblewrap could not be installed: the demo's agents will run unsandboxed"
	$(BIN)/airlock demo

## make demo-xrootd: the same demo with a private XRootD server (HTTPS, SciTokens) as data bridge and
## trusted storage; volunteers upload to it directly
demo-xrootd: system-deps $(STAMP)
	$(BIN)/airlock demo --bridge xrootd

## system packages the tests use: bubblewrap (sandbox), PostgreSQL (second backend), the BOINC client,
## XRootD with its SciTokens plugin, the grid tools that check our certificates, and MariaDB with the
## build tools of DIRAC's own venv (scripts/dirac/up.sh: M2Crypto and mysqlclient compile)
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

## a PostgreSQL answering on 127.0.0.1:5432 (started if none answers)
postgres: system-deps
	@scripts/ensure-postgres.sh

## a MariaDB answering on 127.0.0.1:3306 with the airlock_admin login the DIRAC bring-up uses
mariadb: system-deps
	@scripts/ensure-mariadb.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## the suite on TEST_WORKERS pytest-xdist workers: most of its time is spent waiting on real servers and
## clients (BOINC's RPC delays, DIRAC), so three share two cores well; the DIRAC tests run on one of them
TEST_WORKERS ?= 3
test: system-deps postgres mariadb $(STAMP) lint typecheck
	AIRLOCK_TEST_POSTGRES=required AIRLOCK_TEST_DIRAC=required AIRLOCK_DIRAC_MYSQL_ADMIN_USER=airlock_admin \
	  $(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=15

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" -x

bench: $(STAMP) mariadb
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/credentials.py
	$(BIN)/python bench/boinc_rpc.py
	AIRLOCK_DIRAC_MYSQL_ADMIN_USER=airlock_admin $(BIN)/python bench/upstream.py

clean:
	rm -rf $(VENV) airlock-data .mypy_cache .ruff_cache .pytest_cache
