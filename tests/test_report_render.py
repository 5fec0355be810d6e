"""The report's figures (plots.py) and pages (render.py) on synthetic summaries: valid small PNGs
for full and degenerate inputs, a self-contained and escaped index.html, a report.md with
relative links, and byte-identical output for identical input."""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from browser import CHROMIUM, LAUNCH_ARGS, render_page, requires_chromium
from PIL import Image
from report_fixtures import summary_rows, write_summary

from shrinkflow.errors import ShrinkflowError
from shrinkflow.report import plots, render, selection, table
from shrinkflow.report.render import FigureFile, ReportContext
from shrinkflow.report.selection import Choice, points

BUDGET, MEASURE = 0.01, "gzip_bytes"
MLFLOW_UI = "http://127.0.0.1:5000"
MAX_PNG_BYTES = 150_000


def _annotated(folder: Path, rows: list[dict]) -> tuple[pd.DataFrame, selection.Selection]:
    df = table.annotate(
        table.load_summary(write_summary(folder / "summary.csv", rows)), BUDGET, MEASURE
    )
    return df, selection.select(df, BUDGET, MEASURE)


def _layers() -> dict[str, list[dict]]:
    counts = [("conv1", 432, 432), ("layer1.0.conv1", 2304, 900), ("fc", 640, 0)]
    rows = [{"layer": n, "weights": w, "nonzero": z} for n, w, z in counts]
    return {"smallest: torch/resnet20/finetuned/l1_unstructured/0.5": rows}


def _curves() -> dict[str, pd.DataFrame]:
    rows = [
        {"group": g, "members": m, "ratio": r, "val_top1": 0.97 - d, "drop": d, "params_removed": 9}
        for g, m, slope in [("conv1", "conv1", 0.1), ("layer1.0.conv1", "layer1.0.conv1 bn", 0.3)]
        for r in (0.25, 0.5, 0.75)
        for d in [slope * r * r]
    ]
    return {"torch/resnet20": pd.DataFrame(rows), "tensorflow/resnet20": pd.DataFrame(rows)}


def _draw(folder: Path, df: pd.DataFrame, chosen: selection.Selection) -> list[FigureFile]:
    """All five figures under folder/figures, as the report stage lays them out."""
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    calls = {
        "size_vs_accuracy": lambda p: plots.size_vs_accuracy(df, chosen, p),
        "latency_vs_accuracy": lambda p: plots.latency_vs_accuracy(df, chosen, p),
        "accuracy_vs_sparsity": lambda p: plots.accuracy_vs_sparsity(
            df, BUDGET, p, dataset="digits"
        ),
        "layer_sparsity": lambda p: plots.layer_sparsity(_layers(), p),
        "sensitivity": lambda p: plots.sensitivity(_curves(), BUDGET, p),
    }
    figures = []
    for name, draw in calls.items():
        draw(folder / "figures" / f"{name}.png")
        figures.append(FigureFile(f"figures/{name}.png", name.replace("_", " "), f"About {name}."))
    return figures


def _context(df, chosen, figures, **changes) -> ReportContext:
    ctx = ReportContext(
        title="shrinkflow report: digits",
        df=df,
        selection=chosen,
        figures=figures,
        facts=[("Data set", "digits (32 px)"), ("Summary", "results/summary.csv")],
        notes=["No sensitivity sweep in this DAG."],
        mlflow_ui=MLFLOW_UI,
    )
    return dataclasses.replace(ctx, **changes)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, ReportContext]:
    """The fixture summary's figures, index.html and report.md, written once for the module."""
    folder = tmp_path_factory.mktemp("report")
    df, chosen = _annotated(folder, summary_rows())
    ctx = _context(df, chosen, _draw(folder, df, chosen))
    render.write_html(ctx, folder)
    render.write_markdown(ctx, folder)
    return folder, ctx


class _Page(HTMLParser):
    """The parts of index.html the tests look at: attributes, text, the body rows of each table
    by its id (``node_rows``: the decision table's)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.attributes: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.text: list[str] = []
        self.rows: dict[str, list[dict]] = {}  # table id -> [{"class": ..., "cells": [...]}]
        self._table: list[dict] | None = None
        self._in_body = False
        self._cell: list[str] | None = None
        self.feed(html)

    @property
    def node_rows(self) -> list[dict]:
        return self.rows["node-table"]

    def handle_starttag(self, tag, attrs):
        self.attributes += [(tag, k, v or "") for k, v in attrs]
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.rows.setdefault(attrs.get("id") or "", [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._table.append({"class": attrs.get("class", ""), "cells": []})
        elif tag in ("td", "th") and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1]["cells"].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def test_every_figure_is_a_valid_small_png(report):
    folder, ctx = report
    for figure in ctx.figures:
        path = folder / figure.name
        assert path.stat().st_size < MAX_PNG_BYTES, figure.name
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 500 and image.height > 250, figure.name
            # Not blank: a drawn plot has axes, text and lines in many shades.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 20, figure.name


def test_panels_follow_backends_and_models(tmp_path):
    def size(**grid) -> tuple[int, int]:
        df, _ = _annotated(tmp_path / str(len(grid["models"])), summary_rows(**grid))
        path = tmp_path / f"{len(grid['models'])}.png"
        plots.accuracy_vs_sparsity(df, BUDGET, path, dataset="digits")
        with Image.open(path) as image:
            return image.size

    one = size(backends=("torch",), models=("resnet20",))
    two = size(backends=("torch",), models=("resnet20", "resnet32"))
    assert two[1] > 1.6 * one[1]  # one row of panels per model


def test_degenerate_inputs_still_draw(tmp_path):
    alone, alone_choice = _annotated(
        tmp_path / "alone", summary_rows(backends=("torch",), methods=(), qmethods=())
    )
    one_point, one_choice = _annotated(
        tmp_path / "one",
        summary_rows(backends=("torch",), methods=("l1_unstructured",), sparsities=(0.5,)),
    )
    no_latency = one_point.assign(latency_ms_b1=math.nan)
    drawn = {
        "baseline_only_sparsity": lambda p: plots.accuracy_vs_sparsity(
            alone, BUDGET, p, dataset="digits"
        ),
        "baseline_only_size": lambda p: plots.size_vs_accuracy(alone, alone_choice, p),
        "baseline_only_latency": lambda p: plots.latency_vs_accuracy(alone, alone_choice, p),
        "one_point_sparsity": lambda p: plots.accuracy_vs_sparsity(
            one_point, BUDGET, p, dataset="digits"
        ),
        "no_latency": lambda p: plots.latency_vs_accuracy(no_latency, one_choice, p),
        "no_layers": lambda p: plots.layer_sparsity({"smallest: x": []}, p),
        "zero_weights": lambda p: plots.layer_sparsity(
            {"t": [{"layer": "a", "weights": 0, "nonzero": 0}]}, p
        ),
        "one_ratio": lambda p: plots.sensitivity(
            {"torch/resnet20": _curves()["torch/resnet20"][:1]}, BUDGET, p
        ),
        "no_curves": lambda p: plots.sensitivity({}, BUDGET, p),
    }
    for name, draw in drawn.items():
        path = tmp_path / f"{name}.png"
        draw(path)
        with Image.open(path) as image:
            assert image.format == "PNG", name


def test_html_is_self_contained(report):
    folder, ctx = report
    html = (folder / "index.html").read_text(encoding="utf-8")
    page = _Page(html)
    sources = [v for tag, name, v in page.attributes if name == "src"]
    assert len(sources) == len(ctx.figures)
    for source, figure in zip(sources, ctx.figures, strict=True):
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]) == (folder / figure.name).read_bytes()
    # The only network addresses are links (never loaded) to the MLflow UI's run pages.
    runs = {v for tag, name, v in page.attributes if tag == "a" and name == "href" and "/#/" in v}
    assert runs == {_run_link(row) for row in ctx.df.to_dict("records")}
    links = [v for tag, name, v in page.attributes if name in ("href", "src", "action")]
    assert all(v.startswith(("#", "data:")) or v in runs for v in links), links
    for link in runs:
        html = html.replace(link, "")
    assert "http://" not in html and "https://" not in html
    assert str(folder) not in html  # no path of this machine


def _run_link(row: dict) -> str:
    """The MLflow UI page of a row's evaluate run, as MLflow 3's UI routes it."""
    return (
        f"{MLFLOW_UI}/#/experiments/{row['experiment_id']}/runs/{row['run_id']}"
        "?workflowType=machine_learning"
    )


def test_run_links_fall_back_to_the_ui_route_without_an_experiment():
    view = "?workflowType=machine_learning"  # the UI's model-training view, not its GenAI one
    assert render.run_url("http://h:5000/", "", "abc") == f"http://h:5000/#/runs/abc{view}"
    assert (
        render.run_url("http://h:5000", "7", "abc")
        == f"http://h:5000/#/experiments/7/runs/abc{view}"
    )
    assert render.run_url("http://h:5000", "7", "") == ""


def test_html_shows_the_choice_and_every_node(report):
    folder, ctx = report
    page = _Page((folder / "index.html").read_text(encoding="utf-8"))
    text = "".join(page.text)
    chosen = ctx.selection
    assert chosen.champion.label in text and chosen.champion.reason in text
    assert chosen.fastest is not None and chosen.fastest.reason in text
    assert all(c.label in text for c in chosen.per_model)
    for figure in ctx.figures:
        assert figure.title in text and figure.caption in text
    assert ctx.notes[0] in text
    # the sizes table: every artefact, its sparse encoding against its baseline's file
    assert "What sparsity buys on disk" in text
    html = (folder / "index.html").read_text(encoding="utf-8")
    encoding_table = html.split('id="encoding-table"')[1].split("</table>")[0]
    assert encoding_table.count("<tr>") == len(ctx.df) + 1
    first = ctx.df.iloc[0]
    assert f"{round(first.sparse_bytes):,} (" in encoding_table

    df = ctx.df
    assert len(page.node_rows) == len(df)
    assert [r["cells"][1] for r in page.node_rows] == list(df["label"])
    within = [r["class"].split()[0] == "in" for r in page.node_rows]
    assert within == list(df["eligible"])
    champion = df.index[df["label"] == chosen.champion.label][0]
    cells = page.node_rows[champion]["cells"]
    row = df.loc[champion]
    assert "★" in cells[2] and "chosen" in page.node_rows[champion]["class"]
    # validation decides (mean and interval; right after pruning; drop and its interval), test
    # is reported beside it, then the sizes, the latency and the speed-up
    assert cells[3:8] == [
        f"{row.val_top1:.4f}[{row.val_top1_low:.4f}, {row.val_top1_high:.4f}]",
        f"{row.pruned_val_top1:.4f}[{row.pruned_val_top1_low:.4f}, {row.pruned_val_top1_high:.4f}]",
        f"{-row['drop'] * 100:+.2f}[{-row.drop_high * 100:+.2f}, {-row.drop_low * 100:+.2f}]",
        f"{row.top1:.4f}",
        f"{int(row.gzip_bytes):,}",
    ]
    assert cells[8:11] == [
        f"{int(row.size_bytes):,}",
        f"{row.latency_ms_b1:.2f}",
        f"{row.speedup:.2f}x",
    ]
    assert cells[11] == row.run_id[:8]
    baseline = page.node_rows[int(df.index[df["stage"] == "baseline"][0])]["cells"]
    assert baseline[4] == "–" and baseline[5].startswith("+0.00")  # nothing was pruned
    # the other columns, folded below: one row per artefact, every detail column
    detail = page.rows["detail-table"]
    assert [r["cells"][0] for r in detail] == list(df["label"])
    assert detail[int(df.index[df["stage"] == "baseline"][0])]["cells"][6] == "–"  # sparsity


def test_each_float_model_sits_beside_its_quantized_copies(report):
    folder, ctx = report
    df = ctx.df
    groups: list[list[list[str]]] = []
    for row in _Page((folder / "index.html").read_text(encoding="utf-8")).rows["pairs-table"]:
        if "group" in row["class"]:
            groups.append([row["cells"]])
        else:
            groups[-1].append(row["cells"])
    floats = df[df["stage"].isin(["baseline", "finetuned"])]
    assert [g[0][0] for g in groups] == list(floats["label"])
    quant = sorted(df.loc[df["stage"] == "quantized", "quant_method"].unique())
    for (header, source, *copies), (_, float_row) in zip(groups, floats.iterrows(), strict=True):
        assert source[:2] == ["float", float_row.runtime] and source[3] == "–"
        assert sorted(c[0] for c in copies) == quant
        for cells in copies:
            row = df[(df["source"] == header[0]) & (df["quant_method"] == cells[0])].iloc[0]
            # the copy's cost against its own float model, paired by seed, with its interval
            drop = float_row.val_top1 - row.val_top1
            assert row.quant_drop == pytest.approx(drop)
            assert cells[3].startswith(f"{points(drop)}[")
            assert cells[6] == f"{float_row.gzip_bytes / row.gzip_bytes:.3g}x"
            # like with like: the float model timed in the copy's runtime
            assert cells[8:10] == [f"{row.float_latency_ms_b1:.2f}", f"{row.speedup_b1:.2f}x"]


def test_hostile_text_is_escaped(tmp_path, report):
    _, ctx = report
    hostile = "<script>alert(1)</script>|x"
    old = ctx.selection.champion.label

    def swap(choice: Choice | None) -> Choice | None:
        if choice is None or choice.label != old:
            return choice
        return Choice(choice.role, hostile, '<img src=x onerror="alert(2)"> *why*')

    chosen = dataclasses.replace(
        ctx.selection,
        champion=swap(ctx.selection.champion),
        fastest=swap(ctx.selection.fastest),
        per_model=[swap(c) for c in ctx.selection.per_model],
    )
    df = ctx.df.assign(label=ctx.df["label"].replace(old, hostile))
    hostile_ctx = _context(df, chosen, [], facts=[("Summary", "<b>s</b>")], notes=["a <i>b"])
    html = render.write_html(hostile_ctx, tmp_path).read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>s" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # the page's own sorting script
    text = "".join(_Page(html).text)
    assert hostile in text and '<img src=x onerror="alert(2)"> *why*' in text
    markdown = render.write_markdown(hostile_ctx, tmp_path).read_text(encoding="utf-8")
    assert re.search(r"(?<!\\)<", markdown) is None  # every < escaped
    assert r"\<script\>alert(1)\</script\>\|x" in markdown


def test_markdown_has_the_table_and_relative_images(report):
    folder, ctx = report
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    lines = markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| # | artefact |"))
    body = lines[header + 2 : header + 2 + len(ctx.df)]
    assert [line.split(" | ")[1] for line in body] == list(ctx.df["label"])
    assert all(line.count(" | ") == lines[header].count(" | ") for line in body)
    for figure in ctx.figures:
        assert f"![{figure.title}]({figure.name})" in markdown
    assert "data:" not in markdown and str(folder) not in markdown
    assert ctx.selection.champion.label in markdown and ctx.notes[0] in markdown


def test_same_input_gives_byte_identical_files(tmp_path, report):
    folder, ctx = report
    figures = _draw(tmp_path, ctx.df, ctx.selection)
    again = dataclasses.replace(ctx, figures=figures)
    render.write_html(again, tmp_path)
    render.write_markdown(again, tmp_path)
    names = [f.name for f in ctx.figures] + ["index.html", "report.md"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def test_bad_figure_names_are_refused(tmp_path, report):
    _, ctx = report
    for name in ("../outside.png", "/abs/figure.png", "figures/missing.png"):
        bad = dataclasses.replace(ctx, figures=[FigureFile(name, "t", "c")])
        with pytest.raises(ShrinkflowError, match="figure"):
            render.write_html(bad, tmp_path)
        with pytest.raises(ShrinkflowError, match="figure"):
            render.write_markdown(bad, tmp_path)
    assert not (tmp_path / "index.html").exists()


# At a 1,400 px window: how far each table (the folded one opened) reaches past the room it has,
# and the right edge of the decision table's last column against the window's.
_OVERFLOW_JS = """
() => {
  document.getElementById("details").open = true;
  const tables = Array.from(document.querySelectorAll("table[id]"));
  const last = document.querySelector("#node-table thead th:last-child");
  return {
    page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    tables: Object.fromEntries(
      tables.map((t) => [t.id, t.scrollWidth - t.parentElement.clientWidth])),
    lastColumnRight: last.getBoundingClientRect().right - window.innerWidth,
  };
}
"""


@requires_chromium
def test_page_renders_and_sorts_in_a_browser(tmp_path, report):
    folder, ctx = report
    check = render_page(folder / "index.html", tmp_path / "page.png", width=1400)
    assert check.problems() == [] and check.title == ctx.title
    assert check.ink_fraction > 0.05, "the page rendered (nearly) blank"
    assert check.height_px > 3000, "figures and the node table make a long page"

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto((folder / "index.html").as_uri())
            overflow = page.evaluate(_OVERFLOW_JS)
            links = page.eval_on_selector_all(
                "#node-table tbody a.run", "(links) => links.map((a) => a.href)"
            )
            page.click("#node-table th:nth-child(4)")  # val top-1, ascending
            first = page.inner_text("#node-table tbody tr:first-child td:nth-child(4)")
            page.click("#node-table th:nth-child(4)")
            top = page.inner_text("#node-table tbody tr:first-child td:nth-child(4)")
        finally:
            browser.close()
    # Nothing scrolls sideways at 1,400 px: size, latency and speed-up stay in view.
    assert overflow["page"] <= 0 and overflow["lastColumnRight"] <= 0, overflow
    assert set(overflow["tables"]) >= {"node-table", "detail-table", "pairs-table"}
    assert all(excess <= 0 for excess in overflow["tables"].values()), overflow
    assert links == [_run_link(row) for row in ctx.df.to_dict("records")]
    low, high = ctx.df["val_top1"].min(), ctx.df["val_top1"].max()
    assert first.split()[0] == f"{low:.4f}" and top.split()[0] == f"{high:.4f}"
