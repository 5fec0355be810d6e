"""Print, as JSON, every job of the Snakefile in the current folder as Snakemake plans it with
`--forceall`: its rule, shell command, input and output paths, params keys and wildcards.

Run as a script (one Snakemake workflow per process). Snakemake's command line prints the
commands, inputs and outputs of a dry run but not the params, so this asks its Python API;
the DAG it builds is the one `snakemake -n --forceall` builds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.types import DAGSettings, OutputSettings, Quietness, ResourceSettings


def main() -> None:
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=2), snakefile=Path("Snakefile")
        )
        workflow_api.dag(DAGSettings(forceall=True))
        workflow = workflow_api._workflow  # the API has no public list of planned jobs
        workflow._prepare_dag(
            forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True
        )
        workflow._build_dag()
        jobs = [
            {
                "rule": job.rule.name,
                # Snakemake sends a job's stderr to its log file; DVC leaves it on the terminal.
                "command": re.sub(r" 2> \S+$", "", " ".join(str(job.shellcmd).split())),
                "inputs": sorted(map(str, job.input)),
                "outputs": sorted(map(str, job.output)),
                "params": sorted(k for v in job.params if isinstance(v, dict) for k in v),
                "wildcards": dict(job.wildcards.items()),
                "threads": job.threads,
            }
            for job in workflow.dag.jobs
            if job.shellcmd
        ]
    print(json.dumps(jobs))


if __name__ == "__main__":
    main()
