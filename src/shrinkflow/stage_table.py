"""The stage table: the one place that says, per DAG stage, its `shrinkflow` sub-command, the
paths it reads and writes, the params keys it reads and the code it runs.

Both DAG files are fed from it: the Snakemake rules (workflow/rules/*.smk) take their path
patterns, `params:` and shell commands from ``snakemake_rule``; dvc.yaml is written by
``shrinkflow dvc-yaml`` (shrinkflow.dvc_yaml) and committed, and a test fails when the committed
file differs. The resume fingerprint of a training job hashes exactly ``read_params`` of its
stage (shrinkflow.training.resume.job_fingerprint).

A path template names its fields in braces: ``{dataset}`` (data.name), ``{backend}``,
``{model}``, ``{seed}`` (a ``seeds`` entry: the training seed, a folder level below the model),
``{method}`` and ``{sparsity}`` (a pruning sweep point), ``{qmethod}`` (a ``quantize.methods``
entry), and ``{node}`` / ``{source}``: a float model's folder below
results/models/<backend>/<model>/seed<k> (``baseline`` or ``finetuned/{method}/{sparsity}``),
one Snakemake wildcard but one DVC stage per alternative (DVC's matrix cannot alternate).

Only prepare reads params' ``seed`` (the split's). Every later job takes its training seed from
its path: ``train`` from ``--seed``, the others from their input's node.json, so none of them
declares a seed params key and adding a ``seeds`` entry runs only that seed's new jobs.

Imports nothing heavy: the Snakefile loads this module on every start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from shrinkflow import dag
from shrinkflow.quantization import parse_quant_method

# Path templates, from shrinkflow.dag (where every node lives on disk).
RAW, PREPARED = dag.RAW, dag.PREPARED
MODELS, SUMMARY, REPORT = dag.MODELS.as_posix(), dag.SUMMARY.as_posix(), dag.REPORT.as_posix()


def _node(folder: str, member: str = "") -> str:
    """A node folder (or ``member`` of it) below results/models/<backend>/<model>/seed<k>."""
    seed = dag.SEED_FOLDER  # `seed{seed}`: the training seed's level
    return "/".join(p for p in (MODELS, "{backend}", "{model}", seed, folder, member) if p)


MODEL, METRICS = dag.MODEL_DIR, dag.METRICS_FILE
BASELINE = _node(dag.NODE_FOLDERS["baseline"], MODEL)
PRUNED = _node(dag.NODE_FOLDERS["pruned"], MODEL)
FINETUNED = _node(dag.NODE_FOLDERS["finetuned"], MODEL)
QUANTIZED = _node(dag.NODE_FOLDERS["quantized"])
SENSITIVITY = _node(dag.SENSITIVITY)
# The float models a quantized node starts from (and evaluate measures as they are): the DVC
# stage-name suffix of each alternative and its folder (the `{node}` / `{source}` field).
FLOAT_NODES: dict[str, str] = {
    "": dag.NODE_FOLDERS["baseline"],
    "_finetuned": dag.NODE_FOLDERS["finetuned"],
}

# What a field's value may be: Snakemake's wildcard constraints (`{backend}` is one of the
# configured backends). Names are lower-case words; a sparsity is how Python prints a float.
FIELD_PATTERNS = {
    "model": "[a-z0-9_]+",
    "seed": "[0-9]+",
    "method": "[a-z0-9_]+",
    "sparsity": "[0-9.e-]+",
    "qmethod": "[a-z0-9_]+",
}
# The `{node}` and `{source}` fields: the folder of a float model (FLOAT_NODES), as a pattern.
FLOAT_NODE_PATTERN = "|".join(
    re.sub(r"\{(\w+)\}", lambda m: FIELD_PATTERNS[m.group(1)], folder)
    for folder in FLOAT_NODES.values()
)


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG (a Snakemake rule; one DVC stage per ``alternatives`` entry)."""

    name: str
    # The command after `shrinkflow <sub-command> --params ...`: fields, `{input.<name>}` and
    # `{output.<name>}` in braces; both tools' commands are this line, rendered.
    command: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    # params keys (dotted: a section or one key of it) every job of the stage reads.
    params: tuple[str, ...]
    # More keys read by a method family only (the `method` / `qmethod` field picks it), so that
    # Snakemake re-runs only the family whose section changed; DVC, which cannot pick per
    # method, lists the union.
    family_params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The module the sub-command runs (shrinkflow.stages.<module>) and the backend job module
    # it calls (shrinkflow.backends.<backend>.<job>): their imports are its code dependencies.
    module: str = ""
    backend_job: str = ""
    # For a stage whose templates hold {node} or {source}: the DVC stage-name suffix and the
    # folder of each alternative (FLOAT_NODES).
    alternatives: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def sub_command(self) -> str:
        return self.command.split()[0]

    def family_of(self, point: Mapping[str, str]) -> str:
        """The method family of a job (`gradual`, `structured`, `static`, `qat`, ...), or ''."""
        if "qmethod" in point and "qmethod" in self.command:
            return parse_quant_method(str(point["qmethod"]), key="qmethod").family
        if "method" in point and "{method}" in self.command:
            return str(point["method"]).split("_")[0]
        return ""

    def params_of(self, point: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """The params keys one job reads: ``params``, and its method family's (if any)."""
        extra = self.family_params.get(self.family_of(point or {}), ())
        return tuple(dict.fromkeys((*self.params, *extra)))

    def all_params(self) -> tuple[str, ...]:
        """Every key some job of the stage reads (what DVC lists), a key once even when its
        section is listed too."""
        keys = list(self.params)
        for extra in self.family_params.values():
            keys.extend(extra)
        keys = list(dict.fromkeys(keys))
        return tuple(k for k in keys if not any(k.startswith(f"{p}.") for p in keys if p != k))


# The CPU threads every job computes with (each rule's `threads:`, which Snakemake passes to
# the job as OMP_NUM_THREADS; shrinkflow.backends.base.use_job_threads). One: a small CNN on
# CPU trains only 1.4-1.6x faster on a second thread, while a second job on the other core
# does twice the work, so on N cores N jobs run side by side (a sweep is many small jobs); and
# a CPU run's numbers, which depend on its thread count, do not depend on --cores. A long CPU
# training on a big machine takes more with `--set-threads train=8 finetune=8`
# (docs/performance.md).
JOB_THREADS = 1

# Which families read more than the stage's shared keys. Pruning: gradual methods re-train
# while pruning (all of `train`), structured methods fine-tune between rounds (`train`, at
# `finetune.lr`). Quantization: every method but fixed-point weights and float conversions
# calibrates activations; QAT also fine-tunes with `train`'s optimizer settings.
_INT8 = ("quantize.calibration_batches",)
_QUANTIZE_FAMILIES = {
    "static": _INT8,
    "dynamic": _INT8,
    # QAT also distils when finetune.distill is set
    "qat": (*_INT8, "quantize.qat", "train", "finetune.distill"),
}

STAGES: tuple[Stage, ...] = (
    Stage(
        name="download",
        command="download --out {output.raw}",
        inputs={},
        outputs={"raw": RAW},
        params=("data",),
        module="download",
    ),
    Stage(
        name="prepare",
        command="prepare --in {input.raw} --out {output.prepared}",
        inputs={"raw": RAW},
        outputs={"prepared": PREPARED},
        params=("data", "seed"),
        module="prepare",
    ),
    Stage(
        name="train",
        command="train --backend {backend} --model {model} --seed {seed} --in {input.data} "
        "--out {output.model}",
        inputs={"data": PREPARED},
        outputs={"model": BASELINE},
        params=("train", "custom_models"),  # a custom model's factory ref
        module="train",
        backend_job="train",
    ),
    Stage(
        name="sensitivity",
        command="sensitivity --in {input.model} --data {input.data} --out {output.sensitivity}",
        inputs={"model": BASELINE, "data": PREPARED},
        outputs={"sensitivity": SENSITIVITY},
        params=("sensitivity", "prune.exclude"),
        module="sensitivity",
        backend_job="sensitivity",
    ),
    Stage(
        name="prune",
        command=(
            "prune --method {method} --sparsity {sparsity} --in {input.model} --data {input.data} "
            "--sensitivity {input.sensitivity} --out {output.model}"
        ),
        inputs={
            "model": BASELINE,
            "data": PREPARED,
            "sensitivity": SENSITIVITY,
        },
        outputs={"model": PRUNED},
        # every method reports val top-1 at train.batch_size
        params=("prune.scope", "prune.exclude", "train.batch_size"),
        family_params={
            "gradual": ("prune.gradual", "train"),
            "structured": ("prune.structured", "finetune.lr", "train"),
        },
        module="prune",
        backend_job="prune",
    ),
    Stage(
        name="finetune",
        command="finetune --in {input.model} --data {input.data} --teacher {input.teacher} "
        "--out {output.model}",
        inputs={
            "model": PRUNED,
            "data": PREPARED,
            # the baseline the pruned model came from: finetune.distill's teacher
            "teacher": BASELINE,
        },
        outputs={"model": FINETUNED},
        params=("train", "finetune"),
        module="finetune",
        backend_job="finetune",
    ),
    Stage(
        name="quantize",
        command="quantize --method {qmethod} --in {input.model} --data {input.data} "
        "--teacher {input.teacher} --out {output.model}",
        # teacher: the baseline, QAT's teacher when finetune.distill is set (for the baseline's
        # own quantization it is the source itself)
        inputs={"model": _node("{source}", MODEL), "data": PREPARED, "teacher": BASELINE},
        outputs={"model": f"{QUANTIZED}/{MODEL}"},
        # every method reports val top-1 at train.batch_size
        params=("train.batch_size",),
        family_params=_QUANTIZE_FAMILIES,
        module="quantize",
        backend_job="quantize",
        alternatives={suffix: {"source": node} for suffix, node in FLOAT_NODES.items()},
    ),
    Stage(
        name="evaluate",
        command="evaluate --in {input.model} --data {input.data} --out {output.metrics}",
        inputs={"model": _node("{node}", MODEL), "data": PREPARED},
        outputs={"metrics": _node("{node}", METRICS)},
        params=("evaluate",),
        module="evaluate",
        backend_job="evaluate",
        alternatives={suffix: {"node": node} for suffix, node in FLOAT_NODES.items()},
    ),
    Stage(
        name="evaluate_quantized",
        command="evaluate --in {input.model} --reference {input.reference} --data {input.data} "
        "--out {output.metrics}",
        inputs={
            "model": f"{QUANTIZED}/{MODEL}",
            "reference": _node("{source}", MODEL),
            "data": PREPARED,
        },
        outputs={"metrics": f"{QUANTIZED}/{METRICS}"},
        params=("evaluate",),
        module="evaluate",
        backend_job="evaluate",
        alternatives={suffix: {"source": node} for suffix, node in FLOAT_NODES.items()},
    ),
    Stage(
        name="summarize",
        # Snakemake's input is each evaluated node's metrics.json (shrinkflow.dag); DVC's is
        # the folder that holds them all.
        command="summarize --models " + MODELS + " --out {output.summary}",
        inputs={"models": MODELS},
        outputs={"summary": SUMMARY},
        params=(
            "backends",
            "models",
            "seeds",
            "prune.methods",
            "prune.sparsities",
            "quantize.methods",
        ),
        module="summarize",
    ),
    Stage(
        name="report",
        # Snakemake's inputs are the summary and each sensitivity folder, its outputs the
        # report's files; DVC's are the folders that hold them.
        command="report --summary {input.summary} --models " + MODELS + " --out {output.report}",
        inputs={"summary": SUMMARY, "models": MODELS},
        outputs={"report": REPORT},
        params=("report",),
        module="report",
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


def read_params(stage_name: str, cfg: Mapping, point: Mapping[str, str] | None = None) -> dict:
    """The values of exactly the params keys a job of ``stage_name`` reads (dotted keys)."""
    values = {}
    for key in stage(stage_name).params_of(point):
        value = cfg
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return values


# DVC: where templating finds each field (the matrix item, or params.yaml), and each matrix
# field's list in params.yaml, in the order the matrix lists them.
DVC_FIELDS = {
    "dataset": "${data.name}",
    "backend": "${item.backend}",
    "model": "${item.model}",
    "seed": "${item.seed}",
    "qmethod": "${item.qmethod}",
    "method": "${item.method}",
    "sparsity": "${item.sparsity}",
}
DVC_MATRIX = {
    "backend": "${backends}",
    "model": "${models}",
    "seed": "${seeds}",
    "qmethod": "${quantize.methods}",
    "method": "${prune.methods}",
    "sparsity": "${prune.sparsities}",
}


class UntrackedArguments:
    """Command-line arguments that a rule passes to its shell command as a `params:` entry
    (``{params.cli}``) without Snakemake's params rerun trigger tracking them: Snakemake records
    a params value only when it can represent it (str, numbers, containers; see
    ``snakemake.persistence``) and formats any other value with ``str``.

    For the `--params`/`--set` arguments, which change with the list of config files: a job's
    values are tracked by its `shrinkflow` params entry (``read_params``), so a preset re-runs
    only the jobs whose values it changes, not every job because the list of files changed."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"UntrackedArguments({self.text!r})"


@dataclass(frozen=True)
class SnakemakeRule:
    """What a rule of workflow/rules takes from the table: path patterns with wildcards, the
    shell command (its stderr to the rule's log; the `--params` arguments are the rule's
    ``cli`` params entry, an ``UntrackedArguments``) and the params it declares."""

    input: dict[str, str]
    output: dict[str, str]
    shell: str
    params: Callable[[Any], dict]


def snakemake_rule(name: str, cfg: Mapping, literal: tuple[str, ...] = ()) -> SnakemakeRule:
    """Stage ``name`` for Snakemake with ``cfg`` (the validated config): fields become wildcards
    (``{dataset}`` its value), ``{input.x}``/``{output.x}`` stay Snakemake's own, except those
    in ``literal`` (e.g. ``output.report``, for a rule that declares other files), written as
    their path."""
    entry = stage(name)

    def path(template: str) -> str:
        return template.replace("{dataset}", str(cfg["data"]["name"]))

    inputs = {k: path(v) for k, v in entry.inputs.items()}
    outputs = {k: path(v) for k, v in entry.outputs.items()}
    paths = {
        **{f"input.{k}": v for k, v in inputs.items()},
        **{f"output.{k}": v for k, v in outputs.items()},
    }

    def shell_field(match: re.Match) -> str:
        ref = match.group(1)
        if ref in literal:
            return paths[ref]  # a path the rule declares under other names
        if "." in ref:
            return match.group(0)  # {input.x}, {output.x}: Snakemake fills them in
        return f"{{wildcards.{ref}}}"  # a field: the job's wildcard

    sub_command, _, rest = entry.command.partition(" ")
    rest = re.sub(r"\{(\w+(?:\.\w+)?)\}", shell_field, path(rest))
    return SnakemakeRule(
        input=inputs,
        output=outputs,
        shell=f"shrinkflow {sub_command} {{params.cli}} {rest} 2> {{log}}",
        params=lambda wildcards: read_params(name, cfg, dict(wildcards.items())),
    )


def is_folder(path: str) -> bool:
    """Whether a stage writes ``path`` as a folder (Snakemake's ``directory()``): every output
    but the JSON and CSV files."""
    return PurePosixPath(path).suffix not in (".json", ".csv")
