# shrinkflow: `make run` sets up .venv and runs the default pipeline; `make test` sets up and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
# tfmot needs Keras 2; harmless for torch-only jobs.
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: venv browser run test lint repro mlflow-ui bench clean

# Re-installs only when the dependency pins change. pip's output goes to a log (it is long);
# its tail is shown if the install fails.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (log: $(VENV)/install.log) ..."
	@$(BIN)/pip install --disable-pip-version-check -c constraints.txt -e '.[dev]' \
		> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $@

run: venv
	snakemake --profile workflow/profiles/local --cores $(CORES)

# Chromium for the page-rendering tests (tests/browser.py): Debian's package, driven by the
# playwright pin in the venv (no browser download). Installing needs root and Debian's mirror;
# without them the hint below is printed and those tests skip.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" -ne 0 ]; then \
		echo "note: $(CHROMIUM) is missing and only root can apt-get it; browser tests will skip"; \
	else \
		mkdir -p $(VENV); \
		echo "installing Chromium with apt-get (log: $(VENV)/chromium-install.log) ..."; \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends chromium; } \
			> $(VENV)/chromium-install.log 2>&1 || { tail -n 40 $(VENV)/chromium-install.log; exit 1; }; \
	fi

test: venv browser
	pytest

lint: venv
	ruff check .
	pytest -q tests/test_workflow_lint.py

repro: venv
	dvc repro

mlflow-ui: venv
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

bench: venv
	python benchmarks/pipeline.py
	python benchmarks/int8_flows.py
	python benchmarks/quantization.py
	python benchmarks/tensorflow.py
	python benchmarks/report.py

clean:
	rm -rf results logs .snakemake data/raw data/prepared mlflow.db mlflow.db.lock mlartifacts
