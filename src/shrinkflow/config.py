"""Load params.yaml, merge presets and overrides over it, and validate the result.

The JSON Schema in workflow/schemas/params.schema.yaml is the single definition of what is
allowed; this module turns its verdict into one line that names the key path and the allowed
values, e.g. ``prune.sparsities[2]: 1.5 is not in [0, 1)``. Snakemake (at start-up) and every CLI
command validate through ``validate_params`` so the two can never disagree.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from shrinkflow import per_backend
from shrinkflow.errors import ShrinkflowError
from shrinkflow.quantization import parse_quant_method

SCHEMA_PATH = Path(__file__).with_name("schemas") / "params.schema.yaml"
# The params file every run starts from, in the project folder (the working directory).
BASE_PARAMS = Path("params.yaml")


class MissingKeyError(ShrinkflowError):
    """A config lacks a required key: often a preset (configs/*.yaml) read without the
    params.yaml it is written to be merged over."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: Path) -> Any:
    """Parse one YAML file; a missing or malformed file is a one-line error naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ShrinkflowError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ShrinkflowError(f"{path}:{where} is not valid YAML ({problem})") from None


def merge(base: dict, override: Mapping) -> dict:
    """Deep-merge ``override`` into a copy of ``base``: mappings merge, everything else replaces.

    The same rule as Snakemake's ``--configfile``, so the CLI sees what the Snakefile sees.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(cfg: dict, assignment: str) -> dict:
    """Apply one ``key.path=value`` override; the value is YAML (``2``, ``[1, 2]``, ``null``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ShrinkflowError(f"--set {assignment!r}: expected key.path=value, e.g. train.epochs=3")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw else None
    except yaml.YAMLError:
        raise ShrinkflowError(f"--set {key}: {raw!r} is not a YAML value") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return merge(cfg, nested)


def load_params(files: Sequence[Path], overrides: Iterable[str] = ()) -> dict:
    """Merge ``files`` in order (later wins), then ``overrides``, and validate the result."""
    if not files:
        raise ShrinkflowError("--params: at least one params file is required (e.g. params.yaml)")
    cfg: dict = {}
    for path in files:
        content = read_yaml(path)
        if content is None:  # as Snakemake refuses an empty --configfile
            raise ShrinkflowError(f"{path}: empty (expected a mapping of keys at the top level)")
        if not isinstance(content, Mapping):
            raise ShrinkflowError(f"{path}: expected a mapping of keys at the top level")
        cfg = merge(cfg, content)
    for assignment in overrides:
        cfg = apply_override(cfg, assignment)
    validate_params(cfg)
    return cfg


def over_base_params(files: Sequence[Path], base: Path = BASE_PARAMS) -> list[Path]:
    """``base`` (when it exists), then ``files``: the files a run with these presets reads, as
    Snakemake merges each ``--configfile`` over params.yaml and hands every job
    ``--params params.yaml --params <preset>``. ``files`` as they are if they list ``base``."""
    paths = [Path(path) for path in files]
    if not base.is_file() or any(path.resolve() == base.resolve() for path in paths):
        return paths
    return [base, *paths]


@cache
def schema() -> dict:
    return read_yaml(SCHEMA_PATH)


def validate_params(cfg: Mapping) -> None:
    """Raise ShrinkflowError with one line for the first problem in ``cfg`` (by key path).

    First one walk over every key and value (``check_plain_values``: text keys, finite numbers,
    plain JSON types), then the schema, then the rules that involve several keys.
    """
    check_plain_values(cfg)
    errors = sorted(
        _validator()(schema()).iter_errors(cfg),
        key=lambda e: (_key_path(e.absolute_path), e.validator != "additionalProperties"),
    )
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        error = MissingKeyError if errors[0].validator == "required" else ShrinkflowError
        raise error(describe(errors[0]) + more)
    _check_cross_keys(cfg)


def _check_cross_keys(cfg: Mapping) -> None:
    """Rules that JSON Schema would only express cryptically: ones that involve several keys,
    and quantization method names, whose grammar (``fixed_w<bits>``) lives in one module."""
    data = cfg["data"]
    if data["name"] == "imagefolder" and not data["root"]:
        raise ShrinkflowError(
            "data.root: required when data.name is imagefolder "
            "(a folder with one sub-folder of images per class)"
        )
    from shrinkflow import custom_models

    custom_models.check(cfg)  # names and factory refs, before models[] may name them
    _check_per_backend(cfg)
    if (
        "structured_sensitivity" in per_backend.union(cfg, "prune.methods")
        and not cfg["sensitivity"]["ratios"]
    ):
        raise ShrinkflowError(
            "sensitivity.ratios: empty, but prune.methods has structured_sensitivity, "
            "which takes its per-layer ratios from the sensitivity analysis"
        )
    train = cfg["train"]
    processes = train["distributed"]["processes"]
    if train["batch_size"] % processes:
        raise ShrinkflowError(
            f"train.distributed.processes: {processes} does not divide train.batch_size "
            f"{train['batch_size']} (the global batch, split evenly over the processes)"
        )
    # The store every job will log to: tracking.uri, else $MLFLOW_TRACKING_URI (both checked).
    from shrinkflow.tracking import tracking_uri

    tracking_uri(cfg)


def _check_per_backend(cfg: Mapping) -> None:
    """``models``, ``prune.methods`` and ``quantize.methods`` (shrinkflow.per_backend): a mapping
    names exactly the listed backends; each entry exists on the backend it is listed for."""
    from shrinkflow.backends.base import check_prune_method, check_quant_method
    from shrinkflow.custom_models import check_buildable

    backends = cfg["backends"]
    for key in per_backend.KEYS:
        if not per_backend.is_per_backend(cfg, key):
            continue
        named = per_backend.value(cfg, key)
        for backend in backends:
            if backend not in named:
                raise ShrinkflowError(
                    f"{key}: no list for {backend}, which backends lists (a per-backend "
                    f"mapping names every listed backend; give it one or drop it from backends)"
                )
        for backend in named:
            if backend not in backends:
                raise ShrinkflowError(f"{key}.{backend}: {backend} is not in backends")
    checks: dict[str, Callable[[str, str, str], None]] = {
        "models": lambda backend, name, key: check_buildable(cfg, backend, name, key),
        "prune.methods": check_prune_method,
        "quantize.methods": check_quant_method,
    }
    for key, check in checks.items():
        for backend in backends:
            for i, name in enumerate(per_backend.entries(cfg, key, backend)):
                where = per_backend.key_path(cfg, key, backend, i)
                if key == "quantize.methods":
                    parse_quant_method(name, key=where)  # a malformed name, whatever the backend
                try:
                    check(backend, name, where)
                except ShrinkflowError as exc:
                    if per_backend.is_per_backend(cfg, key) or not any(
                        _passes(check, other, name, where) for other in backends if other != backend
                    ):
                        raise
                    raise ShrinkflowError(
                        f"{exc}; a list applies to every listed backend: for an entry one "
                        f"backend lacks, write {key} per backend, {{torch: [...], "
                        "tensorflow: [...]}"
                    ) from None


def _passes(check: Callable[[str, str, str], None], backend: str, name: str, key: str) -> bool:
    try:
        check(backend, name, key)
    except ShrinkflowError:
        return False
    return True


def check_plain_values(cfg: Any, where: str = "") -> None:
    """One walk over every key and value of a loaded config, whatever the schema says of it.

    Raises ShrinkflowError naming the key path of the first: key that is not text (YAML reads
    ``1:`` as an int and ``on:`` as a bool, and mixing them with text keys breaks sorting);
    float that is NaN or infinite (YAML's ``.nan`` and ``.inf``: no parameter means either, and
    one NaN learning rate trains a NaN model); value of a type JSON has not (a date, bytes, a
    set), which could be neither validated as text nor passed on to a job with ``--set``.
    """
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            if not isinstance(key, str):
                raise ShrinkflowError(
                    f"{where or 'params'}: key {key!r} is not text (YAML reads unquoted numbers, "
                    "true/false/yes/no/on/off and dates as other types; quote it)"
                )
            check_plain_values(value, f"{where}.{key}" if where else key)
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            check_plain_values(value, f"{where}[{i}]")
    elif isinstance(cfg, float):
        if not math.isfinite(cfg):
            raise ShrinkflowError(f"{where}: {cfg} is not a finite number")
    elif not (cfg is None or isinstance(cfg, str | bool | int)):
        raise ShrinkflowError(
            f"{where}: {cfg} is read by YAML as a {_type_name(cfg)}; quote it to give text"
        )


def _type_name(value: Any) -> str:
    import datetime

    if isinstance(value, datetime.datetime):
        return "timestamp"
    if isinstance(value, datetime.date):
        return "date"
    return type(value).__name__


@cache
def _validator() -> type:
    """Draft 2020-12 with a strict ``integer``: JSON Schema counts 16.0 as an integer, but
    ``range(16.0)`` and ``torch.zeros(16.0)`` fail mid-run, so only an int (not a bool) is one."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return validators.extend(Draft202012Validator, type_checker=checker)


def _key_path(path: Iterable) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe(error: Any) -> str:
    """One line for a jsonschema error: ``<key path>: <what is wrong and what is allowed>``."""
    where = _key_path(error.absolute_path) or "params"
    schema_ = error.schema
    value = error.instance
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema_.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        return f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})"
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return f"{where}: missing key {missing[0]!r}"
    if kind == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{where}: {value!r} is not one of {allowed}"
    if kind == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return f"{where}: {value!r} is not of type {wanted}"
    if kind in {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        # An upper bound says why it is there (its description's first sentence).
        why = schema_.get("description", "").split(". ")[0].rstrip(".") if kind == "maximum" else ""
        return f"{where}: {value!r} is not in {_interval(schema_)}" + (f" ({why})" if why else "")
    if kind == "minItems":
        return f"{where}: needs at least {error.validator_value} item(s)"
    if kind == "uniqueItems":
        return f"{where}: {value!r} has duplicate items"
    if kind == "minLength":
        return f"{where}: must not be empty"
    if kind == "pattern":
        return f"{where}: {value!r} does not match {error.validator_value!r}"
    return f"{where}: {error.message}"


def _interval(schema_: Mapping) -> str:
    if "exclusiveMinimum" in schema_:
        low = f"({schema_['exclusiveMinimum']}"
    else:
        low = f"[{schema_['minimum']}" if "minimum" in schema_ else "(-inf"
    if "exclusiveMaximum" in schema_:
        high = f"{schema_['exclusiveMaximum']})"
    else:
        high = f"{schema_['maximum']}]" if "maximum" in schema_ else "inf)"
    return f"{low}, {high}"
