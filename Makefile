# async-processor: the README's two commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install run migrate test lint fmt typecheck bench bench-quick reliability clean chromium

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
		echo "python3 -m venv failed: installing python3-venv"; \
		apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[postgres,dev]"
	$(PY) -m compileall -q backend    # bytecode, as a pip-installed deployment has it
	@touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	$(BIN)/async-processor migrate

run: $(STAMP)
	$(BIN)/async-processor dev --host $(HOST) --port $(PORT)

# The dashboard's browser test drives Debian's Chromium (no browser download).
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing Debian's chromium for the dashboard's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (bench/): SQLite and PostgreSQL (127.0.0.1:5432, or BENCH_PG_URL), each figure
# beside its bare-driver floor. `bench` (<= 20 min) rewrites bench/RESULTS.md and
# bench/results/latest.json; `bench-quick` (<= 3 min) writes bench/out/ only.
# Extra flags: make bench BENCH_ARGS='--label after --baseline bench/results/before.json'
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench --profile full $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m bench --profile quick $(BENCH_ARGS)

# Reliability suite (tests/reliability, docs/reliability.md): `make test` runs its fast
# profile, seeded-bug twins included; `make reliability` runs the full one (shipped
# defaults, larger counts; the twins only prove detection, so they stay in the fast one)
# and writes the JSON summary that docs/reliability.md publishes. Needs PostgreSQL at
# 127.0.0.1:5432.
RELIABILITY_JSON ?= tests/reliability/results/latest.json
reliability: $(STAMP)
	CI=true RELIABILITY_PROFILE=full RELIABILITY_SUMMARY=$(RELIABILITY_JSON) \
		$(PY) -m pytest tests/reliability --ignore tests/reliability/test_seeded_bugs.py \
		--timeout 1200 -rxX $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check backend tests migrations bench
	$(BIN)/ruff check backend tests migrations bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format backend tests migrations bench
	$(BIN)/ruff check --fix backend tests migrations bench

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
