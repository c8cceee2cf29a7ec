# Two commands: `make run` and `make test`. Both create .venv when missing and are idempotent.
# `make run` installs only what the service needs (~150 MB, no torch); `make test` adds the
# `train` extra (torch, torchvision) and the development tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
INBOX ?= inbox
OUTBOX ?= outbox

.PHONY: run test lint typecheck pytest bench fuzz install install-core clean

install: $(STAMP)
install-core: $(CORE)

$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(CORE)
	$(BIN)/digitwatch run --inbox $(INBOX) --outbox $(OUTBOX)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_daemon.py

# Fuzz decode + preprocess for FUZZ_SECONDS; findings land in FUZZ_OUT (see tests/fuzz_decode.py).
FUZZ_SECONDS ?= 300
FUZZ_OUT ?= fuzz-findings
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	mkdir -p $(FUZZ_OUT)
	$(BIN)/python tests/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
		-rss_limit_mb=2048 -malloc_limit_mb=1024 -artifact_prefix=$(FUZZ_OUT)/ $(FUZZ_OUT)/corpus

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
