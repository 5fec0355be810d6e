# Paths, params and commands come from the stage table (src/shrinkflow/stage_table.py).


rule train:
    input:
        **TABLE["train"].input,
    output:
        **folders(TABLE["train"].output),
    log:
        "logs/train/{backend}/{model}/seed{seed}.log",
    benchmark:
        "logs/benchmark/train/{backend}/{model}/seed{seed}.tsv"
    params:
        shrinkflow=TABLE["train"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=8000,
    conda:
        SOFTWARE,
    shell:
        TABLE["train"].shell
