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
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        TABLE["quantize"].shell
