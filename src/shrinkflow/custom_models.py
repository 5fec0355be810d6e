"""Models outside the registry: params' ``custom_models`` maps a model name to its factory.

::

    models: [resnet20, small_cnn]
    custom_models:
      small_cnn: "mypkg.nets:build_small_cnn"          # one factory for every backend
      # small_cnn: {torch: "mypkg.nets:torch_cnn", tensorflow: "models.py:keras_cnn"}

A factory ref is ``module.path:callable`` (importable with the project folder, the working
directory every job runs in, first on ``sys.path``) or ``relative/file.py:callable`` (a file
under the project folder). A plain string serves every backend; a mapping gives one ref per
backend, and a backend without one does not build the model (``builds_on``).

The factory is called as ``factory(num_classes=..., in_channels=..., image_size=...)``, plus
``backend="torch"``/``"tensorflow"`` when its signature names a ``backend`` parameter, and
returns the backend's model (``backends/<backend>/models.py`` checks what it returned).

Framework-free: config validation (``check``) imports no framework and no user code. It checks
names and refs, and finds a module with the import system's finders without executing it (nor
its parent packages); ``load_factory`` imports it, in the job that builds the model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shrinkflow.backends.base import BACKENDS, REGISTRY_MODELS
from shrinkflow.errors import ShrinkflowError

NAME = re.compile(r"[a-z][a-z0-9_]*")  # one path component in results/models/<backend>/<name>
FACTORY_ARGS = ("num_classes", "in_channels", "image_size")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*")
_ATTRIBUTE = re.compile(_IDENTIFIER)
_REF_FORMS = "module.path:callable or relative/file.py:callable"


def entries(cfg: Mapping) -> Mapping[str, Any]:
    """``custom_models`` of ``cfg`` (absent or null: none)."""
    return cfg.get("custom_models") or {}


def factory_ref(cfg: Mapping, backend: str, name: str) -> str | None:
    """The factory ref that builds custom model ``name`` on ``backend``; None when ``name`` is
    not a custom model or its per-backend mapping has no ref for ``backend``."""
    entry = entries(cfg).get(name)
    if isinstance(entry, Mapping):
        return entry.get(backend)
    return entry


def builds_on(cfg: Mapping, backend: str, name: str) -> bool:
    """Whether ``backend`` can build model ``name``: a registry model of that backend, or a
    custom model with a factory for it."""
    return name in REGISTRY_MODELS[backend] or factory_ref(cfg, backend, name) is not None


def check_buildable(cfg: Mapping, backend: str, name: str, key: str = "--model") -> None:
    """A one-line ShrinkflowError naming ``key`` unless ``backend`` builds model ``name``."""
    if backend not in REGISTRY_MODELS:
        raise ShrinkflowError(f"backend: {backend!r} is not one of {', '.join(REGISTRY_MODELS)}")
    if builds_on(cfg, backend, name):
        return
    if name in entries(cfg):
        raise ShrinkflowError(
            f"{key}: custom model {name!r} has no {backend} factory in custom_models.{name}"
        )
    raise ShrinkflowError(
        f"{key}: {name!r} is neither a {backend} registry model "
        f"({', '.join(REGISTRY_MODELS[backend])}) nor a custom_models key"
    )


def check(cfg: Mapping, project: Path | None = None) -> None:
    """Validate ``custom_models`` (a one-line ShrinkflowError naming ``custom_models.<name>``):
    names, and refs whose module or file exists under ``project`` (default: the working
    directory). Imports nothing."""
    project = Path.cwd() if project is None else Path(project)
    registry = sorted(set().union(*REGISTRY_MODELS.values()))
    for name, entry in entries(cfg).items():
        key = f"custom_models.{name}"
        if not NAME.fullmatch(name):
            raise ShrinkflowError(
                f"{key}: {name!r} is not a model name (lower-case letters, digits and _, "
                "starting with a letter)"
            )
        if name in registry:
            raise ShrinkflowError(
                f"{key}: {name!r} is a registry model's name; give the custom model another"
            )
        refs = entry if isinstance(entry, Mapping) else dict.fromkeys(BACKENDS, entry)
        for backend, ref in refs.items():
            check_ref(ref, key if isinstance(entry, str) else f"{key}.{backend}", project)


def check_ref(ref: str, key: str, project: Path) -> None:
    """``ref`` is well formed and names an existing module or project file (not imported)."""
    target, attribute = _split(ref, key)
    if target.endswith(".py"):
        path = Path(target)
        if path.is_absolute():
            raise ShrinkflowError(
                f"{key}: {target} is an absolute path (give the file relative to the project "
                "folder, so the project runs wherever it is copied)"
            )
        if not (project / path).is_file():
            raise ShrinkflowError(f"{key}: file {target} not found (in {project})")
    elif not _module_exists(target, project):
        raise ShrinkflowError(
            f"{key}: module {target!r} not found (on the project folder or the Python path)"
        )


def _split(ref: Any, key: str) -> tuple[str, str]:
    """``ref`` as (module path or file, attribute name)."""
    target, sep, attribute = str(ref).rpartition(":")
    well_formed = isinstance(ref, str) and sep and _ATTRIBUTE.fullmatch(attribute)
    if well_formed and (target.endswith(".py") or _MODULE.fullmatch(target)):
        return target, attribute
    raise ShrinkflowError(f"{key}: {ref!r} is not a factory ref ({_REF_FORMS})")


def _module_exists(dotted: str, project: Path) -> bool:
    """Whether ``dotted`` is importable, found package by package with the import system's
    finders so that nothing (not even a parent package's ``__init__``) is executed."""
    parts = dotted.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0], [str(project)])
    if spec is None:
        spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return False
        name = ".".join(parts[: i + 1])
        spec = importlib.machinery.PathFinder.find_spec(name, list(spec.submodule_search_locations))
    return spec is not None


def load_factory(ref: str, key: str, project: Path | None = None) -> Callable[..., Any]:
    """Import the callable ``ref`` names (``key``: ``custom_models.<name>``, for errors) and
    check that it takes the factory keywords; a one-line ShrinkflowError otherwise."""
    project = Path.cwd() if project is None else Path(project)
    target, attribute = _split(ref, key)
    module = _import(target, key, project)
    if not hasattr(module, attribute):
        raise ShrinkflowError(f"{key}: {target} has no attribute {attribute!r}")
    factory = getattr(module, attribute)
    if not callable(factory):
        raise ShrinkflowError(
            f"{key}: {ref} is not callable (it is of type {type(factory).__name__})"
        )
    missing, required = signature_problems(factory)
    call = f"f({'=..., '.join(FACTORY_ARGS)}=...), plus backend=... if it names one"
    if missing:
        raise ShrinkflowError(
            f"{key}: {ref} takes no {', '.join(missing)} keyword (a factory is called as {call})"
        )
    if required:
        raise ShrinkflowError(
            f"{key}: {ref} requires {', '.join(map(repr, required))}, which is never passed "
            f"(a factory is called as {call})"
        )
    return factory


def signature_problems(factory: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """The factory keywords ``factory`` cannot take, and its required parameters that are
    none of them (nor ``backend``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call say
        return [], []
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    keywordable = {
        n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    missing = [] if takes_any else [a for a in FACTORY_ARGS if a not in keywordable]
    required = [
        n
        for n, p in parameters.items()
        if n not in (*FACTORY_ARGS, "backend")
        and p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return missing, required


def build(
    ref: str, key: str, backend: str, num_classes: int, in_channels: int, image_size: int
) -> Any:
    """Call the factory ``ref`` names for ``backend``; what it returns is the backend's to
    check. An exception inside the factory becomes a one-line error naming ``key``."""
    factory = load_factory(ref, key)
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
    }
    with contextlib.suppress(TypeError, ValueError):  # no signature (a builtin): no backend=
        if "backend" in inspect.signature(factory).parameters:
            kwargs["backend"] = backend
    try:
        return factory(**kwargs)
    except Exception as exc:  # the user's code: any exception, reported on one line
        raise ShrinkflowError(f"{key}: {ref} raised {one_line(exc)}") from None


def _import(target: str, key: str, project: Path) -> Any:
    """The module a ref names: a project file (loaded under a private module name) or a
    module path, with the project folder first on ``sys.path``."""
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))
    try:
        if not target.endswith(".py"):
            return importlib.import_module(target)
        path = (project / target).resolve()
        if not path.is_file():
            raise ShrinkflowError(f"{key}: file {target} not found (in {project})")
        name = "shrinkflow_custom_" + re.sub(r"\W", "_", target.removesuffix(".py"))
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as an import would: dataclasses and pickling look here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    except ShrinkflowError:
        raise
    except Exception as exc:  # the user's module: any exception at import, on one line
        raise ShrinkflowError(f"{key}: importing {target} failed ({one_line(exc)})") from None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception from user code."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
