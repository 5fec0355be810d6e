# shrinkflow: download -> prepare -> train -> [sensitivity] -> prune x sparsity -> finetune
# -> evaluate -> summarize -> report, per backend x model; the baseline and every fine-tuned
# point are also quantized (one node per quantize.methods entry) and evaluated against the model
# they came from. `snakemake --report report.html` builds Snakemake's report from the captions
# in workflow/report/.
# dvc.yaml expresses the same DAG: both are fed by the stage table (src/shrinkflow/stage_table.py),
# dvc.yaml through `shrinkflow dvc-yaml`; tests/test_dag_parity.py compares them job by job.
# Run: snakemake --cores 2 [--configfile configs/<preset>.yaml]

# `config` is params.yaml, then each --configfile, then --config, read and validated by
# shrinkflow.config exactly as every `shrinkflow` job reads them (workflow/rules/common.smk): not
# by a `configfile:` directive, whose YAML loader differs from the CLI's (1e-4 would be text).


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


envvars:
    *envvars_defaults,


rule all:
    default_target: True
    input:
        REPORT_HTML,


# ---- crash recovery: plain `snakemake` resumes after a kill ----
# A killed snakemake leaves .snakemake/locks behind; it is removed here (before Snakemake checks
# it) only when no run that could hold it is alive (src/shrinkflow/recovery.py). Killed jobs
# are re-run by `rerun-incomplete` in profiles/default (loaded by every plain `snakemake`), and
# each continues or closes its MLflow run (shrinkflow.tracking.run_marker).
from shrinkflow import recovery

if workflow.is_main_process:
    _stale = recovery.release_stale_locks(Path.cwd())
    if _stale:
        print(_stale, file=sys.stderr)
    recovery.register_run(Path.cwd(), sys.argv)


# A failed job's one-line reason is in its log file; say it here too, whatever the profile.
onerror:
    for _line in recovery.failed_job_errors(getattr(workflow.scheduler, "failed", ())):
        print(_line, file=sys.stderr)
# ---- end crash recovery ----
