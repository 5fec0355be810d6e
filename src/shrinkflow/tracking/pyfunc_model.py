"""The MLflow pyfunc of a registered shrinkflow model: uint8 images in, logits out.

``registry`` logs it as models-from-code (``python_model=`` this file's path): MLflow copies
this file into the model and runs it when the model loads, so loading unpickles nothing (MLflow
3.17 refuses cloudpickled models by default). The model's artifact ``model`` is the node's model
folder as its run logged it; the backend its node.json names loads it with the loader evaluate
uses (``backends/<backend>/predict.py``), on the CPU.

``predict`` takes a numpy array of uint8 pixels (N, H, W, C), 0..255, as ``data/prepared``
stores them (the model normalises them itself), and returns float32 logits (N, num_classes);
the class names are in the model's metadata (``classes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from shrinkflow.backends.base import backend_module
from shrinkflow.nodes import read_node

ARTIFACT = "model"  # the key of the model folder in the pyfunc's artifacts


class ShrinkflowModel(PythonModel):
    """A node's model folder, loaded by its backend."""

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts[ARTIFACT])
        backend = read_node(folder)["backend"]
        self._predictor = backend_module(backend, "predict").load_predictor(folder)

    # No type hints: MLflow reads them as the input schema, and can only express a list of
    # instances there; the signature says what it takes, one uint8 array. (MLflow warns
    # "Add type hints to the `predict` method" when the class is defined.)
    def predict(self, context, model_input, params=None):
        return self._predictor(np.asarray(model_input))


mlflow.models.set_model(ShrinkflowModel())
