# Two entry points: `make run` (install, serve with embedded defaults) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HASH   := $(shell sha1sum pyproject.toml | cut -c1-12)
# What serving needs (`pip install -e .`), then the test extras on top: two stamps, so that
# `make run` never installs the test tools and `make test` adds them once.
STAMP      := $(VENV)/.installed-$(HASH)
TEST_STAMP := $(VENV)/.installed-test-$(HASH)
export LBP_CDS_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: run test install install-test fhir bench check-knowledge clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-test-* && touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

run: $(STAMP)
	$(BIN)/lbp-cds serve --dev

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tests' FHIR server (sekmet-fhir, loopback only) with every fixture patient loaded;
# prints its URL and token and writes them to .cache/fhir.env. Ctrl-C stops it.
fhir: $(TEST_STAMP)
	$(BIN)/python -m tests.fhir_server $(FHIR_ARGS)

check-knowledge: $(STAMP)
	$(BIN)/lbp-cds check-knowledge

bench: $(TEST_STAMP)
	command -v wrk >/dev/null || (apt-get install -y -qq wrk >/dev/null 2>&1 || true)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache lbp-cds.sqlite3*
