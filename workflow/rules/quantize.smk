# Paths, params and commands come from the stage table (src/shrinkflow/stage_table.py).


rule quantize:
    input:
        **TABLE["quantize"].input,
    output:
        **folders(TABLE["quantize"].output),
    log:
        "logs/quantize/{backend}/{model}/seed{seed}/{qmethod}/{source}.log",
    benchmark:
        "logs/benchmark/quantize/{backend}/{model}/seed{seed}/{qmethod}/{source}.tsv"
    params:
        shrinkflow=TABLE["quantize"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=8000,
    conda:
        SOFTWARE,
    shell:
        TABLE["quantize"].shell
