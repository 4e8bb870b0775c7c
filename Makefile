# One command per task; CI calls exactly these.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install check test bench bench-deps demo up clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The peers bench/pg_sidecar.py compares the sidecar to (Debian packages; needs root).
bench-deps:
	apt-get update && apt-get install -y haproxy pgbouncer

# The main job on the embedded default: validate and explain the example policies.
up: $(STAMP)
	$(BIN)/sluice policy check examples/policies
	$(BIN)/sluice policy explain examples/policies --from billing --to orders-db \
		--sql "DELETE FROM orders WHERE id = 1" --at 2026-03-29T01:30:00+00:00

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
