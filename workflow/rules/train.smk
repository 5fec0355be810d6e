rule train:
    input:
        PREPARED,
    output:
        directory("results/models/{backend}/{model}/baseline/model"),
    log:
        "logs/train/{backend}/{model}.log",
    benchmark:
        "logs/benchmark/train/{backend}/{model}.tsv"
    params:
        train=config["train"],
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "shrinkflow train {PARAMS} --backend {wildcards.backend} --model {wildcards.model} "
        "--in {input} --out {output} 2> {log}"
