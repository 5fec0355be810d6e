rule sensitivity:
    input:
        model="results/models/{backend}/{model}/baseline/model",
        data=PREPARED,
    output:
        directory("results/models/{backend}/{model}/sensitivity"),
    log:
        "logs/sensitivity/{backend}/{model}.log",
    benchmark:
        "logs/benchmark/sensitivity/{backend}/{model}.tsv"
    params:
        sensitivity=config["sensitivity"],
        prune=config["prune"]["exclude"],
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "shrinkflow sensitivity {PARAMS} --in {input.model} --data {input.data} "
        "--out {output} 2> {log}"


rule prune:
    input:
        model="results/models/{backend}/{model}/baseline/model",
        data=PREPARED,
        sensitivity="results/models/{backend}/{model}/sensitivity",
    output:
        directory("results/models/{backend}/{model}/pruned/{method}/{sparsity}/model"),
    log:
        "logs/prune/{backend}/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/benchmark/prune/{backend}/{model}/{method}/{sparsity}.tsv"
    params:
        prune=prune_params,
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "shrinkflow prune {PARAMS} --method {wildcards.method} --sparsity {wildcards.sparsity} "
        "--in {input.model} --data {input.data} --sensitivity {input.sensitivity} "
        "--out {output} 2> {log}"


rule finetune:
    input:
        model="results/models/{backend}/{model}/pruned/{method}/{sparsity}/model",
        data=PREPARED,
    output:
        directory("results/models/{backend}/{model}/finetuned/{method}/{sparsity}/model"),
    log:
        "logs/finetune/{backend}/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/benchmark/finetune/{backend}/{model}/{method}/{sparsity}.tsv"
    params:
        finetune=config["finetune"],
        train=config["train"],
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "shrinkflow finetune {PARAMS} --in {input.model} --data {input.data} "
        "--out {output} 2> {log}"
