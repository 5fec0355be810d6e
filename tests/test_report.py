"""`shrinkflow report`: the checked summary, the choice under the budget, the CLI's bad input."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import summary_rows, write_summary

from shrinkflow.errors import ShrinkflowError
from shrinkflow.invocation import ENV, invocation_id
from shrinkflow.metrics import SUMMARY_COLUMNS
from shrinkflow.report import noise, selection, table
from shrinkflow.stages import report as report_stage

ROOT = Path(__file__).resolve().parents[1]
SHRINKFLOW = str(Path(sys.executable).parent / "shrinkflow")


def annotated(tmp_path: Path, rows: list[dict], budget: float = 0.01, size="gzip_bytes"):
    df = table.load_summary(write_summary(tmp_path / "summary.csv", rows))
    return table.annotate(df, budget, size)


def test_the_budget_is_measured_on_validation_from_each_nodes_own_baseline(tmp_path):
    rows = summary_rows(models=("resnet20", "resnet44"))  # resnet44's baseline is 1 pt lower
    df = annotated(tmp_path, rows)
    for _, group in df.groupby(["backend", "model"]):
        base = group[group["stage"] == "baseline"].iloc[0]
        assert (group["baseline_val_top1"] == base.val_top1).all()
        np.testing.assert_allclose(group["drop"], base.val_top1 - group["val_top1"])
        np.testing.assert_allclose(group["test_drop"], base.top1 - group["top1"])
        assert group["eligible"].tolist() == (group["drop"] <= 0.01 + 1e-9).tolist()
    assert df.loc[df["stage"] == "baseline", "eligible"].all()


def test_validation_decides_when_test_disagrees(tmp_path):
    """Two fine-tuned points of equal size: the one better on validation is chosen, though the
    other is better on test; and a point within budget on test only is out of budget."""
    rows = [r for r in summary_rows(backends=("torch",), qmethods=()) if r["stage"] != "pruned"]
    base = rows[0]
    base.update(top1=0.95, val_top1=0.95)
    points = rows[1:]
    for row in points:
        row.update(top1=0.90, val_top1=0.90, gzip_bytes=500_000)  # all out of budget
    a, b, c = points[0], points[1], points[2]
    a.update(top1=0.945, val_top1=0.944, gzip_bytes=100_000)  # good on both
    b.update(top1=0.949, val_top1=0.942, gzip_bytes=100_000)  # better test, worse val
    c.update(top1=0.950, val_top1=0.930, gzip_bytes=50_000)  # smallest, in budget on test only
    df = annotated(tmp_path, rows)
    chosen = selection.select(df, 0.01, "gzip_bytes")
    label = f"torch/resnet20/finetuned/{a['prune_method']}/{a['target_sparsity']}"
    assert chosen.champion.label == label
    by_test = df[df["test_drop"] <= 0.01 + 1e-9].sort_values(["size", "top1"]).iloc[0]
    assert by_test.label != chosen.champion.label, "a test-picked champion would differ"
    assert "validation top-1 0.9440" in chosen.champion.reason
    assert "test top-1 0.9450" in chosen.champion.reason
    row = df[df["label"] == chosen.champion.label].iloc[0]
    assert not df.loc[df["size"] == 50_000, "eligible"].iloc[0]
    assert row.pareto


def test_seeds_aggregate_with_student_t_intervals(tmp_path):
    rows = summary_rows(backends=("torch",), qmethods=(), seeds=(0, 1, 2))
    df = annotated(tmp_path, rows)
    assert len(df) == len(rows) // 3 and (df["seeds"] == 3).all()
    point = df[df["stage"] == "finetuned"].iloc[0]
    mine = [r for r in rows if r["stage"] == "finetuned"][::4][:3]
    assert [r["seed"] for r in mine] == [0, 1, 2]
    values = np.array([r["val_top1"] for r in mine])
    half = 4.302652729749464 * values.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert point.val_top1 == pytest.approx(values.mean())
    assert (point.val_top1_low, point.val_top1_high) == pytest.approx(
        (values.mean() - half, values.mean() + half)
    )
    bases = np.array([r["val_top1"] for r in rows if r["stage"] == "baseline"])
    diffs = bases - values
    half = 4.302652729749464 * diffs.std(ddof=1) / np.sqrt(3)
    assert (point.drop_low, point.drop_high) == pytest.approx(
        (diffs.mean() - half, diffs.mean() + half)
    )
    assert point.within_noise == (point.drop_low <= 0 <= point.drop_high)
    assert point.interval == "95 % Student-t interval over 3 training seeds"
    assert point.shipped == f"torch/resnet20/seed{int(np.argmax(values))}/{point.label[15:]}"


def test_quantization_cost_and_top1_after_pruning_pair_each_seed_with_its_own_chain(tmp_path):
    rows = summary_rows(backends=("torch",), methods=("l1_unstructured",), sparsities=(0.5,),
                        qmethods=("static_int8",), seeds=(0, 1, 2))  # fmt: skip
    df = annotated(tmp_path, rows).set_index("label")
    point = "torch/resnet20/finetuned/l1_unstructured/0.5"
    copy = df.loc["torch/resnet20/quantized/static_int8/finetuned/l1_unstructured/0.5"]
    assert copy.source == point and df.loc[point, "source"] == ""
    by_seed = {(r["stage"], r["seed"]): r for r in rows if r["prune_method"]}
    floats = np.array([by_seed["finetuned", k]["val_top1"] for k in (0, 1, 2)])
    copies = np.array([by_seed["quantized", k]["val_top1"] for k in (0, 1, 2)])
    expected = noise.drop_interval(list(floats), list(copies), 144)
    assert (copy.quant_drop, copy.quant_drop_low, copy.quant_drop_high) == pytest.approx(expected)
    assert copy.quant_drop == pytest.approx((floats - copies).mean())
    pruned = [by_seed["finetuned", k]["pruned_val_top1"] for k in (0, 1, 2)]
    assert df.loc[point, "pruned_val_top1"] == pytest.approx(np.mean(pruned))
    assert (df.loc[point, "pruned_val_top1_low"], df.loc[point, "pruned_val_top1_high"]) == (
        pytest.approx(tuple(noise.accuracy_interval(pruned, 144))[1:])
    )
    base = df.loc["torch/resnet20/baseline"]
    assert np.isnan(base.pruned_val_top1) and np.isnan(base.quant_drop)
    assert base.experiment_id == "1" and copy.experiment_id == "2"


@pytest.mark.parametrize(
    ("uri", "ui"),
    [
        ("http://tracker:5000/", "http://tracker:5000"),  # a tracking server serves its UI
        ("sqlite:///mlflow.db", "http://127.0.0.1:5000"),  # else the one `make mlflow-ui` serves
    ],
)
def test_run_links_point_at_the_ui_of_the_store_the_runs_are_in(uri, ui):
    cfg = {"tracking": {"uri": uri}, "report": {"mlflow_ui": "http://127.0.0.1:5000"}}
    assert report_stage._mlflow_ui(cfg) == ui


def test_an_accuracy_interval_stays_within_0_and_1():
    high = noise.accuracy_interval([0.99, 1.0, 0.95], 144)
    assert high.high == 1.0 and high.low == pytest.approx(
        0.98 - 4.302652729749464 * np.std([0.99, 1.0, 0.95], ddof=1) / np.sqrt(3)
    )
    assert noise.drop_interval([0.0, 1.0], [1.0, 0.0], 10).low == -1.0


def test_one_seed_gets_wilson_and_newcombe_intervals(tmp_path):
    rows = [r for r in summary_rows(backends=("torch",), qmethods=()) if r["stage"] != "pruned"]
    rows[0].update(val_top1=0.95)
    rows[1].update(val_top1=0.9375)
    df = annotated(tmp_path, rows)
    point = df.iloc[1]
    # Wilson score interval of 135/144 (computed by hand from the textbook formula)
    z, n, p = 1.959963984540054, 144, 0.9375
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (point.val_top1_low, point.val_top1_high) == pytest.approx(
        (centre - half, centre + half)
    )
    assert point["drop"] == pytest.approx(0.0125)
    assert point.drop_low < 0 < point.drop_high and point.within_noise
    assert point.interval == "95 % Wilson interval (one seed, 144 validation images)"


def test_the_champion_is_the_smallest_within_budget_and_the_reason_says_so(tmp_path):
    df = annotated(tmp_path, summary_rows())
    chosen = selection.select(df, 0.01, "gzip_bytes")
    within = df[df["eligible"]]
    smallest = within.sort_values(["size", "val_top1"], ascending=[True, False]).iloc[0]
    assert chosen.champion.label == smallest.label
    assert not (df[~df["eligible"]]["size"] >= smallest["size"]).all(), "the budget binds here"
    assert f"{int(smallest['size']):,} gzip bytes" in chosen.champion.reason
    assert "within 1 pt" in chosen.champion.reason
    fastest = within.sort_values("latency_ms_b1").iloc[0]
    assert chosen.fastest is not None and chosen.fastest.label == fastest.label
    assert f"{fastest.latency_ms_b1:.2f} ms" in chosen.fastest.reason
    assert (chosen.eligible, chosen.total) == (int(df["eligible"].sum()), len(df))
    assert [c.label for c in chosen.per_model] == [
        selection.select(df[df["backend"] == b], 0.01, "gzip_bytes").champion.label
        for b in ("torch", "tensorflow")
    ]


def test_a_zero_budget_keeps_the_baseline_unless_something_smaller_is_as_accurate(tmp_path):
    rows = [r for r in summary_rows(backends=("torch",)) if r["stage"] != "quantized"]
    df = annotated(tmp_path, rows, budget=0.0)
    chosen = selection.select(df, 0.0, "gzip_bytes")
    assert chosen.champion.label == "torch/resnet20/baseline"
    assert "95 % Wilson interval (one seed, 144 validation images)" in chosen.champion.reason
    assert "the baseline is kept" in chosen.champion.reason
    assert chosen.fastest is None or chosen.fastest.label != chosen.champion.label


def test_size_bytes_ignores_what_only_compression_sees(tmp_path):
    rows = [r for r in summary_rows(backends=("torch",)) if r["quant_method"] != "fixed_w4"]
    df = annotated(tmp_path, rows, budget=0.05, size="size_bytes")
    chosen = selection.select(df, 0.05, "size_bytes")
    # unstructured zeros do not shrink the file: every int8 file is the same size, so the most
    # accurate int8 one wins; by gzip bytes the sparsest one would
    champion = df[df["label"] == chosen.champion.label].iloc[0]
    assert champion.quant_method == "static_int8"
    assert champion.val_top1 == df[df["quant_method"] == "static_int8"]["val_top1"].max()
    assert "bytes" in chosen.champion.reason and "gzip" not in chosen.champion.reason


def test_pareto_front_keeps_only_undominated_points():
    size = np.array([10, 20, 30, 20, 5, 40])
    top1 = np.array([0.90, 0.95, 0.97, 0.93, 0.80, 0.97])
    assert table.pareto_mask(size, top1).tolist() == [True, True, True, False, True, False]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: [r for r in rows if r["stage"] != "baseline" or r["backend"] != "torch"],
         "no baseline row for torch/resnet20 seed 0"),
        (lambda rows: rows + [rows[0]], "2 baseline rows for torch/resnet20 seed 0"),
        (lambda rows: [{**rows[0], "top1": "n/a"}, *rows[1:]], "row 2, column top1 'n/a' is not"),
        (lambda rows: [{**rows[0], "gzip_bytes": ""}, *rows[1:]], "column gzip_bytes is empty"),
        (lambda rows: [{**rows[0], "stage": "distilled"}, *rows[1:]],
         "row 2 has stage 'distilled'; allowed: baseline, pruned, finetuned, quantized"),
        (lambda rows: [], "no rows; nothing was evaluated"),
    ],
)  # fmt: skip
def test_a_bad_summary_is_one_line_naming_the_problem(tmp_path, mutate, message):
    path = write_summary(tmp_path / "summary.csv", mutate(summary_rows()))
    with pytest.raises(ShrinkflowError, match="^--summary .*" + message.replace("(", r"\(")):
        table.load_summary(path)


def test_missing_columns_are_named(tmp_path):
    columns = tuple(c for c in SUMMARY_COLUMNS if c not in ("top1", "latency_ms_b1"))
    path = write_summary(tmp_path / "summary.csv", summary_rows(), columns)
    with pytest.raises(ShrinkflowError, match=r"missing column\(s\) top1, latency_ms_b1"):
        table.load_summary(path)


def shrinkflow(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([SHRINKFLOW, *args], cwd=project, capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (lambda p: write_summary(p / "summary.csv", summary_rows()[1:]), [],
         "error: --summary summary.csv: no baseline row for torch/resnet20 seed 0"),
        (lambda p: write_summary(p / "summary.csv", summary_rows(), SUMMARY_COLUMNS[:-3]), [],
         "error: --summary summary.csv: missing column(s) run_id, experiment_id, artifact"),
        (lambda p: write_summary(p / "summary.csv", summary_rows()),
         ["--set", "report.max_accuracy_drop=-0.01"],
         "error: report.max_accuracy_drop: -0.01 is not in [0, 1]"),
        (lambda p: write_summary(p / "summary.csv", summary_rows()),
         ["--set", "report.size_metric=bytes"],
         "error: report.size_metric: 'bytes' is not one of gzip_bytes, size_bytes"),
        (lambda p: None, [], "error: --summary summary.csv: no such file"),
    ],
)  # fmt: skip
def test_bad_input_stops_the_cli_with_one_line_and_writes_nothing(tmp_path, setup, extra, message):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    setup(tmp_path)
    (tmp_path / "results/models").mkdir(parents=True)
    result = shrinkflow(
        tmp_path,
        "report",
        "--summary", "summary.csv",
        "--models", "results/models",
        "--out", "results/report",
        *extra,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == message or result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results/report").exists()
    assert not list((tmp_path / "results").glob(".tmp-*"))
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for a job that never started"


def test_an_earlier_report_survives_a_bad_rerun(tmp_path):
    """The old report stays whole when a re-run fails on its input."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    report = tmp_path / "results/report"
    report.mkdir(parents=True)
    (report / "index.html").write_text("the previous report")
    write_summary(tmp_path / "summary.csv", summary_rows()[1:])
    args = ["--summary", "summary.csv", "--models", "results", "--out", "results/report"]
    result = shrinkflow(tmp_path, "report", *args)
    assert result.returncode == 2
    assert (report / "index.html").read_text() == "the previous report"


def test_one_invocation_id_for_every_job_of_one_launcher(tmp_path, monkeypatch):
    """Set: the variable wins. Unset: jobs launched through shells by one process (as `dvc
    repro` launches its stages) share an id, and the next launcher gets another."""
    monkeypatch.setenv(ENV, "inv-1")
    assert invocation_id() == "inv-1"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    probe = (
        f"{sys.executable} -c 'from shrinkflow.invocation import invocation_id as i; print(i())'"
    )
    launcher = (
        "import subprocess, sys\n"
        "for _ in range(2):\n"
        f"    subprocess.run({probe!r}, shell=True, check=True)\n"
    )

    def launch() -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", launcher], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    first, second = launch(), launch()
    assert first[0] == first[1] and first[0].startswith("launcher-")
    assert second[0] == second[1] and second[0] != first[0]


def test_the_report_run_is_not_created_for_a_bad_budget_in_an_existing_store(tmp_path):
    """A store that already holds runs keeps exactly those runs when the report refuses."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    write_summary(tmp_path / "summary.csv", summary_rows())
    (tmp_path / "results/models").mkdir(parents=True)
    ok = shrinkflow(
        tmp_path, "report", "--summary", "summary.csv", "--models", "results/models",
        "--out", "results/report", "--set", "report.registered_model=null",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        before = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    bad = write_summary(tmp_path / "bad.csv", summary_rows()[1:])
    failed = shrinkflow(
        tmp_path, "report", "--summary", str(bad), "--models", "results/models",
        "--out", "results/report",
    )  # fmt: skip
    assert failed.returncode == 2
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == before
    record = json.loads((tmp_path / "results/report/selection.json").read_text())
    assert (record["decided_on"], record["reported"]) == ("validation", "test")
    assert (
        record["champion"]["label"]
        == selection.select(
            table.annotate(table.load_summary(tmp_path / "summary.csv"), 0.01, "gzip_bytes"),
            0.01,
            "gzip_bytes",
        ).champion.label
    )
