"""The report's noise and published references on its curves (plots.py, published.py), on
synthetic seed-aggregated tables shaped like table.annotate's: error bars span each row's
interval, the trade-off plots show validation top-1 and the sparsity plot test top-1, published
points appear only where data set and model match, and the reference file is complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image
from report_fixtures import TEST_IMAGES, summary_rows

from shrinkflow.errors import ShrinkflowError
from shrinkflow.report import plots, published
from shrinkflow.report.selection import Choice, Selection
from shrinkflow.report.table import pareto_mask

BUDGET = 0.01
INTERVAL = "95 % Student-t interval over 3 seeds"


def _frame(models: tuple[str, ...] = ("resnet20",)) -> pd.DataFrame:
    """One row per node, with the aggregated columns table.annotate gives the plots; every row
    gets its own interval widths, unequal below and above, so a bar drawn from the wrong row or
    the wrong column shows."""
    df = pd.DataFrame(summary_rows(backends=("torch",), models=models, qmethods=("static_int8",)))
    df["target_sparsity"] = pd.to_numeric(df["target_sparsity"].replace("", np.nan))
    n = np.arange(len(df))
    df["val_top1"] = df["top1"] - 0.004
    df["val_top1_low"] = df["val_top1"] - 0.010 - 0.001 * n
    df["val_top1_high"] = df["val_top1"] + 0.005 + 0.0005 * n
    df["top1_low"] = df["top1"] - 0.006 - 0.001 * n
    df["top1_high"] = df["top1"] + 0.003 + 0.0005 * n
    df["label"] = [f"node{i}" for i in n]  # unique, as the node folders are
    base = df[df["stage"] == "baseline"].set_index("model")
    df["baseline_top1"] = df["model"].map(base["top1"])
    df["baseline_val_top1"] = df["model"].map(base["val_top1"])
    df["drop"] = df["baseline_val_top1"] - df["val_top1"]
    df["eligible"] = df["drop"] <= BUDGET + 1e-9
    df["size"] = df["gzip_bytes"]
    df["pareto"] = pareto_mask(df["size"].to_numpy(), df["val_top1"].to_numpy())
    df["seeds"] = 3
    df["interval"] = INTERVAL
    return df


def _selection(df: pd.DataFrame) -> Selection:
    smallest = df[df["eligible"]].sort_values("size").iloc[0]
    champion = Choice("smallest", smallest.label, "smallest within budget")
    return Selection(BUDGET, "gzip_bytes", champion, None, [champion], int(df.eligible.sum()), 9)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plot functions would save, kept for inspection instead."""
    figures: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    return figures


def _bars(ax) -> np.ndarray:
    """(x, low, high) of every vertical error bar on ``ax``, sorted."""
    spans = [
        (segment[0][0], segment[0][1], segment[1][1])
        for container in ax.containers
        if isinstance(container, ErrorbarContainer)
        for collection in container.lines[2]
        for segment in collection.get_segments()
    ]
    return np.array(sorted(spans))


def _expected(rows: pd.DataFrame, x: str, y: str) -> np.ndarray:
    spans = zip(rows[x].fillna(0.0), rows[f"{y}_low"], rows[f"{y}_high"], strict=True)
    return np.array(sorted(spans))


@pytest.mark.parametrize("draw", [plots.size_vs_accuracy, plots.latency_vs_accuracy])
def test_tradeoff_bars_span_the_validation_interval(drawn, draw):
    df = _frame()
    draw(df, _selection(df), Path("unused.png"))
    ax = drawn[0].axes[0]
    x = "size" if draw is plots.size_vs_accuracy else "latency_ms_b1"
    np.testing.assert_allclose(_bars(ax), _expected(df, x, "val_top1"))
    assert "validation top-1" in ax.get_ylabel()
    budget = {round(line.get_ydata()[0], 9) for line in ax.lines if line.get_linestyle() == ":"}
    assert round(float(df["baseline_val_top1"].iloc[0]) - BUDGET, 9) in budget
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert f"bars: {INTERVAL}" in legend


def test_size_front_is_the_tables_pareto_rows(drawn):
    df = _frame()
    # Mark one off-front row as on the front: the plot must follow the column, not recompute.
    df.loc[df.index[~df["pareto"]][0], "pareto"] = True
    plots.size_vs_accuracy(df, _selection(df), Path("unused.png"))
    step = next(line for line in drawn[0].axes[0].lines if line.get_drawstyle() == "steps-post")
    front = df[df["pareto"]].sort_values("size", kind="stable")
    np.testing.assert_allclose(step.get_xdata(), front["size"])
    np.testing.assert_allclose(step.get_ydata(), front["val_top1"])


def test_sparsity_bars_span_the_test_interval(drawn):
    df = _frame()
    plots.accuracy_vs_sparsity(df, BUDGET, Path("unused.png"), dataset="digits")
    ax = drawn[0].axes[0]
    bars = _bars(ax)
    # Every node once, the baseline once more as the first point of each method's line.
    lines = df[df["stage"] == "baseline"]
    methods = df.loc[df["stage"] == "finetuned", "prune_method"].nunique()
    expected = _expected(pd.concat([df, *[lines] * methods]), "target_sparsity", "top1")
    np.testing.assert_allclose(bars, expected)
    assert "test top-1" in ax.get_ylabel()


@pytest.mark.parametrize(
    ("seeds", "bars"),
    [
        (3, "bars: 95 % Student-t interval over 3 training seeds"),
        (1, f"bars: 95 % Wilson interval (one seed, {TEST_IMAGES:,} test images)"),
    ],
)
def test_sparsity_legend_names_the_test_interval(drawn, seeds, bars):
    df = _frame().assign(seeds=seeds)
    plots.accuracy_vs_sparsity(df, BUDGET, Path("unused.png"), dataset="digits")
    assert bars in [t.get_text() for t in drawn[0].legends[0].get_texts()]


def _published_lines(figure: Figure) -> dict[str, list]:
    """The published points drawn, by axes title: (source, x, y) of each marker."""
    return {
        ax.get_title(): sorted(
            (line.get_gid().removeprefix("published: "), line.get_xdata()[-1], line.get_ydata()[-1])
            for line in ax.lines
            if (line.get_gid() or "").startswith("published: ")
        )
        for ax in figure.axes
    }


def test_cifar10_draws_matching_published_points(drawn):
    df = _frame(models=("resnet20", "resnet56"))
    plots.accuracy_vs_sparsity(df, BUDGET, Path("unused.png"), dataset="cifar10")
    points = _published_lines(drawn[0])
    resnet20 = points["torch/resnet20"]
    assert ("He et al. 2016", 0.0, 0.9125) in resnet20
    assert ("Distiller (network surgery)", 0.691, 0.9143) in resnet20
    # ResNet-56: He et al.'s dense point; Torch-Pruning's is structured (MACs), not drawn.
    assert [p[0] for p in points["torch/resnet56"]] == ["He et al. 2016"]
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert "published: He et al. 2016" in legend
    assert "published: Distiller (network surgery)" in legend
    assert not any("Torch-Pruning" in text for text in legend)


def test_digits_draws_no_published_points(drawn):
    df = _frame()
    plots.accuracy_vs_sparsity(df, BUDGET, Path("unused.png"), dataset="digits")
    assert _published_lines(drawn[0]) == {"torch/resnet20": []}
    assert not any(t.get_text().startswith("published") for t in drawn[0].legends[0].get_texts())


@pytest.mark.parametrize("column", ["val_top1_low", "pareto", "interval"])
def test_tradeoff_without_aggregated_columns_fails(column):
    df = _frame().drop(columns=column)
    with pytest.raises(ShrinkflowError, match=column):
        plots.size_vs_accuracy(df, _selection(_frame()), Path("unused.png"))


@pytest.mark.parametrize("column", ["top1_high", "test_images"])
def test_sparsity_without_test_interval_fails(column):
    with pytest.raises(ShrinkflowError, match=column):
        plots.accuracy_vs_sparsity(
            _frame().drop(columns=column), BUDGET, Path("unused.png"), dataset="cifar10"
        )


def _label_boxes(figure: Figure, ax) -> list:
    """The drawn extents of the labels on ``ax`` (the text alone, not a leader line)."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    return [Text.get_window_extent(text, renderer) for text in ax.texts]


def _overlapping(boxes: list) -> list[tuple[int, int]]:
    return [(i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes[:i]) if a.overlaps(b)]


def test_sensitivity_names_near_ends_without_overlap(drawn):
    """Three sensitive groups ending 1 pt apart: three readable names inside the panel."""
    rows = [
        {"group": f"g{k}", "members": f"g{k}", "ratio": r, "drop": end * r, "val_top1": 0.5}
        for k, end in enumerate([0.80, 0.79, 0.78, 0.2, 0.1])
        for r in (0.5, 0.9)
    ]
    plots.sensitivity({"torch/resnet20": pd.DataFrame(rows)}, BUDGET, Path("unused.png"))
    ax = drawn[0].axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["g0", "g1", "g2"]
    boxes = _label_boxes(drawn[0], ax)
    assert _overlapping(boxes) == []
    panel = ax.get_window_extent()
    assert all(panel.y0 <= box.y0 and box.y1 <= panel.y1 for box in boxes)


def test_tradeoff_names_close_budget_edges_apart_and_the_choice_in_the_legend(drawn):
    df = _frame(models=("resnet20", "resnet44"))
    df.loc[df["model"] == "resnet44", "baseline_val_top1"] = df["baseline_val_top1"].iloc[0] - 1e-3
    plots.latency_vs_accuracy(df, _selection(df), Path("unused.png"))
    ax = drawn[0].axes[0]
    names = [t for t in ax.texts if "/" in t.get_text()]
    assert sorted(t.get_text() for t in names) == ["torch/resnet20", "torch/resnet44"]
    assert _overlapping(_label_boxes(drawn[0], ax)) == []
    # Among the points only a letter marks the choice; its name is in the legend.
    assert [t.get_text() for t in ax.texts if "/" not in t.get_text()] == ["S"]
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    champion = _selection(df).champion.label
    assert any(t.startswith("S: smallest and fastest") and champion in t for t in legend)


def test_spread_keeps_order_and_gap_and_moves_only_what_collides():
    assert plots._spread([0.0, 100.0], 8.0) == [0.0, 100.0]
    assert plots._spread([10.0, 10.0, 10.0], 8.0) == [2.0, 10.0, 18.0]
    assert plots._spread([5.0, 0.0, 50.0], 8.0) == [6.5, -1.5, 50.0]


def test_figures_with_bars_and_references_save_as_png(tmp_path):
    df = _frame()
    plots.accuracy_vs_sparsity(df, BUDGET, tmp_path / "sparsity.png", dataset="cifar10")
    plots.size_vs_accuracy(df, _selection(df), tmp_path / "size.png")
    for name in ("sparsity.png", "size.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.mode == "P"


def test_published_file_is_complete():
    references = published.load()
    from shrinkflow.backends.base import REGISTRY_MODELS

    models = set().union(*REGISTRY_MODELS.values())
    assert {r.model for r in references} <= models, "a reference names no registry model"
    for ref in references:
        assert "https://" in ref.citation, f"{ref.source}: the citation needs a URL"
        assert len(ref.citation) > 60, f"{ref.source}: the citation needs authors and title"
    kinds = {r.kind for r in published.points("cifar10", "resnet20")}
    assert kinds == {"dense", "unstructured"}
    distiller = next(r for r in references if r.kind == "unstructured")
    assert distiller.drop == pytest.approx(0.0035)
    assert published.points("digits", "resnet20") == []


def test_published_file_errors_name_the_entry(tmp_path):
    path = tmp_path / "published.yaml"
    entry = {"dataset": "cifar10", "model": "resnet20", "kind": "unstructured", "top1": 0.9}
    entry |= {"source": "x", "citation": "y"}
    path.write_text(yaml.safe_dump({"references": [entry]}))
    with pytest.raises(ShrinkflowError, match="references/0: 'sparsity' is a required"):
        published.load(path)
