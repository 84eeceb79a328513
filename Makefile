# Quickstart: `make demo` runs the whole pipeline locally; `make test` runs the tests.
# Both create the virtualenv on first use: torch (CPU wheel) first, then the project.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
DEMO_DIR ?= piarec-demo

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/piarec demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -m "not benchmark"

test-fast: $(STAMP)
	$(PY) -m pytest -m "not benchmark and not slow"

clean:
	rm -rf $(DEMO_DIR) piarec-work .pytest_cache
