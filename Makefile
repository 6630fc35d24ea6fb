# One entry point for a fresh machine: `make venv` builds .venv from nothing (idempotent),
# `make test` runs the same test command CI runs, `make run` runs the main job.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned here, so the project's `torch>=2.4` finds it satisfied.
# torchvision rides along for the end-to-end tests on unmodified torchvision models; torch and
# torchvision must be installed together (a lone PyPI torchvision pulls its own torch).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: venv test run lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: venv
	$(PY) -m pytest -q

run: venv
	$(PY) train.py +quant=qat march=bayes

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
