"""The whole DAG run for real: Snakemake, then DVC (commit, repro, push/pull), tracked in MLflow."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from browser import chromium_available, render_page
from projects import BIN, TINY, job_counts, make_project, mlflow_runs, read_summary, run, tool_env
from stage_projects import prepare_digits, run_killed, stopping_cli

from shrinkflow.stage_table import STAGES

# TINY's one-shot and structured families (structured_sensitivity reads the sensitivity stage's
# output). The gradual family runs through Snakemake in tests/test_slurm.py's torch DAG and in
# tests/test_pipeline_tf_e2e.py's (tfmot); here it was 7 more jobs, its prune job a re-training.
METHODS = [m for m in TINY["prune"]["methods"] if not m.startswith("gradual")]
POINTS = [(m, 0.5) for m in METHODS]
QUANT = TINY["quantize"]["methods"]
SOURCES = [("", ""), *[(m, str(s)) for m, s in POINTS]]  # (prune method, sparsity) per source

pytestmark = pytest.mark.slow


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("smk"), prune={"methods": METHODS})
    run([str(BIN / "snakemake"), "--cores", "2"], project)  # the README's command
    return project


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> Path:
    """The prepared data TINY's DAG trains on, made once in-process for the kill-and-resume test
    (the DAG runs above run `shrinkflow download` and `shrinkflow prepare` for real)."""
    return prepare_digits(tmp_path_factory.mktemp("prepared") / "digits")


def test_snakemake_runs_the_dag_and_writes_the_summary(snakemake_project):
    rows = read_summary(snakemake_project)
    keys = [(r["stage"], r["prune_method"], r["target_sparsity"], r["quant_method"]) for r in rows]
    assert keys == [
        ("baseline", "", "", ""),
        *[("finetuned", method, str(sparsity), "") for method, sparsity in POINTS],
        # then source by source (the baseline first), one row per quantization method
        *[("quantized", method, sparsity, q) for method, sparsity in SOURCES for q in QUANT],
    ]
    baseline = rows[0]
    assert (baseline["backend"], baseline["model"]) == ("torch", "resnet20")
    assert float(baseline["top1"]) > 0.3  # two epochs on 8x8 digits; chance is 0.1
    assert int(baseline["params"]) == int(baseline["nonzero_params"]) > 0
    model_file = snakemake_project / baseline["artifact"] / "model.pt"
    assert int(baseline["size_bytes"]) == model_file.stat().st_size
    assert 0 < int(baseline["gzip_bytes"]) < int(baseline["size_bytes"])
    assert float(baseline["latency_ms_b1"]) > 0 and float(baseline["throughput_ips"]) > 0
    by_method = {r["prune_method"]: r for r in rows[1 : 1 + len(POINTS)]}
    unstructured = by_method["l1_unstructured"]
    # measured from the saved weights: the output layer is excluded, so a little under 0.5
    assert 0.45 < float(unstructured["measured_sparsity"]) <= 0.5
    assert int(unstructured["params"]) == int(baseline["params"])
    seed0 = snakemake_project / "results/models/torch/resnet20/seed0"
    for method, sparsity in POINTS:  # top-1 right after pruning rides along to the summary
        facts = seed0 / "pruned" / method / str(sparsity) / "model/prune.json"
        pruned = json.loads(facts.read_text())["val_top1"]
        assert float(by_method[method]["pruned_val_top1"]) == pruned
    assert baseline["pruned_val_top1"] == "" and all(r["experiment_id"] for r in rows)
    structured = by_method["structured_sensitivity"]
    assert int(structured["params"]) < int(baseline["params"])  # physically smaller
    assert int(structured["macs"]) < int(baseline["macs"])
    assert float(structured["measured_sparsity"]) > 0.3  # removed weights count as gone
    assert not list(snakemake_project.rglob(".tmp-*")), "a temporary output was left behind"
    assert (
        snakemake_project / "results/models/torch/resnet20/seed0/sensitivity/ratios.json"
    ).is_file()


def source_folder(method: str, sparsity: str) -> str:
    """The folder of a quantization source, relative to results/models/torch/resnet20/seed0."""
    return f"finetuned/{method}/{sparsity}" if method else "baseline"


def test_every_source_is_quantized_smaller_and_keeps_its_zeros(snakemake_project):
    rows = read_summary(snakemake_project)
    sources = {(r["prune_method"], r["target_sparsity"]): r for r in rows[: len(SOURCES)]}
    quantized = rows[len(SOURCES) :]
    assert {r["stage"] for r in quantized} == {"quantized"}
    larger = []  # checked last, so that every other property is checked first
    for row in quantized:
        source_key = (row["prune_method"], row["target_sparsity"])
        source = sources[source_key]
        name = "model.pt2" if row["quant_method"] == "static_int8" else "model.pt"
        artefact = snakemake_project / row["artifact"] / name
        folder = f"quantized/{row['quant_method']}/{source_folder(*source_key)}"
        assert row["artifact"] == f"results/models/torch/resnet20/seed0/{folder}/model"
        assert int(row["size_bytes"]) == artefact.stat().st_size
        # int8 or 4-bit codes. Compared gzipped: a .pt2 also holds its graph as ~300 KB of JSON
        # (it gzips to a tenth), more than a structured-pruned tiny ResNet-20's whole float file.
        if int(row["gzip_bytes"]) >= int(source["gzip_bytes"]):
            larger.append(f"{folder}: {row['gzip_bytes']} >= {source['gzip_bytes']} gzip bytes")
        assert 0.0 <= float(row["top1"]) <= 1.0
        assert int(row["macs"]) == int(source["macs"])  # the same convolutions, in integers
        # zero is code 0 in both formats: rounding may add zeros, never lose one
        assert float(row["measured_sparsity"]) >= float(source["measured_sparsity"]) - 1e-9
        if row["quant_method"] == "static_int8":
            # 8 bits round only the smallest surviving weights to zero
            assert float(row["measured_sparsity"]) == pytest.approx(
                float(source["measured_sparsity"]), abs=0.02
            )
            assert float(row["top1"]) > float(source["top1"]) - 0.1  # int8 is near lossless
    assert not larger, f"quantized files not smaller than their float source: {larger}"


def test_a_quantized_node_is_measured_in_its_own_job_against_its_source(snakemake_project):
    """Each quantized folder holds its artefact and labels; the evaluate job (a process of its
    own) loads the saved artefact and times it against the float model it came from."""
    models = snakemake_project / "results/models/torch/resnet20/seed0"
    for method, sparsity in SOURCES:
        source = models / source_folder(method, sparsity) / "model/model.pt"
        for qmethod in QUANT:
            folder = models / "quantized" / qmethod / source_folder(method, sparsity)
            artefact = "model.pt2" if qmethod == "static_int8" else "model.pt"
            files = {p.name for p in (folder / "model").iterdir()} - {".snakemake_timestamp"}
            assert files == {artefact, "node.json", "run.json", "quantize.json"}
            assert json.loads((folder / "model/quantize.json").read_text())["bits"] == (
                8 if qmethod == "static_int8" else 4
            )
            record = json.loads((folder / "metrics.json").read_text())
            assert (record["stage"], record["quant_method"]) == ("quantized", qmethod)
            point = (record.get("prune_method") or "", record.get("target_sparsity"))
            assert point == (method, float(sparsity) if sparsity else None)
            assert isinstance(record["top1"], float) and 0.0 <= record["top1"] <= 1.0
            assert record["reference_size_bytes"] == source.stat().st_size
            assert record["size_bytes"] == (folder / "model" / artefact).stat().st_size
            assert record["size_ratio"] == pytest.approx(
                record["size_bytes"] / record["reference_size_bytes"]
            )
            assert record["gzip_ratio"] < 1
            assert record["latency_speedup"] > 0 and record["throughput_speedup"] > 0
            log = f"logs/evaluate/torch/resnet20/seed0/{folder.relative_to(models)}.log"
            assert f"top-1 {record['top1']:.4f}" in (snakemake_project / log).read_text()


def test_every_job_is_an_mlflow_run_with_lineage(snakemake_project):
    runs = mlflow_runs(snakemake_project)
    stages = sorted(r.data.tags["shrinkflow.stage"] for r in runs)
    assert stages == sorted(
        ["download", "prepare", "train", "sensitivity", "summarize", "report"]
        + ["prune", "finetune"] * len(POINTS)
        + ["quantize"] * len(QUANT) * len(SOURCES)
        + ["evaluate"] * len(SOURCES) * (1 + len(QUANT))
    )
    by_stage = {  # one run per stage: the baseline's chain, none of the sweep or quantized nodes
        r.data.tags["shrinkflow.stage"]: r
        for r in runs
        if not {"shrinkflow.method", "shrinkflow.qmethod"} & r.data.tags.keys()
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = {stage: r.data.tags.get("shrinkflow.source_run_id") for stage, r in by_stage.items()}
    assert parent["prepare"] == by_stage["download"].info.run_id
    assert parent["train"] == by_stage["prepare"].info.run_id
    assert parent["evaluate"] == by_stage["train"].info.run_id
    train = by_stage["train"]
    assert train.data.params["train.epochs"] == "2"
    assert train.data.tags["shrinkflow.model"] == "resnet20"
    assert train.data.tags["shrinkflow.node"] == "baseline"
    assert train.data.tags["shrinkflow.seed"] == "0"  # the default `seeds: [0]`
    assert by_stage["evaluate"].data.tags["shrinkflow.backend"] == "torch"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{snakemake_project / 'mlflow.db'}")
    history = client.get_metric_history(train.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "model")}
    assert "model/model.pt" in artifacts
    row = read_summary(snakemake_project)[0]
    assert row["run_id"] == by_stage["evaluate"].info.run_id
    by_id = {r.info.run_id: r for r in runs}
    for method, sparsity in POINTS:  # baseline -> pruned -> fine-tuned -> evaluated, as a tree
        evaluated = next(
            r
            for r in runs
            if r.data.tags["shrinkflow.stage"] == "evaluate"
            and r.data.tags.get("shrinkflow.method") == method
            and "shrinkflow.qmethod" not in r.data.tags
        )
        finetune = by_id[evaluated.data.tags["shrinkflow.source_run_id"]]
        prune = by_id[finetune.data.tags["shrinkflow.source_run_id"]]
        assert finetune.data.tags["shrinkflow.stage"] == "finetune"
        assert prune.data.tags["shrinkflow.stage"] == "prune"
        assert prune.data.tags["shrinkflow.sparsity"] == str(sparsity)
        assert prune.data.tags["shrinkflow.source_run_id"] == train.info.run_id


def test_the_report_chooses_registers_and_feeds_snakemakes_report(
    snakemake_project, tmp_path, monkeypatch
):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    report = snakemake_project / "results/report"
    record = json.loads((report / "selection.json").read_text())
    # a node's label is its folder without the seed level: results/models/<label>, seed0 dropped
    folders = [Path(r["artifact"]).parts for r in read_summary(snakemake_project)]
    labels = {"/".join(parts[2:4] + parts[5:-1]) for parts in folders}
    assert record["champion"]["label"] in labels and record["fastest"]["label"] in labels
    html = (report / "index.html").read_text()
    assert record["champion"]["label"] in html
    # self-contained: the only http URLs are links to the runs' pages in the MLflow UI
    urls = re.findall(r"""https?://[^\s"'<>)]+""", html)
    assert urls and all(u.startswith("http://127.0.0.1:5000/#/experiments/") for u in urls), urls
    # (Snakemake marks a directory output with a hidden .snakemake_timestamp)
    assert sorted(p.name for p in (report / "figures").glob("[!.]*")) == [
        "accuracy_vs_sparsity.png",
        "encodings.png",
        "latency_vs_accuracy.png",
        "layer_sparsity.png",
        "sensitivity.png",
        "size_vs_accuracy.png",
    ]
    runs = mlflow_runs(snakemake_project)
    assert len({r.data.tags["shrinkflow.invocation"] for r in runs}) == 1  # one `snakemake`
    client = MlflowClient(tracking_uri=f"sqlite:///{snakemake_project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("shrinkflow-torch", "champion")
    producer = json.loads(
        (
            snakemake_project / "results/models" / record["champion"]["shipped"] / "model/run.json"
        ).read_text()
    )
    assert version.run_id == producer["run_id"]
    # MLflow's standard loader: uint8 images (N, H, W, C) in, logits out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{snakemake_project / 'mlflow.db'}")
    champion = mlflow.pyfunc.load_model("models:/shrinkflow-torch@champion")
    (shape,) = champion.metadata.get_input_schema().inputs
    logits = champion.predict(np.zeros((3, *shape.shape[1:]), np.uint8))
    assert logits.shape == (3, len(champion.metadata.metadata["classes"]))
    if chromium_available():  # installed by `make test`; the page as a browser shows it
        check = render_page(report / "index.html", tmp_path / "report.png")
        assert check.problems() == [] and check.ink_fraction > 0.05, check
    built = tmp_path / "snakemake-report.html"
    run([str(BIN / "snakemake"), "--report", str(built)], snakemake_project)
    text = built.read_text()
    assert "shrinkflow&#x27;s own report" in text or "shrinkflow's own report" in text
    assert "size_vs_accuracy.png" in text


def run_key(run) -> tuple[str, str, str]:
    """(prune method, sparsity, quantization method) of a run's node, "" where it has none."""
    tags = run.data.tags
    return tuple(tags.get(f"shrinkflow.{k}", "") for k in ("method", "sparsity", "qmethod"))


def test_quantized_nodes_hang_under_the_run_that_wrote_their_source(snakemake_project):
    """train / finetune -> quantize -> evaluate: the lineage tree of every quantized node."""
    runs = mlflow_runs(snakemake_project)
    of_stage = {
        stage: {run_key(r): r for r in runs if r.data.tags["shrinkflow.stage"] == stage}
        for stage in ("train", "finetune", "quantize", "evaluate")
    }
    writers = {**of_stage["train"], **of_stage["finetune"]}  # the runs that wrote each source
    expected = sorted((m, s, q) for m, s in SOURCES for q in QUANT)
    assert sorted(of_stage["quantize"]) == expected
    rows = {
        (r["prune_method"], r["target_sparsity"], r["quant_method"]): r
        for r in read_summary(snakemake_project)
    }
    for (method, sparsity, qmethod), quantize in of_stage["quantize"].items():
        tags = quantize.data.tags
        assert tags["shrinkflow.source_run_id"] == writers[(method, sparsity, "")].info.run_id
        assert (tags["shrinkflow.node"], tags["shrinkflow.model"]) == ("quantized", "resnet20")
        evaluate = of_stage["evaluate"][(method, sparsity, qmethod)]
        assert evaluate.data.tags["shrinkflow.source_run_id"] == quantize.info.run_id
        assert rows[(method, sparsity, qmethod)]["run_id"] == evaluate.info.run_id
        folder = f"quantized/{qmethod}/{source_folder(method, sparsity)}/model"
        run_ref = snakemake_project / "results/models/torch/resnet20/seed0" / folder / "run.json"
        assert json.loads(run_ref.read_text())["run_id"] == quantize.info.run_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{snakemake_project / 'mlflow.db'}")
    static = of_stage["quantize"][("", "", "static_int8")]
    artifacts = {a.path for a in client.list_artifacts(static.info.run_id, "model")}
    assert "model/model.pt2" in artifacts


def test_rerun_is_a_no_op_and_a_param_change_reruns_only_its_branch(snakemake_project, tmp_path):
    snakemake = str(BIN / "snakemake")
    dry = run([snakemake, "-n", "--cores", "2"], snakemake_project)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    preset = tmp_path / "more-repeats.yaml"
    preset.write_text("evaluate: {repeats: 4}\n")
    changed = run([snakemake, "-n", "--cores", "2", "--configfile", str(preset)], snakemake_project)
    assert job_counts(changed.stdout) == {
        "evaluate": len(SOURCES),
        "evaluate_quantized": len(SOURCES) * len(QUANT),
        "summarize": 1,
        "report": 1,
        "all": 1,
    }
    # the report's budget is read by the report alone
    budget = tmp_path / "budget.yaml"
    budget.write_text("report: {max_accuracy_drop: 0.05}\n")
    rebudgeted = run(
        [snakemake, "-n", "--cores", "2", "--configfile", str(budget)], snakemake_project
    )
    assert job_counts(rebudgeted.stdout) == {"report": 1, "all": 1}
    # one more sparsity: only the new branch of each method (and the summary) runs
    more = tmp_path / "more-sparsities.yaml"
    more.write_text("prune: {sparsities: [0.5, 0.8]}\n")
    grown = run([snakemake, "-n", "--cores", "2", "--configfile", str(more)], snakemake_project)
    n = len(POINTS)
    assert job_counts(grown.stdout) == {
        "prune": n,
        "finetune": n,
        "evaluate": n,
        "quantize": n * len(QUANT),
        "evaluate_quantized": n * len(QUANT),
        "summarize": 1,
        "report": 1,
        "all": 1,
    }
    assert "pruned/l1_unstructured/0.8/model" in grown.stdout
    assert "quantized/static_int8/finetuned/l1_unstructured/0.8/model" in grown.stdout
    # calibration is read by the int8 methods only: the fixed-point nodes stay as they are
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text("quantize: {calibration_batches: 2}\n")
    recalibrated = run(
        [snakemake, "-n", "--cores", "2", "--configfile", str(calibration)], snakemake_project
    )
    assert job_counts(recalibrated.stdout) == {
        "quantize": len(SOURCES),
        "evaluate_quantized": len(SOURCES),
        "summarize": 1,
        "report": 1,
        "all": 1,
    }
    assert "qmethod=fixed_w4" not in recalibrated.stdout
    # a new method adds its nodes and leaves the others alone
    one_more = tmp_path / "one-more-method.yaml"
    one_more.write_text(yaml.safe_dump({"quantize": {"methods": [*QUANT, "qat_int8"]}}))
    added = run([snakemake, "-n", "--cores", "2", "--configfile", str(one_more)], snakemake_project)
    assert job_counts(added.stdout) == {
        "quantize": len(SOURCES),
        "evaluate_quantized": len(SOURCES),
        "summarize": 1,
        "report": 1,
        "all": 1,
    }
    assert "quantized/qat_int8/baseline/model" in added.stdout
    # a change to one method family's section re-runs only that family
    structured = tmp_path / "structured.yaml"
    structured.write_text("prune: {structured: {max_layer_ratio: 0.8}}\n")
    regrown = run(
        [snakemake, "-n", "--cores", "2", "--configfile", str(structured)], snakemake_project
    )
    assert job_counts(regrown.stdout) == {
        "prune": 1,
        "finetune": 1,
        "evaluate": 1,
        "quantize": len(QUANT),
        "evaluate_quantized": len(QUANT),
        "summarize": 1,
        "report": 1,
        "all": 1,
    }


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
PLOTS = [  # dvc.yaml's plots of results/report/nodes.csv
    "Test top-1 against target sparsity",
    "Validation top-1 against size",
    "Validation top-1 against latency at batch 1",
]


def test_dvc_sees_what_snakemake_built(snakemake_project):
    """Right after the run (its `onsuccess` wrote dvc.lock): nothing for DVC to do, and its
    plots and metrics read the report (no Snakemake marker file in the way, numbers only)."""
    dvc = str(BIN / "dvc")
    assert (snakemake_project / "dvc.lock").is_file()
    status = run([dvc, "status"], snakemake_project)
    assert "up to date" in status.stdout.lower(), status.stdout
    repro = run([dvc, "repro"], snakemake_project)
    assert "Running stage" not in repro.stdout, repro.stdout
    shown = json.loads(run([dvc, "plots", "show", "--json"], snakemake_project).stdout)
    assert "errors" not in shown, shown.get("errors")
    assert "results/report/figures/size_vs_accuracy.png" in shown["data"]
    assert set(PLOTS) <= shown["data"].keys()
    # committed: HEAD's report files come from DVC's cache, where the run's dvc.lock put them
    run([*GIT, "add", "-A"], snakemake_project)
    run([*GIT, "commit", "-q", "-m", "snakemake run"], snakemake_project)
    diff = json.loads(run([dvc, "plots", "diff", "HEAD", "--json"], snakemake_project).stdout)
    assert "errors" not in diff, diff.get("errors")
    for plot in PLOTS:
        (rendered,) = diff["data"][plot]
        assert sorted(rendered["revisions"]) == ["HEAD", "workspace"], rendered["revisions"]
    shown = json.loads(run([dvc, "metrics", "show", "--json"], snakemake_project).stdout)
    (workspace,) = shown.values()  # the one revision shown
    files = workspace["data"]
    assert list(files) == ["results/report/metrics.json"], list(files)
    numbers = files["results/report/metrics.json"]["data"]
    leaves = [v for role in ("champion", "fastest") for v in numbers.pop(role).values()]
    leaves += list(numbers.values())  # eligible, nodes
    assert leaves and all(isinstance(v, int | float) for v in leaves), leaves


def test_dvc_push_and_pull_round_trip_the_checkpoint(snakemake_project):
    dvc = str(BIN / "dvc")
    model = snakemake_project / "results/models/torch/resnet20/seed0/baseline/model/model.pt"
    before = md5(model)
    run([dvc, "commit", "-f", "-q"], snakemake_project)
    run([dvc, "push", "-q"], snakemake_project)
    assert any((snakemake_project / "dvc-storage").rglob("*")), "nothing reached the remote"
    shutil.rmtree(snakemake_project / ".dvc/cache")
    shutil.rmtree(model.parent)
    run([dvc, "pull", "-q"], snakemake_project)
    assert md5(model) == before


# Every stage of dvc.yaml (a matrix stage's items all run the same command template): one per
# stage of the stage table, or per alternative source of a stage that has them.
DVC_STAGES = [
    stage.name + suffix for stage in STAGES for suffix in (stage.alternatives or {"": None})
]


def dvc_stages_run(output: str) -> dict[str, int]:
    """How many times `dvc repro` ran each stage (from its "Running stage 'name@item'" lines)."""
    return dict(Counter(re.findall(r"Running stage '([a-z_]+)[@']", output)))


def test_dvc_repro_runs_the_same_dag_from_scratch(tmp_path):
    """`dvc repro` in a fresh checkout runs every stage of dvc.yaml, each after the stages whose
    outputs it reads, and tracks each job in MLflow under one invocation; a params change re-runs
    only the stages that read it, `dvc plots` compares revisions, and a re-run is a no-op.

    One sweep point and one quantization method: every item of a stage's matrix runs the same
    command, so one item of each stage is enough here (the Snakemake run above covers more
    pruning methods and both quantization methods). structured_sensitivity is the pruning method
    that reads the sensitivity stage's output; fixed_w4 is the quickest quantization; one
    training epoch, as nothing here reads the accuracy."""
    quant = ["fixed_w4"]
    point = ("structured_sensitivity", "0.5")
    project = make_project(
        tmp_path, quantize_methods=quant, prune={"methods": [point[0]]}, train={"epochs": 1}
    )
    result = run([str(BIN / "dvc"), "repro"], project)
    assert dvc_stages_run(result.stdout) == dict.fromkeys(DVC_STAGES, 1), result.stdout
    rows = read_summary(project)
    keys = [(r["stage"], r["prune_method"], r["target_sparsity"], r["quant_method"]) for r in rows]
    assert keys == [
        ("baseline", "", "", ""),
        ("finetuned", *point, ""),
        *[("quantized", *source, q) for source in [("", ""), point] for q in quant],
    ]
    assert (project / "dvc.lock").is_file()
    runs = mlflow_runs(project)
    assert sorted(r.data.tags["shrinkflow.stage"] for r in runs) == sorted(
        ["download", "prepare", "train", "sensitivity", "prune", "finetune", "summarize"]
        + ["report", "quantize", "quantize"]
        + ["evaluate"] * 4  # the baseline, the fine-tuned point and both quantized nodes
    )
    # no SHRINKFLOW_INVOCATION_ID here: the stages take the `dvc repro` process's identity
    assert len({r.data.tags["shrinkflow.invocation"] for r in runs}) == 1
    # `dvc plots diff` between a commit and the workspace after a changed budget
    run([*GIT, "add", "-A"], project)
    run([*GIT, "commit", "-q", "-m", "first sweep"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["report"]["max_accuracy_drop"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = run([str(BIN / "dvc"), "repro"], project)
    assert dvc_stages_run(again.stdout) == {"report": 1}, again.stdout  # no train@, no other
    dvc_plots = [str(BIN / "dvc"), "plots"]
    diff = json.loads(run([*dvc_plots, "diff", "HEAD", "--json"], project).stdout)["data"]
    for plot in ("Test top-1 against target sparsity", "Validation top-1 against size"):
        (rendered,) = diff[plot]
        assert sorted(rendered["revisions"]) == ["HEAD", "workspace"], rendered["revisions"]
        rows = rendered["content"]["data"]["values"]
        assert {r["rev"] for r in rows} == {"HEAD", "workspace"}
    images = diff["results/report/figures/size_vs_accuracy.png"]
    assert sorted(rev for image in images for rev in image["revisions"]) == ["HEAD", "workspace"]
    shown = json.loads(run([*dvc_plots, "show", "--json"], project).stdout)["data"]
    assert "Validation top-1 against latency at batch 1" in shown
    again = run([str(BIN / "dvc"), "repro"], project)
    assert "Running stage" not in again.stdout


def test_a_killed_train_job_resumes_in_the_same_mlflow_run(tmp_path, prepared_digits):
    """`shrinkflow train` killed outright (SIGKILL, no cleanup) once it saved epoch 1's resume
    state: the re-run resumes at epoch 2 (the last: one epoch after the kill is enough to show
    that the first is not trained again), continues the same MLflow run (each epoch logged once)
    and names it in the model's run.json."""
    import torch

    project = make_project(tmp_path / "project")
    shutil.copytree(prepared_digits, project / "data/prepared/digits")
    epochs = 2
    out = project / "results/models/torch/resnet20/seed0/baseline/model"
    train = ["train", "--set", f"train.epochs={epochs}", "--backend", "torch",
             "--model", "resnet20", "--in", "data/prepared/digits", "--out", str(out)]  # fmt: skip
    run_killed(project, train, tmp_path / "bin", kill_after=("state.pt", 1))
    state = out.parent / "resume/state.pt"
    assert torch.load(state, weights_only=True)["epoch"] == 1 and not out.exists()

    resumed = run([str(BIN / "shrinkflow"), *train], project)
    assert f"resuming from epoch 2/{epochs}" in resumed.stderr
    runs = [r for r in mlflow_runs(project) if r.data.tags["shrinkflow.stage"] == "train"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_top1")]
    assert sorted(steps) == list(range(1, epochs + 1))
    assert json.loads((out / "run.json").read_text())["run_id"] == runs[0].info.run_id


def test_a_bad_quantize_method_stops_the_dag_and_the_cli_with_one_line(snakemake_project):
    """Refused before any job starts: no quantized folder and no MLflow run appear."""
    runs_before = len(mlflow_runs(snakemake_project))
    env = tool_env()
    models = "results/models/torch/resnet20/seed0"
    commands = [
        [str(BIN / "snakemake"), "--cores", "2", "--config", 'quantize={"methods": ["fixed_w1"]}'],
        [str(BIN / "shrinkflow"), "quantize", "--params", "params.yaml",
         "--set", "quantize.methods=[fixed_w1]", "--method", "fixed_w4",
         "--in", f"{models}/baseline/model", "--data", "data/prepared/digits",
         "--out", f"{models}/quantized/fixed_w1/baseline/model"],
    ]  # fmt: skip
    for cmd in commands:
        result = subprocess.run(cmd, cwd=snakemake_project, env=env, capture_output=True, text=True)
        assert result.returncode != 0, cmd
        # Snakemake also notes on stderr that --config extends params.yaml
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert errors[0].startswith("error: quantize.methods[0]: 'fixed_w1'")
        assert "2..16" in errors[0]  # what is allowed
        assert not (snakemake_project / models / "quantized/fixed_w1").exists()
    assert len(mlflow_runs(snakemake_project)) == runs_before


def test_a_killed_qat_job_resumes_in_the_same_mlflow_run(snakemake_project, tmp_path):
    """The `shrinkflow quantize` job of a QAT node, run by Snakemake, is killed outright
    (SIGKILL) once it saved its first epoch's resume state; the next `snakemake` re-runs only
    that job, which resumes its fake-quantized training and continues the same MLflow run."""
    import torch

    project = tmp_path / "project"  # a copy: the runs added here stay out of the other tests
    shutil.copytree(snakemake_project, project, symlinks=True)
    epochs = 2
    qat = tmp_path / "qat.yaml"
    qat.write_text(
        yaml.safe_dump({"quantize": {"methods": ["qat_int8"], "qat": {"epochs": epochs}}})
    )
    folder = project / "results/models/torch/resnet20/seed0/quantized/qat_int8/baseline"
    target = str((folder / "model").relative_to(project))
    snakemake = [str(BIN / "snakemake"), target, "--cores", "2", "--configfile", str(qat)]
    killing = stopping_cli(tmp_path / "bin", kill_after=("state.pt", 1))
    env = tool_env()
    killed = subprocess.run(
        snakemake,
        cwd=project,
        env={**env, "PATH": f"{killing}:{env['PATH']}"},  # the jobs' `shrinkflow`
        capture_output=True,
        text=True,
    )
    assert killed.returncode != 0 and "Error in rule quantize" in killed.stderr, killed.stderr
    assert torch.load(folder / "resume/state.pt", weights_only=True)["epoch"] == 1
    assert not (folder / "model").exists()

    resumed = run(snakemake, project)
    assert job_counts(resumed.stdout + resumed.stderr) == {"quantize": 1}  # nothing upstream
    log = project / "logs/quantize/torch/resnet20/seed0/qat_int8/baseline.log"
    assert f"resuming from epoch 2/{epochs}" in log.read_text()
    runs = mlflow_runs(project)
    qat_runs = [r for r in runs if r.data.tags.get("shrinkflow.qmethod") == "qat_int8"]
    assert len(qat_runs) == 1 and qat_runs[0].info.status == "FINISHED"
    train = next(r for r in runs if r.data.tags["shrinkflow.stage"] == "train")
    assert qat_runs[0].data.tags["shrinkflow.source_run_id"] == train.info.run_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(qat_runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))  # each epoch once, across both processes
    assert json.loads((folder / "model/run.json").read_text())["run_id"] == qat_runs[0].info.run_id
    facts = json.loads((folder / "model/quantize.json").read_text())
    assert (facts["qat_epochs"], facts["qat_resumed_from_epoch"]) == (epochs, 1)
    assert (folder / "model/model.pt2").is_file() and facts["quantized_layers"] > 0
