# Rivya — see README.md. Every target installs what it needs into .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PG_URL ?= postgres://postgres@127.0.0.1:5432/rivya
export TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: run test bench lint install smoke schema screenshots

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "needs $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Development server: SQLite + filesystem broker unless DATABASE_URL / CELERY_BROKER_URL are set.
run: $(STAMP)
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py migrate --noinput
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py createcachetable
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py seed_catalog
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py seed_demo
	DEBUG=$${DEBUG:-1} $(BIN)/python bin/dev.py

# The whole suite on PostgreSQL and Redis (as in production).
test: $(STAMP)
	DATABASE_URL=$(PG_URL) REDIS_URL=$(TEST_REDIS_URL) CELERY_BROKER_URL=$(TEST_REDIS_URL) \
	SECRET_KEY=test-secret-key $(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	DATABASE_URL=$(PG_URL) SECRET_KEY=bench-secret-key $(BIN)/python bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The embedded path of `make run` (SQLite + filesystem broker), without starting the servers.
smoke: $(STAMP)
	bash bin/smoke.sh

# Regenerate the OpenAPI snapshot (docs/openapi.yaml) after an intended API change.
schema: $(STAMP)
	DATABASE_URL=$(PG_URL) SECRET_KEY=schema $(BIN)/python manage.py spectacular --validate \
		--fail-on-warn --file docs/openapi.yaml

# Browser tests save screenshots of every page (desktop and mobile) under var/screenshots/;
# this runs them and copies the ones the README shows into docs/screenshots/.
SHOWN := studio-result history task dashboard chat chat-sessions studio-single-transcription studio-single-speech
screenshots: $(STAMP)
	$(MAKE) test PYTEST_ARGS="tests/browser -q"
	mkdir -p docs/screenshots
	for name in $(SHOWN); do for size in desktop mobile; do \
		cp var/screenshots/$$name-$$size.png docs/screenshots/; done; done
