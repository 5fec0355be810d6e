# Paths, params and commands come from the stage table (src/shrinkflow/stage_table.py).


rule sensitivity:
    input:
        **TABLE["sensitivity"].input,
    output:
        **folders(TABLE["sensitivity"].output),
    log:
        "logs/sensitivity/{backend}/{model}/seed{seed}.log",
    benchmark:
        "logs/benchmark/sensitivity/{backend}/{model}/seed{seed}.tsv"
    params:
        shrinkflow=TABLE["sensitivity"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        SOFTWARE,
    shell:
        TABLE["sensitivity"].shell


rule prune:
    input:
        **TABLE["prune"].input,
    output:
        **folders(TABLE["prune"].output),
    log:
        "logs/prune/{backend}/{model}/seed{seed}/{method}/{sparsity}.log",
    benchmark:
        "logs/benchmark/prune/{backend}/{model}/seed{seed}/{method}/{sparsity}.tsv"
    params:
        shrinkflow=TABLE["prune"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=8000,
    conda:
        SOFTWARE,
    shell:
        TABLE["prune"].shell


rule finetune:
    input:
        **TABLE["finetune"].input,
    output:
        **folders(TABLE["finetune"].output),
    log:
        "logs/finetune/{backend}/{model}/seed{seed}/{method}/{sparsity}.log",
    benchmark:
        "logs/benchmark/finetune/{backend}/{model}/seed{seed}/{method}/{sparsity}.tsv"
    params:
        shrinkflow=TABLE["finetune"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=8000,
    conda:
        SOFTWARE,
    shell:
        TABLE["finetune"].shell
