"""The MLflow model registry: the report registers the models it recommends, as models MLflow
loads (``mlflow.pyfunc.load_model("models:/<name>-<backend>@champion")``).

A registered version is an MLflow 3 LoggedModel linked to the run that wrote the node: a pyfunc
(``pyfunc_model``, logged as code, so loading it unpickles nothing) whose artifact ``model`` is
the node's model folder as that run logged it, with a signature (uint8 images (N, H, W, C) in,
float32 logits out), the shrinkflow package as code and its pinned requirements.

One registered name per backend, ``<report.registered_model>-<backend>``: the versions of one
name load with the same requirements and run in the same framework (a torch ``.pt``, ``.pt2``
or fixed-point file; a Keras, fixed-point or TFLite file). An alias (``champion``,
``fastest``) names the report's one choice across backends, so it is set on the chosen node's
name and taken off the other backends' names (and off the bare name, where an older shrinkflow
registered every format under it): ``models:/<name>-<backend>@champion`` resolves for exactly
one backend.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import requires
from pathlib import Path
from typing import TYPE_CHECKING

import shrinkflow
from shrinkflow.backends.base import BACKENDS, backend_module
from shrinkflow.errors import ShrinkflowError
from shrinkflow.nodes import read_node
from shrinkflow.tracking.sqlite import retry
from shrinkflow.tracking.store import existing_run, open_store
from shrinkflow.tracking.uri import tracking_uri

ENV_VAR = "MLFLOW_TRACKING_URI"

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import RegisteredModel
    from mlflow.models import ModelSignature

    from shrinkflow.backends.predictor import Predictor


def registered_name(name: str, backend: str) -> str:
    """The registered model that holds ``backend``'s versions of ``report.registered_model``."""
    return f"{name}-{backend}"


def register_model(
    cfg: dict,
    name: str,
    run_id: str,
    aliases: list[str],
    tags: Mapping[str, str],
    description: str,
) -> tuple[str, str]:
    """Register the model folder (artifact ``model``) of run ``run_id`` under
    ``<name>-<backend>`` and point ``aliases`` at it; returns the registered name and version.

    The folder is loaded and run on a batch before it is logged, so a version that would not
    load is never registered. Re-running with the same run reuses its version (the registry
    gets no duplicates); an alias always moves to the newest choice.
    """
    from shrinkflow.tracking import pyfunc_model  # imports MLflow

    client, _ = open_store(cfg)
    run = existing_run(client, run_id)
    if run is None:
        raise ShrinkflowError(
            f"report.registered_model: run {run_id} is not in the tracking store "
            f"{tracking_uri(cfg)}; report against the store the pipeline logged to, "
            "or set report.registered_model: null"
        )
    if not retry(lambda: client.list_artifacts(run_id, pyfunc_model.ARTIFACT)):
        raise ShrinkflowError(
            f"report.registered_model: run {run_id} has no artifact "
            f"{pyfunc_model.ARTIFACT!r} to register"
        )
    with tempfile.TemporaryDirectory(prefix="shrinkflow-register-") as tmp:
        folder = Path(retry(lambda: client.download_artifacts(run_id, pyfunc_model.ARTIFACT, tmp)))
        backend = read_node(folder)["backend"]
        registered = registered_name(name, backend)
        _create_registered_model(client, registered, backend)
        version = _logged_version(client, registered, run_id)
        if version is None:
            version = _log_and_register(client, registered, run, folder, backend)
    for key, value in tags.items():
        retry(
            lambda key=key, value=value: client.set_model_version_tag(
                registered, version, key, value
            )
        )
    retry(lambda: client.update_model_version(registered, version, description=description))
    others = [name, *(registered_name(name, b) for b in BACKENDS if b != backend)]
    for alias in aliases:
        retry(lambda alias=alias: client.set_registered_model_alias(registered, alias, version))
        for other in others:
            _drop_alias(client, other, alias)
    return registered, version


def _create_registered_model(client: MlflowClient, registered: str, backend: str) -> None:
    """Create the registered model ``registered`` unless it exists."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    description = (
        f"shrinkflow's {backend} models, as MLflow pyfunc models: predict takes uint8 images "
        "(N, H, W, C), 0..255, and returns float32 logits (N, classes). The alias `champion` "
        "(and `fastest`) is on this model only while the report's choice is a "
        f"{backend} model."
    )
    try:
        retry(lambda: client.create_registered_model(registered, description=description))
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _logged_version(client: MlflowClient, registered: str, run_id: str) -> str | None:
    """The version of ``registered`` already logged as a pyfunc from run ``run_id``, if any."""
    found = retry(
        lambda: client.search_model_versions(f"name = '{registered}' and run_id = '{run_id}'")
    )
    # A pyfunc's version has a LoggedModel as its source (models:/m-...); an older shrinkflow
    # registered the run's folder itself, which MLflow cannot load.
    ready = [v for v in found if v.source.startswith("models:/") and v.status == "READY"]
    return str(max(ready, key=lambda v: int(v.version)).version) if ready else None


def _log_and_register(
    client: MlflowClient, registered: str, run: Run, folder: Path, backend: str
) -> str:
    """Log ``folder`` as a pyfunc LoggedModel of ``run`` (in its experiment, as one of its
    outputs) and register it as a new version of ``registered``; returns the version.

    MLflow's ``log_model`` does the same steps but on the process-wide tracking URI and active
    experiment; done with the client, the store is the one ``cfg`` names and the process's
    MLflow settings are left alone.
    """
    import mlflow
    import numpy as np
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from shrinkflow.tracking import pyfunc_model

    predictor = backend_module(backend, "predict").load_predictor(folder)
    _check_predicts(predictor, folder)
    run_id = run.info.run_id
    logged = retry(
        lambda: client.create_logged_model(
            run.info.experiment_id,
            name=registered,
            source_run_id=run_id,
            tags={"shrinkflow.backend": backend, "shrinkflow.arch": predictor.spec["arch"]},
        )
    )
    try:
        with tempfile.TemporaryDirectory(prefix="shrinkflow-pyfunc-") as tmp:
            local = Path(tmp) / "pyfunc"
            mlflow.pyfunc.save_model(
                local,
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    run_id=run_id,
                    model_uuid=logged.model_id,
                    model_id=logged.model_id,
                    metadata={
                        "classes": list(predictor.spec["classes"]),
                        "input": "uint8 images (N, H, W, C), 0..255, unnormalised",
                        "output": "float32 logits (N, classes)",
                    },
                ),
                python_model=pyfunc_model.__file__,  # models-from-code: nothing pickled
                artifacts={pyfunc_model.ARTIFACT: str(folder)},
                code_paths=[str(Path(shrinkflow.__file__).parent)],
                pip_requirements=_requirements(),
                signature=_signature(predictor),
                # one black image: the serving example `mlflow models serve` users start from
                input_example=np.zeros((1, *predictor.input_shape), np.uint8),
            )
            for cache in local.rglob("__pycache__"):
                shutil.rmtree(cache)
            retry(lambda: client.log_model_artifacts(logged.model_id, str(local)))
        retry(lambda: client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)]))
    except BaseException:
        retry(lambda: client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED))
        raise
    retry(lambda: client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY))
    source = f"models:/{logged.model_id}"
    # MLflow 3.17's SQL registry looks the LoggedModel of a models:/ source up through the
    # process-wide tracking URI, not this client's (its create_model_version notes the gap):
    # point that at this store for the one call.
    with _process_tracking_uri(client.tracking_uri):
        created = retry(
            lambda: client.create_model_version(
                registered, source, run_id=run_id, model_id=logged.model_id
            )
        )
    return str(created.version)


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for a block, then put back as it was,
    ``$MLFLOW_TRACKING_URI`` included: MLflow's own ``_use_tracking_uri`` unsets that variable
    on the way out when nothing had called ``set_tracking_uri`` before, and every later
    ``tracking_uri(cfg)`` of this process would then fall back to ./mlflow.db."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get(ENV_VAR)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def _check_predicts(predictor: Predictor, folder: Path) -> None:
    """Two images through the model: finite logits of the spec's classes, or an error."""
    import numpy as np

    out = predictor(np.zeros((2, *predictor.input_shape), np.uint8))
    if out.shape != (2, predictor.spec["num_classes"]) or not np.isfinite(out).all():
        raise ShrinkflowError(
            f"report.registered_model: {folder.name} of its run predicts logits of shape "
            f"{out.shape} (finite: {bool(np.isfinite(out).all())}), not (2, "
            f"{predictor.spec['num_classes']}); re-run the stage that wrote it"
        )


def _signature(predictor: Predictor) -> ModelSignature:
    """uint8 (-1, H, W, C) in, float32 (-1, classes) out: MLflow checks the input against it."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *predictor.input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, predictor.spec["num_classes"]))]),
    )


def _requirements() -> list[str]:
    """shrinkflow's own pinned requirements (not its optional extras): the environment the
    model was registered from, for ``mlflow models`` to rebuild."""
    return [r for r in requires("shrinkflow") or [] if "extra ==" not in r]


def _drop_alias(client: MlflowClient, name: str, alias: str) -> None:
    """Take ``alias`` off the registered model ``name`` where it is set there."""
    model = _registered_model(client, name)
    if model is not None and alias in model.aliases:
        retry(lambda: client.delete_registered_model_alias(name, alias))


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return retry(lambda: client.get_registered_model(name))
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
