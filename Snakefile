# shrinkflow: download -> prepare -> train -> [sensitivity] -> prune x sparsity -> finetune
# -> evaluate -> summarize, per backend x model; the baseline and every fine-tuned point are also
# quantized (one node per quantize.methods entry) and evaluated against the model they came from.
# dvc.yaml expresses the same DAG; both call the `shrinkflow` CLI with the same arguments
# (tests/test_dag_parity.py). Run: snakemake --cores 2 [--configfile configs/<preset>.yaml]

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        SUMMARY,
