rule download:
    output:
        directory(RAW),
    log:
        "logs/download.log",
    benchmark:
        "logs/benchmark/download.tsv"
    params:
        data=config["data"],
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "shrinkflow download {PARAMS} --out {output} 2> {log}"


rule prepare:
    input:
        RAW,
    output:
        directory(PREPARED),
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmark/prepare.tsv"
    params:
        data=config["data"],
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "shrinkflow prepare {PARAMS} --in {input} --out {output} 2> {log}"
