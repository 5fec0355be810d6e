#!/usr/bin/env bash
# Run by Snakemake once, inside the environment of shrinkflow.yaml, from the working directory
# (the project folder): this checkout and its pinned dependencies, as `make venv` installs them.
set -euo pipefail
python -m pip install --disable-pip-version-check -c constraints.txt -e .
