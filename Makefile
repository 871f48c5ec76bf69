# Two entry points for a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint typecheck pytest system-deps fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python system-deps
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/milterbridge run $(ARGS)

system-deps:
	bash .ci/system-deps.sh

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy --strict milterbridge

pytest: $(VENV)/.installed-test
	$(BIN)/pytest

test: lint typecheck pytest

# By hand: ten million runs of the codec fuzzer (see tests/fuzz/).
fuzz: $(VENV)/.installed-test
	$(BIN)/pip install -q atheris
	PYTHONPATH=. $(BIN)/python tests/fuzz/fuzz_codec.py -atheris_runs=10000000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
