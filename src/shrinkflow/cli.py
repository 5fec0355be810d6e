"""The `shrinkflow` command: one sub-command per pipeline stage, shared by Snakemake and DVC.

Thin on purpose: parse arguments, load and validate params, hand over to shrinkflow.stages.
Every bad input ends as one line `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from shrinkflow.backends.base import BACKENDS, PRUNE_METHODS, REGISTRY_MODELS, quant_methods
from shrinkflow.config import BASE_PARAMS, MissingKeyError, load_params, over_base_params
from shrinkflow.errors import ShrinkflowError
from shrinkflow.quantization import MAX_BITS, MIN_BITS

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reproducible pruning and quantization pipelines for image-classification CNNs.",
)

ParamsOption = Annotated[
    list[Path],
    typer.Option(
        "--params",
        help="Params file; repeat to merge presets over it in order (later files win).",
    ),
]
SetOption = Annotated[
    list[str],
    typer.Option("--set", help="Override one key, e.g. --set train.epochs=3 (repeatable)."),
]
OutOption = Annotated[Path, typer.Option("--out", help="Output path (written atomically).")]
DataOption = Annotated[Path, typer.Option("--data", help="The prepared data folder.")]
BaselineOption = Annotated[Path, typer.Option("--in", help="The trained baseline's model folder.")]
TeacherOption = Annotated[
    Path | None,
    typer.Option(
        "--teacher",
        help="The baseline of the same backend, model and seed: the teacher when "
        "finetune.distill is set (fine-tuning, QAT); checked, unused otherwise.",
    ),
]

DEFAULT_PARAMS = [BASE_PARAMS]

# The values an option takes, in its help, from where they are defined: the backends and what
# each implements and the models each registers (shrinkflow.backends.base).
BACKEND_CHOICES = f"One of: {', '.join(BACKENDS)}."
MODEL_CHOICES = (
    f"A model the backend registers, among: "
    f"{', '.join(sorted(set().union(*REGISTRY_MODELS.values())))} "
    "(`shrinkflow models --backend B` lists B's, with sizes), or a custom_models key."
)


def per_backend(methods: dict[str, list[str]] | dict[str, tuple[str, ...]]) -> str:
    """``torch: a, b; tensorflow: a, c``: each backend's methods, for an option's help."""
    return "; ".join(f"{backend}: {', '.join(methods[backend])}" for backend in BACKENDS)


PRUNE_CHOICES = f"By backend, {per_backend(PRUNE_METHODS)}."
QUANT_CHOICES = (
    f"By backend, {per_backend({b: quant_methods(b) for b in BACKENDS})} "
    f"(<bits> from {MIN_BITS} to {MAX_BITS})."
)


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    try:
        version = metadata.version("shrinkflow")
    except metadata.PackageNotFoundError:
        raise ShrinkflowError(
            "shrinkflow is not installed, so it has no version (pip install -e .)"
        ) from None
    typer.echo(f"shrinkflow {version}")
    raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Options that come before any command (the app's help is Typer's help above)."""


def _params(params: list[Path] | None, overrides: list[str] | None) -> dict:
    """A stage's merged, validated params, and a tracking server that answers, checked before
    the stage writes or computes anything."""
    from shrinkflow.tracking.health import require_server

    cfg = load_params(params or DEFAULT_PARAMS, overrides or [])
    require_server(cfg)
    return cfg


@app.command()
def download(out: OutOption, params: ParamsOption = None, set_: SetOption = None) -> None:
    """Fetch the raw data set named by data.name into OUT (e.g. data/raw/digits)."""
    from shrinkflow.stages import download as stage

    stage.run(_params(params, set_), out)


@app.command()
def prepare(
    in_: Annotated[Path, typer.Option("--in", help="The download stage's folder.")],
    out: OutOption,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Resize, split and fingerprint the raw data into the split every backend reads."""
    from shrinkflow.stages import prepare as stage

    stage.run(_params(params, set_), in_, out)


@app.command()
def train(
    backend: Annotated[str, typer.Option(help=BACKEND_CHOICES)],
    model: Annotated[str, typer.Option(help=MODEL_CHOICES)],
    in_: Annotated[Path, typer.Option("--in", help="The prepared data folder.")],
    out: OutOption,
    params: ParamsOption = None,
    set_: SetOption = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=2**32 - 1,
            help="The training seed (a `seeds` entry); default: the first `seeds` entry.",
        ),
    ] = None,
) -> None:
    """Train a baseline model; a killed job resumes from its last completed epoch."""
    from shrinkflow.stages import train as stage

    cfg = _params(params, set_)
    stage.run(cfg, backend, model, cfg["seeds"][0] if seed is None else seed, in_, out)


@app.command()
def sensitivity(
    in_: BaselineOption,
    data: DataOption,
    out: OutOption,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Prune each layer group alone at sensitivity.ratios; write a table, a plot, and ratios."""
    from shrinkflow.stages import sensitivity as stage

    stage.run(_params(params, set_), in_, data, out)


@app.command()
def prune(
    method: Annotated[str, typer.Option(help=PRUNE_CHOICES)],
    sparsity: Annotated[
        float, typer.Option(help="Target share of weights (or filters) removed, in [0, 1).")
    ],
    in_: BaselineOption,
    data: DataOption,
    sensitivity: Annotated[Path, typer.Option(help="The sensitivity stage's folder.")],
    out: OutOption,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Prune the baseline to one sweep point (one-shot, gradual or structured)."""
    from shrinkflow.stages import prune as stage

    stage.run(_params(params, set_), method, sparsity, in_, data, sensitivity, out)


@app.command()
def finetune(
    in_: Annotated[Path, typer.Option("--in", help="A pruned model folder.")],
    data: DataOption,
    out: OutOption,
    teacher: TeacherOption = None,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Fine-tune a pruned model; pruned weights stay exactly zero (optionally distilled)."""
    from shrinkflow.stages import finetune as stage

    stage.run(_params(params, set_), in_, data, out, teacher)


@app.command()
def quantize(
    method: Annotated[str, typer.Option(help=QUANT_CHOICES)],
    in_: Annotated[
        Path, typer.Option("--in", help="A float model folder (baseline or fine-tuned).")
    ],
    data: DataOption,
    out: OutOption,
    teacher: TeacherOption = None,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Quantize one model: int8 (static, dynamic, QAT), N-bit fixed-point weights, or TFLite."""
    from shrinkflow.stages import quantize as stage

    stage.run(_params(params, set_), method, in_, data, out, teacher)


@app.command()
def evaluate(
    in_: Annotated[Path, typer.Option("--in", help="A model folder written by a stage.")],
    data: DataOption,
    out: OutOption,
    reference: Annotated[
        Path | None,
        typer.Option(help="The float model a quantized one came from, timed alongside it."),
    ] = None,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Measure accuracy, size, MACs, latency, throughput and memory of one model."""
    from shrinkflow.stages import evaluate as stage

    stage.run(_params(params, set_), in_, data, out, reference)


@app.command()
def summarize(
    models: Annotated[Path, typer.Option(help="The results/models folder.")],
    out: OutOption,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Collect every evaluated node's metrics into one CSV (results/summary.csv)."""
    from shrinkflow.stages import summarize as stage

    stage.run(_params(params, set_), models, out)


@app.command()
def report(
    summary: Annotated[Path, typer.Option(help="The summarize stage's CSV.")],
    models: Annotated[
        Path, typer.Option(help="The results/models folder (per-layer counts, sensitivity).")
    ],
    out: OutOption,
    params: ParamsOption = None,
    set_: SetOption = None,
) -> None:
    """Choose a model under report.max_accuracy_drop; write index.html, report.md and plots."""
    from shrinkflow.stages import report as stage

    stage.run(_params(params, set_), summary, models, out)


@app.command("export-sparse")
def export_sparse(
    in_: Annotated[Path, typer.Option("--in", help="A model folder written by a stage.")],
    out: OutOption,
) -> None:
    """Write a model's weights at their precision, pruned zeros left out, as one .npz archive.

    Load it with shrinkflow.sparse_format.load.
    """
    from shrinkflow.sparse_export import export

    done = export(in_, out)
    typer.echo(
        f"{out}: {done.tensors} tensors, {done.file_bytes} bytes (model file "
        f"{done.source_bytes}, nominal {done.nominal_bytes})"
    )


@app.command()
def models(
    backend: Annotated[str, typer.Option(help=BACKEND_CHOICES)] = "torch",
) -> None:
    """List the model registry with parameter counts (10 classes, 3x32x32 input)."""
    from shrinkflow.backends.base import backend_module

    registry = backend_module(backend, "models")
    for name in registry.list_models():
        typer.echo(f"{name:<12} {registry.model_params(name) / 1e6:8.2f} M params")


@app.command()
def validate(params: ParamsOption = None, set_: SetOption = None) -> None:
    """Check the params a run would see against the schema; print a one-line verdict.

    As Snakemake merges each --configfile over params.yaml, the --params files are merged over
    the params.yaml of this folder (listed first in the verdict) unless they list it, so
    `shrinkflow validate --params configs/<preset>.yaml` checks the preset's run.
    """
    given = params or []
    files = over_base_params(given) if given else DEFAULT_PARAMS
    try:
        cfg = load_params(files, set_ or [])
    except MissingKeyError as exc:
        if any(Path(f).name == BASE_PARAMS.name for f in files):
            raise
        raise ShrinkflowError(
            f"{exc} (read alone: there is no {BASE_PARAMS} here to merge "
            f"{' + '.join(map(str, given))} over; run in the project folder or give "
            f"--params <project>/{BASE_PARAMS} first)"
        ) from None
    from shrinkflow import per_backend

    typer.echo(
        f"{' + '.join(map(str, files))}: ok (data {cfg['data']['name']}, "
        f"backends {', '.join(cfg['backends'])}, "
        f"models {', '.join(per_backend.union(cfg, 'models'))})"
    )
    if not given and Path("dvc.yaml").is_file():
        from shrinkflow import dvc_yaml as generator

        if Path("dvc.yaml").read_text() != generator.render(cfg):
            typer.echo(
                "note: dvc.yaml is not what `shrinkflow dvc-yaml` writes for this params.yaml "
                "(a list turned per-backend, or the code changed): run it before `dvc repro`"
            )


remote_app = typer.Typer(no_args_is_help=True, help="The shared DVC remote for checkpoints.")
app.add_typer(remote_app, name="remote")
RemoteOption = Annotated[
    str | None, typer.Option("--remote", "-r", help="Remote name (default: DVC's default).")
]


@remote_app.command("check")
def remote_check(remote: RemoteOption = None) -> None:
    """Prove the DVC remote can be written now (before hours of compute); one-line verdict."""
    from shrinkflow.remote import check_remote

    typer.echo(check_remote(Path.cwd(), remote))


@remote_app.command("push")
def remote_push(remote: RemoteOption = None) -> None:
    """Check the remote, record the outputs in dvc.lock (`dvc commit -f`), `dvc push` them."""
    from shrinkflow.remote import push

    push(Path.cwd(), remote)


@app.command("dvc-yaml")
def dvc_yaml(
    out: Annotated[Path, typer.Option("--out", help="Where to write it.")] = Path("dvc.yaml"),
    check: Annotated[
        bool, typer.Option("--check", help="Only compare: exit 1 if OUT is not what it writes.")
    ] = False,
) -> None:
    """Write dvc.yaml from the stage table (src/shrinkflow/stage_table.py) for the shape of
    ./params.yaml, or --check it."""
    from shrinkflow import dvc_yaml as generator

    cfg = load_params([BASE_PARAMS])  # dvc.yaml follows params.yaml's shape (per-backend lists)
    if check:
        current = out.read_text() if out.is_file() else ""
        if current != generator.render(cfg):
            typer.echo(f"error: {out} is not what `shrinkflow dvc-yaml` writes: run it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out}: up to date")
    elif generator.write(out, cfg):
        typer.echo(f"{out}: written from the stage table")
    else:
        typer.echo(f"{out}: unchanged")


# The batch-size key each stage's memory use scales with (evaluate times several batch sizes).
_BATCH_KEYS = {"evaluate": "evaluate.batch_sizes", "report": None, "summarize": None}
_BATCH_KEY_DEFAULT = "train.batch_size"
# Writers that report a failed write (a full disk, most often) without the errno: torch's zip
# writer (a RuntimeError) and numpy's tofile (an OSError "N requested and M written").
_SHORT_WRITES = re.compile(
    r"unexpected pos|PytorchStreamWriter failed|file write failed|\d+ requested and \d+ written"
)
_OOM_TYPES = {"OutOfMemoryError", "ResourceExhaustedError"}  # torch (CUDA) and TensorFlow
_OOM_TEXTS = ("out of memory", "can't allocate memory", "OOM when allocating")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _argv_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--out X`` or ``--out=X``) on the command line, if given."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


def _command(argv: list[str]) -> str:
    return next((arg for arg in argv if not arg.startswith("-")), "shrinkflow")


def environment_failure(exc: BaseException, argv: list[str]) -> str | None:
    """One line for a failure the user fixes outside the params' logic: a full disk, a read-only
    or forbidden output location, a batch too large for memory. None for anything else.

    Looks through the exception chain, since libraries wrap the OSError they hit.
    """
    from shrinkflow.outputs import describe_write_failure, is_write_failure

    out = _argv_value(argv, "--out")
    command = _command(argv)
    for seen in _chain(exc):
        if is_write_failure(seen):
            return describe_write_failure(seen, out)
        text = str(seen)
        short_write = isinstance(seen, RuntimeError | OSError) and _SHORT_WRITES.search(text)
        # TensorFlow's writers report a full disk as a status in words, not an errno.
        if short_write or "No space left on device" in text:
            return describe_write_failure(OSError(errno.ENOSPC, "write failed"), out)
        if "database or disk is full" in text:  # SQLite, under MLflow's store
            return "cannot write the MLflow tracking store: the disk is full: free space and re-run"
        if isinstance(seen, MemoryError) or (
            isinstance(seen, Exception)
            and (type(seen).__name__ in _OOM_TYPES or any(t in text for t in _OOM_TEXTS))
        ):
            key = _BATCH_KEYS.get(command, _BATCH_KEY_DEFAULT)
            lower = f": lower {key} (--set {key}=...)" if key else ""
            return f"out of memory in `shrinkflow {command}`{lower}"
    return None


def main() -> None:
    """Run the CLI; every failure the user can act on ends as one ``error: ...`` line.

    Exit status 2: bad input (params, paths, arguments). 1: the environment (a full disk, a
    read-only folder, too little memory). 130: interrupted.
    """
    try:
        app()
    except ShrinkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        message = environment_failure(exc, sys.argv[1:])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
