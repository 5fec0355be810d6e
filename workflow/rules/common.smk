# Helpers only: config validation, the CLI's params arguments, and the stage table's rules.
import json
import os
import shlex
import sys
from pathlib import Path

from shrinkflow import dag, invocation, stage_table
from shrinkflow.config import load_params
from shrinkflow.errors import ShrinkflowError

# Keep every job quiet and offline (DESIGN.md section 6), and give every job of this invocation
# one id (the MLflow tag shrinkflow.invocation); declared in the Snakefile's `envvars`, so
# cluster jobs inherit it too.
envvars_defaults = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    invocation.ENV: invocation.new_invocation_id(),
}
for _name, _value in envvars_defaults.items():
    os.environ.setdefault(_name, _value)


# ---- params: one loader for Snakemake and every job ----
# Snakemake's own loader (PyYAML's YAML 1.1 via yte) reads `1e-4` as text and names neither file
# nor line for a syntax error, so the Snakefile has no `configfile:` directive. Instead `config`
# becomes what every job's CLI loads from the same arguments: params.yaml, each --configfile in
# order, each --config entry as a --set override; all through shrinkflow.config, then validated.
# (Snakemake has already parsed --configfile files itself by then: an unparsable or empty one
# stops it before this runs, with its own message.)
def params_files():
    """params.yaml, then each --configfile as a job is told it (relative inside the project)."""
    files = ["params.yaml"]
    for path in workflow.config_settings.configfiles:
        inside = Path(path).resolve().is_relative_to(Path.cwd())
        shown = os.path.relpath(path) if inside else str(path)
        if shown not in files:
            files.append(shown)
    return files


def params_overrides():
    """Each --config entry as a --set override, which the loader reads as YAML."""
    return [f"{key}={override_text(value)}" for key, value in workflow.config_settings.config.items()]


def override_text(value):
    """A --config value as the YAML text the user typed. Snakemake reads a list or mapping with
    YAML's BaseLoader, so `seeds=[0,1,2]` arrives as the strings '0', '1', '2': written back
    plain inside flow brackets, the loader types them again (0, 1, 2). Scalars that Snakemake
    already typed (int, float, bool) and top-level strings go as JSON."""
    if isinstance(value, list):
        return "[" + ", ".join(override_text(v) if not isinstance(v, str) else v for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{k}: {v if isinstance(v, str) else override_text(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return json.dumps(value)


def params_args():
    """`--params` (and `--set`) arguments that make every CLI job see exactly this config."""
    args = [f"--params {shlex.quote(f)}" for f in params_files()]
    args += ["--set " + shlex.quote(o) for o in params_overrides()]
    return " ".join(args)


try:
    _loaded = load_params([Path(f) for f in params_files()], params_overrides())
except ShrinkflowError as exc:
    sys.exit(f"error: {exc}")
config.clear()
config.update(_loaded)
if "params.yaml" not in workflow.configfiles:
    workflow.configfiles.insert(0, "params.yaml")  # listed in --report and --archive, as before
# ---- end params ----


# Each rule's `cli` params entry: the `--params`/`--set` arguments of this run, in the command
# but not tracked by Snakemake's params trigger (stage_table.UntrackedArguments): the values a
# job reads are its `shrinkflow` entry, so a preset re-runs only the jobs whose values change.
PARAMS = stage_table.UntrackedArguments(params_args())
# Each rule's `threads:`, passed to its job as OMP_NUM_THREADS: one thread per job, so on N
# cores N jobs run side by side (stage_table.JOB_THREADS says why).
JOB_THREADS = stage_table.JOB_THREADS
# Each rule's `conda:` (relative to workflow/rules/): used with --sw-deployment-method conda.
SOFTWARE = "../envs/shrinkflow.yaml"
SUMMARY = str(dag.SUMMARY)
REPORT_HTML = str(dag.REPORT / "index.html")
REPORT_MARKDOWN = str(dag.REPORT / "report.md")
REPORT_NODES = str(dag.REPORT / "nodes.csv")
REPORT_SELECTION = str(dag.REPORT / "selection.json")
REPORT_METRICS = str(dag.REPORT / "metrics.json")
REPORT_FIGURES = str(dag.REPORT / "figures")


# ---- the stage table: each rule's paths, params and command ----
# The rules take their input and output patterns, their params (exactly the config keys their
# jobs read, so a changed value re-runs only the jobs that read it) and their shell commands
# from src/shrinkflow/stage_table.py, the table dvc.yaml is generated from.
TABLE = {
    stage.name: stage_table.snakemake_rule(
        stage.name, config, literal=("output.report",) if stage.name == "report" else ()
    )
    for stage in stage_table.STAGES
}


def folders(paths):
    """A stage's outputs as Snakemake declares them (a folder through directory())."""
    return {k: directory(v) if stage_table.is_folder(v) else v for k, v in paths.items()}
# ---- end stage table ----


# Per backend x model x training seed (`seeds`): each seed's chain in its seed<k>/ folder.
EVALUATED = [str(node.metrics) for node in dag.evaluated_nodes(config)]
SENSITIVITY = [str(folder) for folder in dag.sensitivity_dirs(config)]
# The `{node}` of evaluate and the `{source}` of quantize: a node that is quantized and evaluated
# as it is (the baseline or a fine-tuned sweep point), never a quantized node itself.
QUANTIZABLE_NODE = stage_table.FLOAT_NODE_PATTERN

wildcard_constraints:
    backend="|".join(config["backends"]),
    source=QUANTIZABLE_NODE,
    **stage_table.FIELD_PATTERNS,


# ---- tracking server check (issue 7): before any job runs ----
# An http(s) tracking URI (tracking.uri or MLFLOW_TRACKING_URI) must answer first: one line and
# exit 1, instead of every job failing in turn. `onstart` runs only when Snakemake is about to run
# jobs (not for -n, --lint, --list, nor the Snakemake inside a cluster job); the check is one
# GET /health with urllib (MLflow is not imported). Each CLI job checks again (dvc calls it).
onstart:
    from shrinkflow.tracking.health import START_WAIT_S, require_server

    try:
        slurm_preflight()
        require_server(config, wait_s=START_WAIT_S)
    except ShrinkflowError as exc:
        sys.exit(f"error: {exc}")
# ---- end tracking server check ----


# ---- DVC: dvc.lock after a successful run, and the shared remote (issue 7) ----
# After jobs ran successfully, `onsuccess` (this workflow's only one, in this process alone)
# records their outputs in dvc.lock with `dvc commit`, so `dvc status` is clean and `dvc repro`
# runs nothing, when the run brought params.yaml's whole DAG up to date (shrinkflow.dvc_lock
# says which runs do: no preset or --config, the default target, ...); otherwise, or if DVC
# fails, one line says why and the run still succeeds.
# Opt-in, as runtime config (never params.yaml): SHRINKFLOW_DVC_PUSH=1 snakemake ... checks DVC's
# default remote (`dvc remote add -d NAME URL`) here, so a dead remote stops the run in one line
# before any compute; then `onsuccess` runs `dvc commit -f` and `dvc push` once, and a failure
# of either fails the run. Reading DVC's config costs ~0.15 s; only the main process checks, dry
# runs included (cluster jobs re-read this file and skip it).
from shrinkflow import dvc_lock
from shrinkflow import remote as dvc_remote

# This run's --configfile and --config arguments beyond params.yaml, as the user typed them.
PARAMS_OVERRIDES = [
    f"--configfile {os.path.relpath(path)}"
    for path in workflow.config_settings.configfiles
    if os.path.relpath(path) != "params.yaml"
] + [f"--config {key}=..." for key in workflow.config_settings.config]

DVC_PUSH = dvc_remote.push_requested() and workflow.is_main_process
if DVC_PUSH:
    try:
        print(dvc_remote.require_pushable(Path.cwd(), PARAMS_OVERRIDES), file=sys.stderr)
    except ShrinkflowError as exc:
        sys.exit(f"error: {exc}")


def run_scope():
    """What this run covered, for dvc_lock to decide whether dvc.lock may record it."""
    settings = workflow.dag_settings
    narrowing = [
        f"--{option.replace('_', '-')} {' '.join(sorted(map(str, values)))}"
        for option in ("until", "omit_from", "allowed_rules", "target_jobs")
        if (values := getattr(settings, option))
    ]
    if settings.batch is not None:
        narrowing.append("--batch")
    return dvc_lock.RunScope(
        overrides=tuple(PARAMS_OVERRIDES),
        targets=tuple(map(str, settings.targets)),
        default_target=str(workflow.default_target),
        narrowing=tuple(narrowing),
        rerun_triggers=frozenset(str(t) for t in settings.rerun_triggers),
        touch=workflow.touch,
        immediate_submit=workflow.remote_execution_settings.immediate_submit,
    )


onsuccess:
    if DVC_PUSH:
        try:
            dvc_remote.push(Path.cwd())
        except ShrinkflowError as exc:
            sys.exit(f"error: {exc}")
    elif workflow.is_main_process:
        _recorded = dvc_lock.record(Path.cwd(), run_scope())
        if _recorded:
            print(_recorded, file=sys.stderr)
# ---- end DVC ----


# ---- Slurm (issue 7): one tracking store for every job, and a preflight before submitting ----
# MLFLOW_TRACKING_URI joins the declared envvars with the store every job would pick anyway
# (shrinkflow.tracking.tracking_uri: tracking.uri, else $MLFLOW_TRACKING_URI, else this
# project's mlflow.db as an absolute path), so declaring it never makes it required. The Slurm
# executor passes no declared envvar itself (pass_envvar_declarations_to_cmd=False): its jobs
# get this process's environment through `sbatch --export=ALL`, this default included.
from shrinkflow.tracking import tracking_uri

envvars_defaults["MLFLOW_TRACKING_URI"] = tracking_uri(config)  # checked by load_params above
os.environ.setdefault("MLFLOW_TRACKING_URI", envvars_defaults["MLFLOW_TRACKING_URI"])


def slurm_preflight():
    """Called by `onstart` (before the first submission, only in the submitting process): with
    the Slurm executor, stop with one line if a job asks for what no node of its partition has
    (src/shrinkflow/cluster.py). Other executors, dry runs and cluster jobs skip it."""
    if getattr(workflow.executor_plugin, "name", None) == "slurm":
        from shrinkflow.cluster import preflight

        preflight(workflow.dag.needrun_jobs(), [rule.name for rule in workflow.rules])
# ---- end Slurm ----
