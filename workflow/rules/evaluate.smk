# Paths, params and commands come from the stage table (src/shrinkflow/stage_table.py).


rule evaluate:
    wildcard_constraints:
        node=QUANTIZABLE_NODE,
    input:
        **TABLE["evaluate"].input,
    output:
        **folders(TABLE["evaluate"].output),
    log:
        "logs/evaluate/{backend}/{model}/seed{seed}/{node}.log",
    benchmark:
        "logs/benchmark/evaluate/{backend}/{model}/seed{seed}/{node}.tsv"
    params:
        shrinkflow=TABLE["evaluate"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        SOFTWARE,
    shell:
        TABLE["evaluate"].shell


rule evaluate_quantized:
    input:
        **TABLE["evaluate_quantized"].input,
    output:
        **folders(TABLE["evaluate_quantized"].output),
    log:
        "logs/evaluate/{backend}/{model}/seed{seed}/quantized/{qmethod}/{source}.log",
    benchmark:
        "logs/benchmark/evaluate/{backend}/{model}/seed{seed}/quantized/{qmethod}/{source}.tsv"
    params:
        shrinkflow=TABLE["evaluate_quantized"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        SOFTWARE,
    shell:
        TABLE["evaluate_quantized"].shell


# Its input: each evaluated node's metrics.json (shrinkflow.dag), where DVC names their folder.
rule summarize:
    input:
        EVALUATED,
    output:
        **folders(TABLE["summarize"].output),
    log:
        "logs/summarize.log",
    benchmark:
        "logs/benchmark/summarize.tsv"
    params:
        shrinkflow=TABLE["summarize"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=1000,
    conda:
        SOFTWARE,
    shell:
        TABLE["summarize"].shell
