# outboxer: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The same tests against the lowest versions pyproject.toml declares (scripts/lowest_versions.py).
LOWEST       := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed-stamp
# A subset that exercises each pinned library: SQLAlchemy and Alembic on the three
# databases, pika, boto3, the OpenTelemetry SDK, click and rich.
LOWEST_TESTS ?= tests/test_publish.py tests/test_relay.py tests/test_migrations.py \
	tests/test_transport_contract.py tests/test_tracing.py tests/test_cli_inbox.py \
	tests/test_cli_environment.py tests/test_consumer.py::test_inbox_rows_past_retention_are_pruned \
	tests/test_packaging.py::test_sync_use_needs_no_greenlet

.PHONY: demo test lint typecheck pytest bench chaos pytest-lowest services clean

# --upgrade-strategy eager: a rebuilt environment has the newest release of everything, so
# `make test` runs on the latest versions here and on the lowest in $(LOWEST).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	touch $(STAMP)

$(LOWEST_STAMP): pyproject.toml scripts/lowest_versions.py $(STAMP)
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(BIN)/python scripts/lowest_versions.py > $(LOWEST)/constraints.txt
	$(LOWEST)/bin/python -m pip install -q -c $(LOWEST)/constraints.txt -e '.[test]'
	$(LOWEST)/bin/python scripts/lowest_versions.py --check
	touch $(LOWEST_STAMP)

demo: $(STAMP)
	$(BIN)/outboxer demo

services:
	bash scripts/services.sh

lint: $(STAMP)
	$(BIN)/ruff check outboxer tests bench chaos migrations examples
	$(BIN)/ruff format --check outboxer tests bench chaos migrations examples

typecheck: $(STAMP)
	$(BIN)/mypy outboxer
	$(BIN)/mypy --strict chaos tests/faultproxy.py tests/refusing_server.py

# The slowest tests are listed at the end, so that CI's log shows where its time goes.
PYTEST_ARGS ?= --durations=30

pytest: $(STAMP) services
	$(BIN)/pytest $(PYTEST_ARGS)

pytest-lowest: $(LOWEST_STAMP) services
	$(LOWEST)/bin/pytest -q -m "not disruptive and not slow" $(LOWEST_TESTS)

test: lint typecheck pytest pytest-lowest

bench: $(STAMP) services
	$(BIN)/python -m bench $(BENCH_ARGS)

# Fault scenarios against the real relay (about an hour; `CHAOS_ARGS=--quick` takes minutes,
# `CHAOS_ARGS='cut-rabbitmq kill-rabbitmq'` picks scenarios). Figures: chaos/results/.
# Then the long profiles of the property-based and fuzz tests: they run the tests that
# CHAOS_PYTEST_ARGS selects (default: those marked `long_profile`) with
# HYPOTHESIS_PROFILE=chaos, so a test registers a "chaos" settings profile with many
# examples and CI keeps its small default. Both parts always run; either failing fails
# the target. pytest's exit 5 (no such test yet) is not a failure.
CHAOS_PYTEST_ARGS ?= -m long_profile
chaos: $(STAMP) services
	status=0; \
	$(BIN)/python -m chaos $(CHAOS_ARGS) || status=1; \
	HYPOTHESIS_PROFILE=chaos $(BIN)/pytest -p no:cacheprovider $(CHAOS_PYTEST_ARGS) \
		|| [ $$? -eq 5 ] || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) $(LOWEST) .mypy_cache .pytest_cache .ruff_cache build dist
