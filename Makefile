# Quickstart: `make demo` runs the whole pipeline locally; `make test` runs the tests.
# Both create the virtualenv on first use: torch (CPU wheel) first, then the project.
# `make test` also builds the Airflow environment (.venv-airflow: Airflow + the Spark
# provider, dags/requirements.txt) that the DAG tests run `airflow dags test` from. It is
# kept apart from .venv on purpose: the provider's pyspark-client would break Spark Python
# UDFs in the project environment.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
DEMO_DIR ?= piarec-demo
AIRFLOW_VENV  ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed-stamp

.PHONY: install airflow-env demo test test-fast bench clean stack stack-down dist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(AIRFLOW_STAMP): dags/requirements.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	echo '*' > $(AIRFLOW_VENV)/.gitignore
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -r dags/requirements.txt
	touch $(AIRFLOW_STAMP)

airflow-env: $(AIRFLOW_STAMP)

demo: $(STAMP)
	$(VENV)/bin/piarec demo --workdir $(DEMO_DIR)

test: $(STAMP) $(AIRFLOW_STAMP)
	$(PY) -m pytest -m "not benchmark"

test-fast: $(STAMP)
	$(PY) -m pytest -m "not benchmark and not slow"

# The production topology on 127.0.0.1 (piarec/stack.py): a Spark standalone cluster (a master,
# two workers), an MLflow tracking server, a loopback S3 server and Airflow (api-server,
# scheduler, dag-processor). `source piarec-stack/stack.env` points the pipeline at it.
STACK_DIR ?= piarec-stack

stack: $(STAMP) $(AIRFLOW_STAMP)
	$(VENV)/bin/piarec stack up --dir $(STACK_DIR)

stack-down: $(STAMP)
	$(VENV)/bin/piarec stack down --dir $(STACK_DIR)

# The code zip for spark-submit --py-files (piarec/ship.py): dist/piarec.zip.
dist: $(STAMP)
	$(VENV)/bin/piarec package --out dist

clean:
	rm -rf $(DEMO_DIR) piarec-work .pytest_cache dist
