"""Import order for the whole test session: torch and torchvision before TensorFlow.

pytest imports every test module into one process, and the TensorFlow test modules sort before
the torch ones. Triton (loaded with torch) crashes when TensorFlow's bundled LLVM was loaded
first (DESIGN.md section 2), so torch goes first, whichever tests are selected.
"""

import os
from pathlib import Path

# One OpenMP thread in this process and in every process a test starts (DAG jobs included),
# before torch loads libgomp: the suite runs two xdist workers, each often with a DAG job beside
# it, on two cores. A 2-thread torch process that shares its cores spins in libgomp's barriers:
# measured, three 2-thread training processes at once took 8-11 s of CPU each where 1-thread
# ones took 1.7 s. What a test checks does not depend on the thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402, F401
import torchvision  # noqa: E402, F401

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot needs Keras 2 (as the Makefile sets)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated MLflow sqlite database without experiments, to copy: creating the schema takes
    seconds, copying it does not."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}")
    return db


# The whole-DAG modules, longest first (docs/testing.md has their times). Under pytest-xdist's
# ``--dist loadfile`` a module is one unit of work, handed out in collection order (pyproject's
# ``--no-loadscope-reorder``); longest first keeps either worker from being left alone with a
# long module at the end. A slow module not named here starts after these.
LONGEST_FIRST = (
    "test_pipeline_e2e",
    "test_presets",
    "test_pipeline_tf_e2e",
    "test_report_mlflow_server",
    "test_slurm",
    "test_crash_recovery",
    "test_custom_models",  # a CLI chain per backend: minutes, though no Snakemake DAG
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with whole-DAG runs (marked slow) first, the longest of them first (LONGEST_FIRST),
    each module's tests kept together and in order; the quick modules fill the gaps at the end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        name = item.module.__name__
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (name not in slow_modules)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def torch_digits_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(model folder, PreparedData): a torch resnet20 trained for two epochs on the 8x8 digits
    (``torch_prune_fixtures.train_baseline``), once per session (per xdist worker) for every
    module that prunes, fine-tunes or quantizes it. Read only: a test that changes the model
    works on a copy."""
    from torch_prune_fixtures import train_baseline

    return train_baseline(tmp_path_factory.mktemp("torch-digits"))


@pytest.fixture(scope="session")
def tf_digits_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(model folder, PreparedData): a Keras resnet20 trained for three epochs on the 8x8 digits
    (``tf_fixtures.trained_baseline``), once per session (per xdist worker) for every TensorFlow
    module that converts, measures, analyses or prunes it. Read only: a test that changes the
    model works on a copy."""
    from tf_fixtures import DATA, trained_baseline

    return trained_baseline(tmp_path_factory.mktemp("tf-digits") / "baseline"), DATA


@pytest.fixture(scope="session")
def tf_digits_conversions(tf_digits_baseline, tmp_path_factory: pytest.TempPathFactory):
    """``method -> (folder, facts)``: the TFLite conversions of ``tf_digits_baseline``, each
    made once per session when first asked for (read only)."""
    from tf_fixtures import Conversions

    return Conversions(*tf_digits_baseline, tmp_path_factory.mktemp("tf-digits-tflite"))


@pytest.fixture(autouse=True)
def _onednn_choice_stays_in_its_test():
    """A stage run in the test process that trains a filter-pruned or custom TensorFlow model
    sets TF_ENABLE_ONEDNN_OPTS=0 (backends.base.use_safe_training_kernels) for its own process,
    as a job would; here the variable is put back after each test, so that a worker process a
    later test starts (a kill-and-resume test) trains with the same kernels as its reference."""
    from shrinkflow.backends.base import ONEDNN_ENV

    before = os.environ.get(ONEDNN_ENV)
    yield
    if before is None:
        os.environ.pop(ONEDNN_ENV, None)
    else:
        os.environ[ONEDNN_ENV] = before
