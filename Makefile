# All set-up happens here: `make compare` (the main job) and `make test` (the suite) each create
# .venv and install the project with pinned torch/torchvision/timm on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup compare test lint upstream-tests clean

$(STAMP): pyproject.toml setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

compare: $(STAMP)
	$(BIN)/vitzoo compare

upstream-tests: $(STAMP)
	$(BIN)/python tests/upstream/fetch_timm_tests.py

lint: $(STAMP)
	$(BIN)/python -m flake8 shvit nvit vitzoo benchmarks tests

test: $(STAMP) lint upstream-tests
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info
