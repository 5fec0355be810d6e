rule quantize:
    input:
        model="results/models/{backend}/{model}/{source}/model",
        data=PREPARED,
    output:
        directory("results/models/{backend}/{model}/quantized/{qmethod}/{source}/model"),
    log:
        "logs/quantize/{backend}/{model}/{qmethod}/{source}.log",
    benchmark:
        "logs/benchmark/quantize/{backend}/{model}/{qmethod}/{source}.tsv"
    params:
        quantize=quantize_params,
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "shrinkflow quantize {PARAMS} --method {wildcards.qmethod} --in {input.model} "
        "--data {input.data} --out {output} 2> {log}"
