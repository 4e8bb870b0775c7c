# One command per task; CI calls exactly these.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXT_STAMP := build/.compiled
# mitmproxy in a virtualenv of its own (docs/decisions/0010-mitmproxy-addon.md): 11.0.2, the
# newest release for Python 3.11, pins h11<=0.14, which httpx/httpcore here cannot share.
# Besides mitmproxy it gets only the dependencies of the addon's imports (policies/ and
# sidecar/{mitm,audit,limits,policy_watch,protocols}), as pyproject.toml pins them, and the
# repository itself without its dependencies.
MITM_VENV := .venv-mitm
MITM_STAMP := $(MITM_VENV)/.installed
MITM_DEPS := mitmproxy==11.0.2 'PyYAML>=6.0' 'pglast>=8.8,<9' 'tzdata>=2024.1' 'orjson>=3.9'

.PHONY: install mitm check test bench bench-deps demo up clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@mkdir -p build && touch $(EXT_STAMP)
	touch $(STAMP)

# sidecar/pg_session.py, sidecar/mysql_responses.py and policies/sql/pg_fastshape.py compiled
# by Cython (setup.py) into _pg_session_c*.so, _mysql_responses_c*.so and _pg_fastshape_c*.so
# beside them, rebuilt when a source changes; until then the sidecar runs that pure Python
# code (never stale code: docs/decisions/0013-compiled-pg-session.md).
$(EXT_STAMP): sidecar/pg_session.py sidecar/mysql_responses.py policies/sql/pg_fastshape.py | $(STAMP)
	$(BIN)/pip install -q --no-deps -e .
	@mkdir -p build && touch $(EXT_STAMP)

$(MITM_STAMP): pyproject.toml Makefile
	$(PY) -m venv $(MITM_VENV)
	$(MITM_VENV)/bin/pip install -q $(MITM_DEPS)
	$(MITM_VENV)/bin/pip install -q --no-deps -e .
	$(MITM_VENV)/bin/python -c "import sidecar.mitm_addon"
	touch $(MITM_STAMP)

mitm: $(MITM_STAMP)

install: $(STAMP) $(EXT_STAMP)
	@# dig (Debian dnsutils) for the meshdns tests; they skip with a message without it.
	command -v dig >/dev/null || (test "$$(id -u)" = 0 && apt-get update -q >/dev/null && apt-get install -y -q dnsutils) || true
	@# nginx (a real origin), curl and wrk (real clients) for the HTTP sidecar tests; they skip without.
	command -v wrk >/dev/null && test -x /usr/sbin/nginx && command -v curl >/dev/null || (test "$$(id -u)" = 0 && apt-get update -q >/dev/null && apt-get install -y -q nginx-light wrk curl) || true
	@# sysbench (Debian) drives the MySQL sidecar in tests/sidecar/test_mysql_sysbench.py; skipped without.
	command -v sysbench >/dev/null || (test "$$(id -u)" = 0 && apt-get update -q >/dev/null && apt-get install -y -q sysbench) || true
	@# ip and iptables for `sluice run` (transparent interception) and its tests; they skip without.
	command -v ip >/dev/null && command -v iptables-restore >/dev/null || (test "$$(id -u)" = 0 && apt-get update -q >/dev/null && apt-get install -y -q iproute2 iptables) || true

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The mitmproxy addon's tests (tests/sidecar/test_mitm_addon.py) run mitmdump from $(MITM_VENV).
test: install $(MITM_STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The peers the sidecar benchmarks compare to, the HTTP origin and load tool (Debian
# packages; needs root). bench/http_sidecar.py's mitmproxy row runs .venv-mitm's (make mitm).
bench-deps:
	apt-get update && apt-get install -y haproxy pgbouncer nginx-light wrk

# The main job on the embedded default: the whole control plane in one process (Ctrl-C stops).
up: $(STAMP)
	$(BIN)/sluice up --policies examples/policies --data-dir sluice-data

clean:
	rm -rf $(VENV) $(MITM_VENV) .pytest_cache .mypy_cache .ruff_cache
