# Paths, params and commands come from the stage table (src/shrinkflow/stage_table.py).


# Its inputs: the summary and each sensitivity folder, its outputs the report's files (for
# `snakemake --report`), where DVC names the folders that hold them.
rule report:
    input:
        summary=SUMMARY,
        sensitivity=SENSITIVITY,
    output:
        html=report(REPORT_HTML, caption="../report/index.rst", category="Report"),
        markdown=REPORT_MARKDOWN,
        nodes=report(REPORT_NODES, caption="../report/nodes.rst", category="Report"),
        selection=report(REPORT_SELECTION, caption="../report/selection.rst", category="Report"),
        metrics=REPORT_METRICS,
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
        shrinkflow=TABLE["report"].params,
        cli=PARAMS,
    threads: JOB_THREADS
    resources:
        mem_mb=2000,
    conda:
        SOFTWARE,
    shell:
        TABLE["report"].shell
