# Two entry points: `make repro` (the pipeline) and `make test` (the test suite). Both create .venv first.
# `make test-fast` is the quick tier of the tests, `make lint` the linter and formatter check (CI runs both).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On the project's machines the Kaggle datasets come from an offline kagglehub cache beside the checkout.
ifeq ($(origin KAGGLEHUB_CACHE), undefined)
ifneq ($(wildcard ../shared/kagglehub),)
export KAGGLEHUB_CACHE := $(abspath ../shared/kagglehub)
endif
endif
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: env repro test test-fast lint

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: env
	# data/ is your own images (tracked by data.dvc): restore it from the DVC cache/remote, or start empty
	dvc checkout data.dvc 2>/dev/null || dvc pull data.dvc 2>/dev/null || mkdir -p data
	dvc repro

test: env
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked slow (servers, subprocesses, several backends, real data).
test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
