"""`shrinkflow report`: the DAG's last node. Reads results/summary.csv (and, for the chosen
models and the sensitivity sweeps, the per-node files under results/models), chooses a model
under ``report.max_accuracy_drop``, writes results/report/ and records the choice in MLflow.

Every input is checked before anything is written or logged: a bad summary or budget leaves no
report folder and no MLflow run behind.
"""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from shrinkflow import dag, per_backend, tracking
from shrinkflow.errors import ShrinkflowError
from shrinkflow.invocation import invocation_id
from shrinkflow.outputs import atomic_dir, read_json, write_json
from shrinkflow.progress import say
from shrinkflow.report import dvc_metrics, encodings, plots, render, selection, table
from shrinkflow.report.render import FigureFile, ReportContext
from shrinkflow.report.selection import Choice, Selection
from shrinkflow.sensitivity_report import CSV_FILE as SENSITIVITY_CSV

FIGURES = "figures"  # PNGs live here; index.html embeds them, report.md links them
NODES_CSV = "nodes.csv"  # the annotated table: `dvc plots` draws from it
SELECTION_JSON = "selection.json"  # the choice, machine-readable
# The node table (one row per node, its seeds aggregated): what identifies it, what decided
# (validation, with its interval), what is reported (test), and the sizes and speeds.
_NODE_COLUMNS = [
    "label",
    *("backend", "model", "stage", "prune_method", "target_sparsity", "measured_sparsity"),
    *("quant_method", "seeds", "seed_list", "shipped"),
    *("val_top1", "val_top1_low", "val_top1_high", "pruned_val_top1"),
    *("drop", "drop_low", "drop_high"),
    *("within_noise", "top1", "top1_low", "top1_high", "test_drop"),
    *("size", "gzip_bytes", "size_bytes", "nominal_bytes", "sparse_bytes", "sparse_gzip_bytes"),
    *("latency_ms_b1", "runtime", "speedup", "cross_runtime", "eligible", "pareto", "interval"),
]
_BYTES = ("size", "gzip_bytes", "size_bytes", "nominal_bytes", "sparse_bytes", "sparse_gzip_bytes")


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
            figures = _draw(staging, df, chosen, layers, curves, budget, cfg["data"]["name"])
            notes = _notes(df, layers, curves)
            facts = _facts(cfg, summary, chosen, invocation, job.run_id)
            context = ReportContext(
                title=f"shrinkflow report: {cfg['data']['name']}",
                df=df,
                selection=chosen,
                figures=figures,
                facts=facts,
                notes=notes,
                mlflow_ui=_mlflow_ui(cfg),
            )
            render.write_html(context, staging)
            render.write_markdown(context, staging)
            _write_nodes(df, staging / NODES_CSV)
            record = _selection_record(df, chosen)
            write_json(staging / SELECTION_JSON, record)
            dvc_metrics.write(staging, record)  # its numbers alone: the DVC metric
        champion = _row(df, chosen.champion.label)
        job.log_metrics(
            {
                "champion_val_top1": champion.val_top1,
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


def _mlflow_ui(cfg: dict) -> str:
    """Where the page's run links point: the tracking server when runs are logged to one over
    HTTP (it serves the UI), else ``report.mlflow_ui`` (what `make mlflow-ui` serves)."""
    uri = tracking.tracking_uri(cfg)
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/")
    return cfg["report"]["mlflow_ui"]


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
        row = _row(df, choice.label)
        found = _layer_counts(Path(models_dir) / Path(row.shipped))
        seed_base = dag.baseline(row.backend, row.model, int(row.shipped_seed)).label
        baseline = {
            entry["layer"]: entry["weights"]
            for entry in _layer_counts(Path(models_dir) / Path(seed_base))
        }
        if found:
            layers[f"{choice.role}: {row.shipped}"] = [
                {**entry, "weights": max(entry["weights"], baseline.get(entry["layer"], 0))}
                for entry in found
            ]
    return layers


def _layer_counts(folder: Path) -> list[dict]:
    path = folder / "metrics.json"
    return read_json(path).get("layer_sparsity") or [] if path.is_file() else []


def _sensitivity_curves(models_dir: Path, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """sensitivity.csv of every backend x model that has one with rows (the first seed's:
    the sweep measures the baseline, which the other seeds repeat)."""
    curves = {}
    firsts = df[df["stage"] == "baseline"].drop_duplicates(["backend", "model"])
    for row in firsts.itertuples(index=False):
        seed = int(row.seed_list.split()[0])
        folder = dag.sensitivity_dir(row.backend, row.model, seed).relative_to(dag.MODELS)
        path = Path(models_dir) / folder / SENSITIVITY_CSV
        if path.is_file():
            frame = pd.read_csv(path)
            if not frame.empty:
                curves[f"{row.backend}/{row.model}"] = frame
    return curves


def _draw(
    folder: Path,
    df: pd.DataFrame,
    chosen: Selection,
    layers: dict[str, list],
    curves: dict[str, pd.DataFrame],
    budget: float,
    dataset: str,
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
            "Every evaluated artefact's mean validation top-1 (the split that decides), with its "
            "interval as error bars. The line joins the Pareto front: no other artefact is both "
            "smaller and more accurate on validation. The chosen models are marked.",
        ),
    )
    plots.latency_vs_accuracy(
        df,
        chosen,
        add(
            "latency_vs_accuracy.png",
            "Accuracy against latency at batch 1",
            "Median time per image at batch 1 on the evaluation device against mean validation "
            "top-1 (error bars: its interval); the fastest artefact within the budget is marked.",
        ),
    )
    if (df["stage"] == "finetuned").any():
        plots.accuracy_vs_sparsity(
            df,
            budget,
            add(
                "accuracy_vs_sparsity.png",
                "Accuracy against target sparsity",
                "Test top-1 (mean over seeds, error bars: its interval) of every fine-tuned sweep "
                "point, one line per pruning method, starting at the baseline (sparsity 0); "
                "dashed: the baseline minus the budget; published results are drawn where the "
                "data set and model match.",
            ),
            dataset=dataset,
        )
    encodings.encoding_figure(
        df,
        add(
            "encodings.png",
            "What sparsity buys on disk",
            "Five sizes of every artefact (log scale): its non-zero weights at their stored width "
            "(nominal), the file as deployed, that file gzipped, and its weights in shrinkflow's "
            "sparse encoding (a bitmask plus the non-zero values at their width), plain and "
            "gzipped. A dense file does not shrink when weights are zeroed; the encoding does.",
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


def _per_backend_text(cfg: dict, key: str) -> str:
    """A list as it is (``resnet20, small_cnn``), or per backend (``torch: a; tensorflow: b``)."""
    if not per_backend.is_per_backend(cfg, key):
        return ", ".join(per_backend.entries(cfg, key, cfg["backends"][0]))
    return "; ".join(f"{b}: {', '.join(per_backend.entries(cfg, key, b))}" for b in cfg["backends"])


def _facts(
    cfg: dict, summary: Path, chosen: Selection, invocation: str, run_id: str
) -> list[tuple[str, str]]:
    artefacts, jobs = tracking.experiment_names(cfg)
    return [
        ("Data set", f"{cfg['data']['name']} ({cfg['data']['image_size']} px)"),
        ("Backends", ", ".join(cfg["backends"])),
        ("Models", _per_backend_text(cfg, "models")),
        (
            "Budget",
            f"at most {chosen.max_drop * 100:g} pt of mean validation top-1 below the baseline "
            "(test top-1 is reported, never used to decide)",
        ),
        ("Training seeds", ", ".join(str(s) for s in cfg["seeds"])),
        ("Size measure", selection.SIZE_WORDS[chosen.size_metric]),
        ("Artefacts", f"{chosen.total} evaluated, {chosen.eligible} within budget"),
        ("Summary", str(summary)),
        ("MLflow", f"artefacts in experiment {artefacts}, report run {run_id} in {jobs}"),
        ("Invocation", invocation),
    ]


def _write_nodes(df: pd.DataFrame, path: Path) -> None:
    nodes = df[_NODE_COLUMNS].copy()
    # DVC's plots need a number on every row: the baseline is the sweep's sparsity 0.
    nodes["target_sparsity"] = nodes["target_sparsity"].fillna(0.0)
    for column in _BYTES:  # whole bytes, not 1.0246e+06
        nodes[column] = nodes[column].round().astype("int64")
    nodes.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, float_format="%.6g")


def _selection_record(df: pd.DataFrame, chosen: Selection) -> dict:
    def describe(choice: Choice) -> dict:
        row = _row(df, choice.label)
        return {
            "label": choice.label,
            "reason": choice.reason,
            "val_top1": float(row.val_top1),
            "val_top1_interval": [float(row.val_top1_low), float(row.val_top1_high)],
            "drop": float(row["drop"]),
            "drop_interval": [float(row.drop_low), float(row.drop_high)],
            "within_noise": bool(row.within_noise),
            "top1": float(row.top1),
            "top1_interval": [float(row.top1_low), float(row.top1_high)],
            "size": int(row["size"]),
            "latency_ms_b1": float(row.latency_ms_b1),
            "speedup": float(row.speedup),
            "runtime": row.runtime,
            "seeds": int(row.seeds),
            "shipped": row.shipped,
            "artifact": row.artifact,
        }

    return {
        "decided_on": selection.DECIDING_SPLIT,
        "reported": "test",
        "interval": str(df["interval"].iloc[0]),
        "max_accuracy_drop": chosen.max_drop,
        "size_metric": chosen.size_metric,
        "eligible": chosen.eligible,
        "nodes": chosen.total,
        "champion": describe(chosen.champion),
        "fastest": describe(chosen.quickest),
    }


def _register(cfg: dict, models_dir: Path, df: pd.DataFrame, chosen: Selection) -> str:
    """Register the chosen model(s) under the aliases `champion` (and `fastest`), each in its
    backend's registered model (``tracking.register_model``)."""
    name = cfg["report"]["registered_model"]
    if not name:
        return ""
    registered = []
    roles = [("champion", chosen.champion), ("fastest", chosen.quickest)]
    for alias, choice in roles:
        row = _row(df, choice.label)
        model_dir = Path(models_dir) / Path(row.shipped) / dag.MODEL_DIR
        producer = tracking.read_run_ref(model_dir)
        if producer is None:
            raise ShrinkflowError(f"{model_dir}: no run.json, so no MLflow run to register from")
        model, version = tracking.register_model(
            cfg,
            name,
            producer,
            [alias],
            tags={
                "shrinkflow.label": choice.label,
                "shrinkflow.shipped": row.shipped,
                "shrinkflow.val_top1": f"{row.val_top1:.4f}",
                "shrinkflow.top1": f"{row.top1:.4f}",
                "shrinkflow.size": str(int(row["size"])),
                "shrinkflow.size_metric": chosen.size_metric,
                "shrinkflow.invocation": invocation_id(),
            },
            description=choice.reason,
        )
        registered.append(f"models:/{model}@{alias} (v{version})")
    return f"; MLflow {', '.join(registered)}"
