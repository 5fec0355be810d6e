"""The framework boundary at run time: a job loads its own framework and never the other one.

ruff's TID251 bans the imports in the source (pyproject.toml, and each backend's ruff.toml for
the other framework); this checks what a process really loads, through shared modules too. Each
case is one fresh interpreter that prints the top-level names in ``sys.modules``.
"""

import json
import re
import subprocess
import sys

import pytest
from projects import BIN, ROOT, tool_env

FRAMEWORKS = {
    "torch": {"torch", "torchvision", "torchao", "torch_pruning"},
    "tensorflow": {
        "tensorflow",
        "tf_keras",
        "keras",
        "tensorflow_model_optimization",
        "ai_edge_litert",
    },
}
USER_UNSET = ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")  # set by tests/conftest.py
LOADED = "print('LOADED', json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))"
# `shrinkflow --help`, as the console script runs it (main() exits through SystemExit).
HELP = f"""
import json, sys
from shrinkflow.cli import main
sys.argv = ["shrinkflow", "--help"]
try:
    main()
except SystemExit:
    pass
{LOADED}
"""
# A job of one backend: the CLI, every stage module that calls a backend (the stage table's),
# every job module of the backend (so every module-level import of it is checked) and a real
# call that needs the framework (`shrinkflow models`' count). A real job imports a subset.
JOB = f"""
import importlib, json, sys
import shrinkflow.cli
from shrinkflow.backends.base import JOB_MODULES, backend_module
from shrinkflow.stage_table import STAGES
for stage in STAGES:
    if stage.backend_job:
        importlib.import_module(f"shrinkflow.stages.{{stage.module}}")
for job in JOB_MODULES:
    backend_module(sys.argv[1], job)
assert backend_module(sys.argv[1], "models").model_params("resnet20") > 0
{LOADED}
"""


def loaded_frameworks(code: str, *args: str, tmp_path) -> tuple[set[str], str]:
    """The frameworks ``code`` loaded, and its stderr. It runs without TF_CPP_MIN_LOG_LEVEL and
    TF_USE_LEGACY_KERAS, as from a user's shell (tests/conftest.py sets both for pytest)."""
    env = {k: v for k, v in tool_env().items() if k not in USER_UNSET}
    cmd = [sys.executable, "-c", code, *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOADED "))
    loaded = set(json.loads(line.removeprefix("LOADED "))) & set().union(*FRAMEWORKS.values())
    return loaded, result.stderr


def test_help_loads_no_framework(tmp_path):
    assert loaded_frameworks(HELP, tmp_path=tmp_path)[0] == set()


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_job_loads_its_framework_only(tmp_path, backend):
    """...and its stderr has none of TensorFlow's start-up lines (shrinkflow.backends.native_log):
    Abseil's info and warning records and their banner, the cuInit error of a machine without a
    GPU."""
    loaded, stderr = loaded_frameworks(JOB, backend, tmp_path=tmp_path)
    other = "tensorflow" if backend == "torch" else "torch"
    assert backend in loaded and not loaded & FRAMEWORKS[other], sorted(loaded)
    startup = [
        line
        for line in stderr.splitlines()
        if "absl::InitializeLog" in line or "cuInit" in line or re.match(r"[IW]\d{4} ", line)
    ]
    assert not startup, stderr[-3000:]


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [
        ("src/shrinkflow/backends/torch", FRAMEWORKS["torch"]),
        ("src/shrinkflow/backends/tensorflow", FRAMEWORKS["tensorflow"]),
        ("src/shrinkflow/stages", set()),
        ("src/shrinkflow", set()),
        ("tests", FRAMEWORKS["torch"] | FRAMEWORKS["tensorflow"]),
    ],
)
def test_ruff_bans_every_framework_outside_its_backend(folder, allowed):
    """ruff's TID251 on a file importing every framework package, as if it were in ``folder``:
    the project's config bans them all, each backend's ruff.toml only the other framework's."""
    packages = FRAMEWORKS["torch"] | FRAMEWORKS["tensorflow"]
    source = "".join(f"import {package}\n" for package in sorted(packages))
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "--no-cache", "--select", "TID251", "--output-format",
         "json", "--stdin-filename", f"{folder}/boundary_probe.py", "-"],
        input=source, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    banned = {d["message"].split("`")[1] for d in json.loads(result.stdout)}
    assert banned == packages - allowed
