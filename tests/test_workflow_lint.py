"""`snakemake --lint` finds nothing: each rule names its software (workflow/envs/shrinkflow.yaml,
for --sw-deployment-method conda) and takes the `--params` arguments through `params:`
(stage_table.UntrackedArguments, which Snakemake's params trigger leaves out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shrinkflow.stage_table import UntrackedArguments

ROOT = Path(__file__).resolve().parents[1]


def test_snakemake_lint_finds_nothing():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "--lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output and "in a good condition" in output, output


def test_the_params_arguments_are_left_out_of_snakemakes_params_trigger():
    """Snakemake records a params value for its rerun trigger only if it can represent it; the
    `--params` arguments are not such a value, yet they are formatted into the command."""
    from snakemake.persistence import UNREPRESENTABLE, PersistenceBase
    from snakemake.utils import format as snakemake_format

    arguments = UntrackedArguments("--params params.yaml --params 'my preset.yaml'")
    assert PersistenceBase._serialize_param_builtin(None, arguments) is UNREPRESENTABLE
    assert PersistenceBase._serialize_param_builtin(None, "--params params.yaml") != UNREPRESENTABLE
    command = snakemake_format("shrinkflow train {cli} --out x", cli=arguments)
    assert command == "shrinkflow train --params params.yaml --params 'my preset.yaml' --out x"
