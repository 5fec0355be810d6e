"""Import order for the whole test session: torch and torchvision before TensorFlow.

pytest imports every test module into one process, and the TensorFlow test modules sort before
the torch ones. Triton (loaded with torch) crashes when TensorFlow's bundled LLVM was loaded
first (DESIGN.md section 2), so torch goes first, whichever tests are selected.
"""

import os
from pathlib import Path

import pytest
import torch  # noqa: F401
import torchvision  # noqa: F401

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
