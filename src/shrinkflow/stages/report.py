"""`shrinkflow report`: the DAG's last node. Reads results/summary.csv (and, for the chosen
models and the sensitivity sweeps, the per-node files under results/models), chooses a model
under ``report.max_accuracy_drop``, writes results/report/ and records the choice in MLflow.

Every input is checked before anything is written or logged: a bad summary or budget leaves no
report folder and no MLflow run behind.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from shrinkflow import tracking
from shrinkflow.errors import ShrinkflowError
from shrinkflow.invocation import invocation_id
from shrinkflow.metrics import SUMMARY_COLUMNS
from shrinkflow.outputs import atomic_dir, read_json, write_json
from shrinkflow.progress import say
from shrinkflow.report import plots, render, selection, table
from shrinkflow.report.render import FigureFile, ReportContext
from shrinkflow.report.selection import Choice, Selection
from shrinkflow.sensitivity_report import CSV_FILE as SENSITIVITY_CSV

FIGURES = "figures"  # PNGs live here; index.html embeds them, report.md links them
NODES_CSV = "nodes.csv"  # the annotated table: `dvc plots` draws from it
SELECTION_JSON = "selection.json"  # the choice, machine-readable (a DVC metric)
# The node table: the summary's identifying columns and top-1 (its first 8), then the report's.
_NODE_COLUMNS = [
    "label",
    *SUMMARY_COLUMNS[:8],
    *("drop", "size", "gzip_bytes", "size_bytes", "latency_ms_b1", "eligible", "pareto"),
]


def run(cfg: dict, summary: Path, models_dir: Path, out: Path) -> None:
    budget = cfg["report"]["max_accuracy_drop"]
    size_metric = cfg["report"]["size_metric"]
    df = table.annotate(table.load_summary(summary), budget, size_metric)
    chosen = selection.select(df, budget, size_metric)
    layers = _layer_sparsity(models_dir, df, chosen)
    curves = _sensitivity_curves(models_dir, df)
    invocation = invocation_id()
    with tracking.job_run(cfg, "report", out=out, run_name="report") as job:
        with atomic_dir(out) as staging:
            figures = _draw(staging, df, chosen, layers, curves, budget)
            notes = _notes(df, layers, curves)
            facts = _facts(cfg, summary, chosen, invocation, job.run_id)
            context = ReportContext(
                title=f"shrinkflow report: {cfg['data']['name']}",
                df=df,
                selection=chosen,
                figures=figures,
                facts=facts,
                notes=notes,
            )
            render.write_html(context, staging)
            render.write_markdown(context, staging)
            _write_nodes(df, staging / NODES_CSV)
            write_json(staging / SELECTION_JSON, _selection_record(df, chosen))
        champion = _row(df, chosen.champion.label)
        job.log_metrics(
            {
                "champion_top1": champion.top1,
                "champion_drop": champion["drop"],
                "champion_size": champion["size"],
                "champion_latency_ms_b1": champion.latency_ms_b1,
                "eligible": chosen.eligible,
                "nodes": chosen.total,
            }
        )
        job.set_tags(
            {
                "shrinkflow.champion": chosen.champion.label,
                "shrinkflow.champion.reason": chosen.champion.reason,
                "shrinkflow.fastest": chosen.quickest.label,
            }
        )
        job.log_artifact(out)  # a folder keeps its name: artifacts/report/index.html
        registered = _register(cfg, models_dir, df, chosen)
    say(f"report: {chosen.champion.label} chosen ({chosen.eligible} of {chosen.total} in budget)")
    say(f"report: {out / 'index.html'}{registered}")


def _row(df: pd.DataFrame, label: str) -> pd.Series:
    return df[df["label"] == label].iloc[0]


def _layer_sparsity(models_dir: Path, df: pd.DataFrame, chosen: Selection) -> dict[str, list]:
    """Per-layer weight counts of the chosen models, from their metrics.json.

    Filter pruning removes weights instead of zeroing them, so each layer is measured against
    the baseline's count for the same layer: a layer that lost half its filters is 50 % sparse.
    """
    layers = {}
    for choice in [chosen.champion, chosen.fastest]:
        if choice is None:
            continue
        found = _layer_counts(Path(models_dir) / Path(choice.label))
        row = _row(df, choice.label)
        baseline = {
            entry["layer"]: entry["weights"]
            for entry in _layer_counts(Path(models_dir) / row.backend / row.model / "baseline")
        }
        if found:
            layers[f"{choice.role}: {choice.label}"] = [
                {**entry, "weights": max(entry["weights"], baseline.get(entry["layer"], 0))}
                for entry in found
            ]
    return layers


def _layer_counts(folder: Path) -> list[dict]:
    path = folder / "metrics.json"
    return read_json(path).get("layer_sparsity") or [] if path.is_file() else []


def _sensitivity_curves(models_dir: Path, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """sensitivity.csv of every backend x model that has one with rows."""
    curves = {}
    for backend, model in df[["backend", "model"]].drop_duplicates().itertuples(index=False):
        path = Path(models_dir) / backend / model / "sensitivity" / SENSITIVITY_CSV
        if path.is_file():
            frame = pd.read_csv(path)
            if not frame.empty:
                curves[f"{backend}/{model}"] = frame
    return curves


def _draw(
    folder: Path,
    df: pd.DataFrame,
    chosen: Selection,
    layers: dict[str, list],
    curves: dict[str, pd.DataFrame],
    budget: float,
) -> list[FigureFile]:
    (folder / FIGURES).mkdir()
    figures = []

    def add(name: str, title: str, caption: str) -> Path:
        figures.append(FigureFile(f"{FIGURES}/{name}", title, caption))
        return folder / FIGURES / name

    unit = selection.SIZE_WORDS[chosen.size_metric]
    plots.size_vs_accuracy(
        df,
        chosen,
        add(
            "size_vs_accuracy.png",
            f"Accuracy against size ({unit})",
            "Every evaluated artefact. The line joins the Pareto front: no other artefact is "
            "both smaller and more accurate. The chosen models are marked.",
        ),
    )
    plots.latency_vs_accuracy(
        df,
        chosen,
        add(
            "latency_vs_accuracy.png",
            "Accuracy against latency at batch 1",
            "Median time per image at batch 1 on the evaluation device; the fastest artefact "
            "within the budget is marked.",
        ),
    )
    if (df["stage"] == "finetuned").any():
        plots.accuracy_vs_sparsity(
            df,
            budget,
            add(
                "accuracy_vs_sparsity.png",
                "Accuracy against target sparsity",
                "Test top-1 of every fine-tuned sweep point, one line per pruning method, "
                "starting at the baseline (sparsity 0); dashed: the baseline minus the budget.",
            ),
        )
    if layers:
        plots.layer_sparsity(
            layers,
            add(
                "layer_sparsity.png",
                "Per-layer sparsity of the chosen models",
                "Share of each conv and linear layer's weights that are zero or removed, "
                "counted from the deployed file.",
            ),
        )
    if curves:
        plots.sensitivity(
            curves,
            budget,
            add(
                "sensitivity.png",
                "Per-layer sensitivity",
                "Validation top-1 drop when one layer (group) alone is pruned to each ratio, "
                "without fine-tuning: the flat lines are the layers that can lose the most.",
            ),
        )
    return figures


def _notes(df: pd.DataFrame, layers: dict, curves: dict) -> list[str]:
    notes = []
    if not (df["stage"] == "finetuned").any():
        notes.append("No pruning sweep in this DAG (prune.methods is empty).")
    if not layers:
        notes.append("The chosen models' metrics.json hold no per-layer counts.")
    if not curves:
        notes.append("No sensitivity sweep in this DAG (sensitivity.ratios is empty).")
    return notes


def _facts(
    cfg: dict, summary: Path, chosen: Selection, invocation: str, run_id: str
) -> list[tuple[str, str]]:
    return [
        ("Data set", f"{cfg['data']['name']} ({cfg['data']['image_size']} px)"),
        ("Backends", ", ".join(cfg["backends"])),
        ("Models", ", ".join(cfg["models"])),
        ("Budget", f"at most {chosen.max_drop * 100:g} pt of top-1 below the baseline"),
        ("Size measure", selection.SIZE_WORDS[chosen.size_metric]),
        ("Artefacts", f"{chosen.total} evaluated, {chosen.eligible} within budget"),
        ("Summary", str(summary)),
        ("MLflow", f"experiment {cfg['tracking']['experiment']}, report run {run_id}"),
        ("Invocation", invocation),
    ]


def _write_nodes(df: pd.DataFrame, path: Path) -> None:
    nodes = df[_NODE_COLUMNS].copy()
    # DVC's plots need a number on every row: the baseline is the sweep's sparsity 0.
    nodes["target_sparsity"] = nodes["target_sparsity"].fillna(0.0)
    for column in ("size", "gzip_bytes", "size_bytes"):  # whole bytes, not 1.0246e+06
        nodes[column] = nodes[column].astype("int64")
    nodes.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, float_format="%.6g")


def _selection_record(df: pd.DataFrame, chosen: Selection) -> dict:
    def describe(choice: Choice) -> dict:
        row = _row(df, choice.label)
        return {
            "label": choice.label,
            "reason": choice.reason,
            "top1": float(row.top1),
            "drop": float(row["drop"]),
            "size": int(row["size"]),
            "latency_ms_b1": float(row.latency_ms_b1),
            "artifact": row.artifact,
        }

    return {
        "max_accuracy_drop": chosen.max_drop,
        "size_metric": chosen.size_metric,
        "eligible": chosen.eligible,
        "nodes": chosen.total,
        "champion": describe(chosen.champion),
        "fastest": describe(chosen.quickest),
    }


def _register(cfg: dict, models_dir: Path, df: pd.DataFrame, chosen: Selection) -> str:
    """Register the chosen model(s) under the aliases `champion` (and `fastest`)."""
    name = cfg["report"]["registered_model"]
    if not name:
        return ""
    versions = {}
    roles = [("champion", chosen.champion), ("fastest", chosen.quickest)]
    for alias, choice in roles:
        model_dir = Path(models_dir) / Path(choice.label) / "model"
        producer = tracking.read_run_ref(model_dir)
        if producer is None:
            raise ShrinkflowError(f"{model_dir}: no run.json, so no MLflow run to register from")
        row = _row(df, choice.label)
        versions[alias] = tracking.register_model(
            cfg,
            name,
            producer,
            "model",
            [alias],
            tags={
                "shrinkflow.label": choice.label,
                "shrinkflow.top1": f"{row.top1:.4f}",
                "shrinkflow.size": str(int(row["size"])),
                "shrinkflow.size_metric": chosen.size_metric,
                "shrinkflow.invocation": invocation_id(),
            },
            description=choice.reason,
        )
    return (
        f"; MLflow model {name!r}: champion v{versions['champion']}, fastest v{versions['fastest']}"
    )
