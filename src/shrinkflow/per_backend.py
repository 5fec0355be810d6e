"""The params lists that may differ per backend: ``models``, ``prune.methods``,
``quantize.methods``.

Each is either a list, which applies to every listed backend (each entry must exist on each of
them), or a mapping from backend to list, for an entry that exists on one backend only (a
TFLite float conversion, a model whose factory builds for one framework)::

    quantize:
      methods:
        torch: [static_int8, fixed_w4]
        tensorflow: [static_int8, fixed_w4, float16]

A mapping names every listed backend and no other (``shrinkflow.config`` checks), so the DAG is
the union of one product per backend. Every reader of these keys goes through ``entries``.

Imports nothing heavy: the Snakefile and dvc.yaml's generator load it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Each key, and the DAG field (stage_table's path fields) its entries fill.
KEYS: dict[str, str] = {
    "models": "model",
    "prune.methods": "method",
    "quantize.methods": "qmethod",
}


def value(cfg: Mapping, key: str) -> Any:
    """The raw value of dotted ``key`` (a list or a per-backend mapping)."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def is_per_backend(cfg: Mapping, key: str) -> bool:
    """Whether ``key`` is written as a mapping from backend to list."""
    return isinstance(value(cfg, key), Mapping)


def entries(cfg: Mapping, key: str, backend: str) -> list:
    """``key``'s list for ``backend``: the list itself, or the backend's entry of a mapping
    (empty when the mapping has none)."""
    raw = value(cfg, key)
    if isinstance(raw, Mapping):
        return list(raw.get(backend) or [])
    return list(raw)


def union(cfg: Mapping, key: str) -> list:
    """Every entry of ``key`` over the listed backends, once each, in first-seen order."""
    seen: dict = {}
    for backend in cfg["backends"]:
        for entry in entries(cfg, key, backend):
            seen.setdefault(entry, None)
    return list(seen)


def key_path(cfg: Mapping, key: str, backend: str, index: int) -> str:
    """How an error names one entry: ``prune.methods[1]`` or ``prune.methods.torch[1]``."""
    if is_per_backend(cfg, key):
        return f"{key}.{backend}[{index}]"
    return f"{key}[{index}]"


def per_backend_fields(cfg: Mapping) -> frozenset[str]:
    """The DAG fields whose lists differ per backend in ``cfg`` (dvc.yaml splits their stages
    per backend)."""
    return frozenset(field for key, field in KEYS.items() if is_per_backend(cfg, key))
