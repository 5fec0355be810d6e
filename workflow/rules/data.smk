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
    threads: 1
    resources:
        mem_mb=2000,
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
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        TABLE["prepare"].shell
