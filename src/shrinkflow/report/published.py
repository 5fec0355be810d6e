"""Published results to draw beside the run's curves, from references/published.yaml.

The file lists, with citations, results on the same data set and architecture as a run can
have (e.g. He et al.'s dense ResNet-20 on CIFAR-10): a reader sees at once whether the run's
baseline and pruned models are in the published range. It is checked against ``SCHEMA`` when
read, so a typo fails the report rather than silently dropping a reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from shrinkflow.errors import ShrinkflowError

PATH = Path(__file__).with_name("references") / "published.yaml"
KINDS = ("dense", "unstructured", "structured", "int8")

_FRACTION = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_TEXT = {"type": "string", "minLength": 1}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["references"],
    "properties": {
        "references": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["dataset", "model", "kind", "top1", "source", "citation"],
                "properties": {
                    # The CIFAR sets only: digits and imagefolder results are not comparable.
                    "dataset": {"enum": ["cifar10", "cifar100"]},
                    "model": _TEXT,
                    "kind": {"enum": list(KINDS)},
                    "top1": _FRACTION,
                    "baseline_top1": _FRACTION,
                    "sparsity": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                    "macs_reduction": {"type": "number", "exclusiveMinimum": 1},
                    "source": _TEXT,
                    "citation": _TEXT,
                    "note": _TEXT,
                },
                # What places a point on a curve: its sparsity or its MACs reduction.
                "allOf": [
                    {
                        "if": {"properties": {"kind": {"const": "unstructured"}}},
                        "then": {"required": ["sparsity"]},
                    },
                    {
                        "if": {"properties": {"kind": {"const": "structured"}}},
                        "then": {"required": ["macs_reduction"]},
                    },
                ],
            },
        }
    },
}


@dataclass(frozen=True)
class Reference:
    """One published result; fields as documented at the top of published.yaml."""

    dataset: str
    model: str
    kind: str  # one of KINDS
    top1: float  # test top-1, a fraction
    source: str  # short, for a legend
    citation: str  # authors, title, year, URL
    baseline_top1: float | None = None  # the source's own dense top-1, if it gives one
    sparsity: float | None = None  # unstructured: share of the weights that are zero
    macs_reduction: float | None = None  # structured: dense MACs / pruned MACs
    note: str | None = None

    @property
    def drop(self) -> float | None:
        """Top-1 lost against the source's own baseline (positive is worse), if it has one."""
        return None if self.baseline_top1 is None else self.baseline_top1 - self.top1


@functools.cache
def load(path: Path = PATH) -> tuple[Reference, ...]:
    """Every reference in ``path``, checked against ``SCHEMA``."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ShrinkflowError(f"{path}: cannot read the published references ({exc})") from None
    try:
        jsonschema.validate(document, SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise ShrinkflowError(f"{path}: {where}: {exc.message}") from None
    return tuple(Reference(**entry) for entry in document["references"])


def points(dataset: str, model: str, path: Path = PATH) -> list[Reference]:
    """The references on ``dataset`` (params.yaml data.name) for ``model``, in file order;
    none for a data set no one publishes on (digits, an image folder)."""
    return [r for r in load(path) if r.dataset == dataset and r.model == model]
