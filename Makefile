# Two commands: `make run` and `make test`. Both work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APP_STAMP := $(VENV)/.installed-app
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test install install-dev migrate demo-data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(APP_STAMP): requirements.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(APP_STAMP) $@

install: $(APP_STAMP)
install-dev: $(DEV_STAMP)

migrate: $(APP_STAMP)
	$(PY) -m billing_core init-db

# Demo mode (no Stripe key, no DATABASE_URL) gets sample data on first run.
demo-data: $(APP_STAMP)
	@$(PY) -c "from billing_core.settings import get_settings; import sys; sys.exit(0 if get_settings().demo_mode else 1)" \
	  && $(PY) -m billing_core demo-data --if-empty || true

run: migrate demo-data
	@$(PY) -m billing_core serve-webhooks & SIDECAR=$$!; \
	  trap 'kill $$SIDECAR 2>/dev/null' EXIT INT TERM; \
	  $(PY) -m streamlit run Home.py --server.address "$$($(PY) -c 'from billing_core.settings import get_settings; print(get_settings().dashboard_address)')"

test: $(DEV_STAMP)
	@PG=$$($(PY) tests/pg_url.py); \
	  if [ -n "$$PG" ]; then echo "PostgreSQL answers at 127.0.0.1:5432: the database tests run on SQLite and PostgreSQL"; fi; \
	  TEST_DATABASE_URL=$$PG $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks (figures in docs/BENCHMARKS.md); one JSON line per figure. BENCH_DB=postgresql for PostgreSQL.
.PHONY: bench
BENCH_DB ?= sqlite
bench: $(DEV_STAMP)
	$(PY) bench/webhooks.py --database $(BENCH_DB)
	$(PY) bench/consume.py --database $(BENCH_DB)
	$(PY) bench/mixed_load.py --database $(BENCH_DB)
	$(PY) bench/dashboard.py
	$(PY) bench/return_page_flood.py --database $(BENCH_DB)
