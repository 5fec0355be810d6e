"""Both backends offer every job module of ``backends.base.JOB_MODULES`` with its functions,
parameters in the same order and by the same names, so that the twins can be read side by side
and a stage calls either one the same way.

Read from the source with ``ast``: no framework is imported.
"""

import ast
import functools
from pathlib import Path

import pytest

from shrinkflow.backends.base import BACKENDS, JOB_MODULES

SRC = Path(__file__).resolve().parents[1] / "src"


@functools.cache
def module_functions(module: str) -> dict[str, list[tuple[str, bool]]]:
    """The top-level functions of ``module`` (names a ``from`` import brings in included), each
    as its parameters: (name, has a default)."""
    path = SRC / module.replace(".", "/")
    tree = ast.parse(
        (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
    )
    found: dict[str, list[tuple[str, bool]]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args)]
            defaults = [False] * (len(names) - len(args.defaults)) + [True] * len(args.defaults)
            keywords = zip(args.kwonlyargs, args.kw_defaults, strict=True)
            keyword = [(a.arg, d is not None) for a, d in keywords]
            found[node.name] = [*zip(names, defaults, strict=True), *keyword]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shrinkflow."):
            for alias in node.names:
                source = module_functions(node.module).get(alias.name)
                if source is not None:
                    found[alias.asname or alias.name] = source
    return found


@pytest.mark.parametrize("job", JOB_MODULES)
def test_both_backends_offer_each_job_function_with_the_same_parameters(job):
    """Each function's parameters are the same on every backend (one backend may add some
    with defaults, e.g. torch's device), names and order alike."""
    offered = {b: module_functions(f"shrinkflow.backends.{b}.{job}") for b in BACKENDS}
    for name in JOB_MODULES[job]:
        for backend, functions in offered.items():
            assert name in functions, f"backends/{backend}/{job}.py has no {name}()"
        required = {b: [p for p, default in f[name] if not default] for b, f in offered.items()}
        first, *others = BACKENDS
        for backend in others:
            assert required[backend] == required[first], (
                f"{job}.{name}(): {first} takes {required[first]}, {backend} {required[backend]}"
            )
