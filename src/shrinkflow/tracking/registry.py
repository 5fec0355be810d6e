"""The MLflow model registry: the report registers the model it recommends."""

from __future__ import annotations

from collections.abc import Mapping

from shrinkflow.errors import ShrinkflowError
from shrinkflow.tracking.sqlite import retry
from shrinkflow.tracking.store import existing_run, open_store
from shrinkflow.tracking.uri import tracking_uri


def register_model(
    cfg: dict,
    name: str,
    run_id: str,
    artifact_path: str,
    aliases: list[str],
    tags: Mapping[str, str],
    description: str,
) -> str:
    """Register the folder ``artifact_path`` of run ``run_id`` as a version of the registered
    model ``name`` and point ``aliases`` at it; returns the version.

    Re-running with the same run reuses its version (the registry gets no duplicates); an alias
    always moves to the newest choice.
    """
    from mlflow.exceptions import MlflowException

    client, _ = open_store(cfg)
    run = existing_run(client, run_id)
    if run is None:
        raise ShrinkflowError(
            f"report.registered_model: run {run_id} is not in the tracking store "
            f"{tracking_uri(cfg)}; report against the store the pipeline logged to, "
            "or set report.registered_model: null"
        )
    if not retry(lambda: client.list_artifacts(run_id, artifact_path)):
        raise ShrinkflowError(
            f"report.registered_model: run {run_id} has no artifact {artifact_path!r} to register"
        )
    try:
        retry(lambda: client.create_registered_model(name))
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    found = retry(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    same = [v for v in found if v.source == source]
    if same:
        version = max(same, key=lambda v: int(v.version)).version
    else:
        version = retry(lambda: client.create_model_version(name, source, run_id=run_id)).version
    for key, value in tags.items():
        retry(lambda key=key, value=value: client.set_model_version_tag(name, version, key, value))
    retry(lambda: client.update_model_version(name, version, description=description))
    for alias in aliases:
        retry(lambda alias=alias: client.set_registered_model_alias(name, alias, version))
    return str(version)
