rule evaluate:
    wildcard_constraints:
        node=QUANTIZABLE_NODE,
    input:
        model="results/models/{backend}/{model}/{node}/model",
        data=PREPARED,
    output:
        "results/models/{backend}/{model}/{node}/metrics.json",
    log:
        "logs/evaluate/{backend}/{model}/{node}.log",
    benchmark:
        "logs/benchmark/evaluate/{backend}/{model}/{node}.tsv"
    params:
        evaluate=config["evaluate"],
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "shrinkflow evaluate {PARAMS} --in {input.model} --data {input.data} --out {output} 2> {log}"


rule evaluate_quantized:
    input:
        model="results/models/{backend}/{model}/quantized/{qmethod}/{source}/model",
        reference="results/models/{backend}/{model}/{source}/model",
        data=PREPARED,
    output:
        "results/models/{backend}/{model}/quantized/{qmethod}/{source}/metrics.json",
    log:
        "logs/evaluate/{backend}/{model}/quantized/{qmethod}/{source}.log",
    benchmark:
        "logs/benchmark/evaluate/{backend}/{model}/quantized/{qmethod}/{source}.tsv"
    params:
        evaluate=config["evaluate"],
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "shrinkflow evaluate {PARAMS} --in {input.model} --reference {input.reference} "
        "--data {input.data} --out {output} 2> {log}"


rule summarize:
    input:
        EVALUATED,
    output:
        SUMMARY,
    log:
        "logs/summarize.log",
    benchmark:
        "logs/benchmark/summarize.tsv"
    params:
        models=models_root,
    threads: 1
    resources:
        mem_mb=1000,
    shell:
        "shrinkflow summarize {PARAMS} --models {params.models} --out {output} 2> {log}"
