# shrinkflow: download -> prepare -> train -> [sensitivity] -> prune x sparsity -> finetune
# -> evaluate -> summarize -> report, per backend x model; the baseline and every fine-tuned
# point are also quantized (one node per quantize.methods entry) and evaluated against the model
# they came from. `snakemake --report report.html` builds Snakemake's report from the captions
# in workflow/report/.
# dvc.yaml expresses the same DAG; both call the `shrinkflow` CLI with the same arguments
# (tests/test_dag_parity.py). Run: snakemake --cores 2 [--configfile configs/<preset>.yaml]

configfile: "params.yaml"


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
