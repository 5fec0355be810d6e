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

.PHONY: venv services run test lint repro push mlflow-ui mlflow-server bench screenshots clean

# Re-installs only when the dependency pins change. pip's output goes to a log (it is long);
# its tail is shown if the install fails.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (log: $(VENV)/install.log) ..."
	@$(BIN)/pip install --disable-pip-version-check -c constraints.txt -e '.[dev]' \
		> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $@

# profiles/default/ (loaded by every snakemake) makes a re-run resume after a crash.
run: venv
	snakemake --cores $(CORES)

# Debian packages the tests start for real, installed when missing (needs root and Debian's
# mirror; without them the hint is printed and those tests skip):
#   chromium                          the report page rendered headless (tests/browser.py), driven
#                                     by the playwright pin in the venv (no browser download)
#   slurm-wlm slurmdbd munge          a one-node Slurm cluster with accounting (tests/slurm_cluster.py)
#   mariadb-server                    slurmdbd's database
#   postgresql                        the tracking server's backend store (make mlflow-server)
TEST_PACKAGES := chromium slurm-wlm slurmdbd munge mariadb-server postgresql
services:
	@missing=$$(for p in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" -ne 0 ]; then \
		echo "note: missing Debian packages ($$missing) and only root can apt-get them; their tests will skip"; \
	else \
		mkdir -p $(VENV); \
		echo "installing $$missing with apt-get (log: $(VENV)/apt-install.log) ..."; \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing; } \
			> $(VENV)/apt-install.log 2>&1 || { tail -n 40 $(VENV)/apt-install.log; exit 1; }; \
	fi

test: venv services
	pytest

lint: venv
	ruff check .
	ruff format --check .
	pytest -q -n 0 tests/test_workflow_lint.py

repro: venv
	dvc repro

# Checkpoints and data to DVC's default remote (`dvc remote add -d NAME URL`): checks it can be
# written, records the outputs in dvc.lock (`dvc commit -f`), then `dvc push`.
push: venv
	shrinkflow remote push

# The local store's UI. A project folder copied or moved elsewhere opens with its artefacts: the
# store's recorded artefact locations are moved to this folder first (shrinkflow.tracking.relocate).
mlflow-ui: venv
	python -c 'import sys; from shrinkflow.tracking.relocate import main; main(sys.argv[1:])' \
		$(CURDIR)/mlflow.db
	@echo "open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (MLflow's model-training view)"
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# The shared tracking server: MLflow on 127.0.0.1:${PORT:-5000} with a PostgreSQL store kept in
# .mlflow-server/ (or $MLFLOW_BACKEND_STORE_URI) and artefacts served; prints the
# MLFLOW_TRACKING_URI to export; Ctrl-C stops it and PostgreSQL. MLFLOW_SERVER_ARGS passes
# more options (--host 0.0.0.0, --workers N, --postgres-port N; see its --help).
mlflow-server: venv
	python -m shrinkflow.tracking.server $(MLFLOW_SERVER_ARGS)

# Every benchmark writes its block of docs/figures.md (benchmarks/figures.py). All of them take
# hours on 2 cores; `make bench-report` (or any bench-<script>) runs one.
BENCHMARKS := pipeline pruning quantization int8_flows tensorflow selection_noise runtimes \
	report scaleout distill tf_qat_sparsity
BENCH_ARGS_selection_noise := --configfile benchmarks/selection_noise.yaml
.PHONY: $(addprefix bench-,$(BENCHMARKS))
bench: $(addprefix bench-,$(BENCHMARKS))
$(addprefix bench-,$(BENCHMARKS)): bench-%: venv
	python benchmarks/$*.py $(BENCH_ARGS_$*)

# docs/images/report.png, the README's screenshot, from results/report/ (after `make run`).
screenshots: venv
	python benchmarks/screenshots.py

# Pipeline outputs and the local store only: .mlflow-server/ (the shared tracking server's
# data) and dvc-storage/ (the remote) are left alone.
clean:
	rm -rf results logs .snakemake data/raw data/prepared mlflow.db mlflow.db.lock mlartifacts
