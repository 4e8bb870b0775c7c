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
	@# dig (Debian dnsutils) for the meshdns tests; they skip with a message without it.
	command -v dig >/dev/null || (test "$$(id -u)" = 0 && apt-get update -q >/dev/null && apt-get install -y -q dnsutils) || true

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The peers bench/pg_sidecar.py compares the sidecar to (Debian packages; needs root).
bench-deps:
	apt-get update && apt-get install -y haproxy pgbouncer

# The main job on the embedded default: the whole control plane in one process (Ctrl-C stops).
up: $(STAMP)
	$(BIN)/sluice up --policies examples/policies --data-dir sluice-data

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
