# Paths, params and commands come from the stage table (src/shrinkflow/stage_table.py).


rule download:
    output:
        **folders(TABLE["download"].output),
    log:
        "logs/download.log",
    benchmark:
        "logs/benchmark/download.tsv"
    params:
        shrinkflow=TABLE["download"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=2000,
    conda:
        SOFTWARE,
    shell:
        TABLE["download"].shell


rule prepare:
    input:
        **TABLE["prepare"].input,
    output:
        **folders(TABLE["prepare"].output),
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmark/prepare.tsv"
    params:
        shrinkflow=TABLE["prepare"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        SOFTWARE,
    shell:
        TABLE["prepare"].shell
