rule report:
    input:
        summary=SUMMARY,
        sensitivity=SENSITIVITY,
    output:
        html=report(REPORT_HTML, caption="../report/index.rst", category="Report"),
        markdown=REPORT_MARKDOWN,
        nodes=report(REPORT_NODES, caption="../report/nodes.rst", category="Report"),
        selection=report(REPORT_SELECTION, caption="../report/selection.rst", category="Report"),
        figures=report(
            directory(REPORT_FIGURES),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmark/report.tsv"
    params:
        report=config["report"],
        models=models_root,
        folder=report_folder,
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "shrinkflow report {PARAMS} --summary {input.summary} --models {params.models} "
        "--out {params.folder} 2> {log}"
