"""DVC after Snakemake, without running the DAG: which runs `onsuccess` records in dvc.lock
(shrinkflow.dvc_lock), what happens when it cannot, and the metrics and plots dvc.yaml shows.
tests/test_pipeline_e2e.py checks the same doors after a real run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shrinkflow import dvc_lock, dvc_yaml
from shrinkflow.dvc_lock import RunScope
from shrinkflow.report import dvc_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rendered() -> str:
    """dvc.yaml as the stage table writes it now (the checkout's may wait to be regenerated)."""
    return dvc_yaml.render_project(ROOT)


def test_a_whole_run_of_params_yaml_is_recorded():
    assert dvc_lock.skip_reason(RunScope()) is None
    assert dvc_lock.skip_reason(RunScope(targets=("all",))) is None  # the default, named
    triggers = ("mtime", "params", "input", "code")  # software-env alone may be left out
    assert dvc_lock.skip_reason(RunScope(rerun_triggers=triggers)) is None


@pytest.mark.parametrize(
    ("scope", "words"),
    [
        (RunScope(overrides=("--configfile configs/study.yaml",)), "configs/study.yaml"),
        (RunScope(overrides=("--config seeds=...",)), "--config seeds"),
        (RunScope(targets=("results/summary.csv",)), "results/summary.csv"),
        (RunScope(targets=("all", "train")), "targets: train"),
        (RunScope(narrowing=("--until train",)), "--until train"),
        (RunScope(rerun_triggers=("mtime",)), "input, params, code"),
        (RunScope(touch=True), "--touch"),
        (RunScope(immediate_submit=True), "--immediate-submit"),
    ],
)
def test_a_run_that_is_not_params_yamls_whole_dag_is_not(scope, words):
    assert words in dvc_lock.skip_reason(scope)


def test_a_project_without_dvc_is_left_alone(tmp_path):
    assert dvc_lock.record(tmp_path, RunScope()) == ""
    assert not (tmp_path / "dvc.lock").exists()


def test_a_skipped_or_failed_record_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / ".dvc").mkdir()
    skipped = dvc_lock.record(tmp_path, RunScope(targets=("train",)))
    assert skipped.startswith("note: dvc.lock not updated: this run built only part")
    unreadable = dvc_lock.record(tmp_path, RunScope())  # no params.yaml to shape dvc.yaml
    assert unreadable.startswith("warning: dvc.lock not updated: ") and "params.yaml" in unreadable
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # not what the stage table writes
    stale = dvc_lock.record(tmp_path, RunScope())
    assert stale.startswith("warning: dvc.lock not updated: dvc.yaml is not what")
    assert "`shrinkflow dvc-yaml`" in stale
    assert not (tmp_path / "dvc.lock").exists()


def test_a_failed_dvc_commit_is_a_warning_naming_dvcs_reason(tmp_path, rendered):
    """The outputs dvc.yaml names are missing here (as after no run at all): `dvc commit`
    fails, and the line says why and how to record them later."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (tmp_path / "dvc.yaml").write_text(rendered)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    line = dvc_lock.record(tmp_path, RunScope())
    assert line.startswith("warning: dvc.lock not updated: `dvc commit` failed: "), line
    assert line.endswith(dvc_lock.HINT) and "\n" not in line
    assert "does not exist" in line or "missing" in line, line
    assert not (tmp_path / "dvc.lock").exists()


def test_dvc_metrics_are_the_reports_numbers_and_no_stage_declares_others(rendered):
    spec = yaml.safe_load(rendered)
    assert spec["metrics"] == ["results/report/metrics.json"]
    assert not [name for name, stage in spec["stages"].items() if "metrics" in stage]


def test_the_metrics_file_holds_numbers_only():
    choice = {"label": "torch/resnet20/baseline", "reason": "smallest within budget",
              "val_top1": 0.91, "top1": 0.9, "drop": 0.01, "size": 1234,
              "latency_ms_b1": 1.5, "top1_interval": [0.89, 0.91], "runtime": "torch"}  # fmt: skip
    selection = {"champion": choice, "fastest": choice, "eligible": 3, "nodes": 5,
                 "decided_on": "val", "interval": "95% t"}  # fmt: skip
    record = dvc_metrics.metrics_record(selection)
    assert record["champion"] == {
        "val_top1": 0.91, "top1": 0.9, "drop": 0.01, "size": 1234, "latency_ms_b1": 1.5
    }  # fmt: skip
    assert (record["eligible"], record["nodes"]) == (3, 5) and "interval" not in record
    with pytest.raises(ValueError, match=r"fastest\.size must be numbers"):
        dvc_metrics.metrics_record({**selection, "fastest": {**choice, "size": "1 KB"}})


def test_every_plot_draws_columns_the_report_writes(rendered):
    from shrinkflow.stages import report

    nodes = f"results/report/{report.NODES_CSV}"
    plots = yaml.safe_load(rendered)["plots"]
    assert f"results/report/{report.FIGURES}" in plots
    drawn = [definition for plot in plots if isinstance(plot, dict) for definition in plot.values()]
    assert len(drawn) == 3
    for definition in drawn:
        ((file, y),) = definition["y"].items()
        assert file == nodes and {definition["x"], y} <= set(report._NODE_COLUMNS), definition
    assert ".snakemake_timestamp" in (ROOT / ".dvcignore").read_text().split()
