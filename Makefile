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

.PHONY: help env repro test test-fast lint
.DEFAULT_GOAL := help

help: ## list the targets (this screen)
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

env: $(VENV)/.installed ## create .venv with the package and its test tools

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: env ## run the pipeline (dvc repro) on the sources in params.yaml
	# data/ is your own images (tracked by data.dvc): restore it from the DVC cache/remote, or start empty
	dvc checkout data.dvc 2>/dev/null || dvc pull data.dvc 2>/dev/null || mkdir -p data
	dvc repro

# Two pytest workers, each test file on one of them (its module fixtures built once): most tests wait on a
# subprocess, a server or one core, so two at once finish the suite in 17 min instead of 24 on 2 cores.
test: env ## the whole test suite (what CI runs); ends with its 15 slowest tests, to keep CI short
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The inner loop: everything but the tests marked slow (servers, subprocesses, several backends, real data).
test-fast: env ## the tests not marked slow: the inner loop
	$(BIN)/python -m pytest -q -m "not slow"

lint: env ## ruff: lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
