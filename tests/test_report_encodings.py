"""The report's encoding table and figure (shrinkflow.report.encodings), on synthetic rows."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fixtures import summary_rows

from shrinkflow.report.encodings import SIZES, encoding_figure, encoding_table


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """Two seeds per backend, so that each row must find its own seed's baseline."""
    df = pd.DataFrame(summary_rows(seeds=(0, 1)))
    df["label"] = df["artifact"].str.removeprefix("results/models/").str.removesuffix("/model")
    # The seed-1 baselines ship a file twice the size, which each seed's ratios must reflect.
    df.loc[(df["stage"] == "baseline") & (df["seed"] == 1), "size_bytes"] *= 2
    return df


def test_the_table_has_every_artefact_its_five_sizes_and_ratios_to_its_baseline(frame):
    table = encoding_table(frame)
    assert list(table["label"]) == list(frame["label"])
    ratios = [c + "_ratio" for c in SIZES]
    assert list(table.columns) == ["label", "stage", "quant_method", "sparsity", *SIZES, *ratios]
    for seed in (0, 1):
        rows = (frame["seed"] == seed).to_numpy()
        base = frame[(frame["stage"] == "baseline") & (frame["seed"] == seed)]
        for backend in ("torch", "tensorflow"):
            mine = rows & (frame["backend"] == backend).to_numpy()
            base_size = float(base[base["backend"] == backend]["size_bytes"].iloc[0])
            for column in SIZES:
                expected = frame.loc[mine, column].to_numpy(float) / base_size
                assert np.allclose(table.loc[mine, column + "_ratio"], expected)
    baselines = table[table["stage"] == "baseline"]
    assert (baselines["size_bytes_ratio"] == 1.0).all()
    # Sparse int8 at 70 % zeros: its nominal bytes are well under a tenth of the baseline's file.
    int8 = table[(table["quant_method"] == "static_int8") & (table["sparsity"] > 0.6)]
    assert len(int8) and (int8["nominal_bytes_ratio"] < 0.1).all()
    assert (table["nominal_bytes"] <= table["sparse_bytes"]).all()


def test_a_given_baseline_size_is_used_and_a_missing_size_stays_empty(frame):
    given = frame.assign(
        baseline_size_bytes=1000.0, sparse_bytes=frame["sparse_bytes"].astype(object)
    )
    given.loc[given.index[1], "sparse_bytes"] = ""  # a node evaluated before the column
    table = encoding_table(given)
    assert np.allclose(table["gzip_bytes_ratio"], frame["gzip_bytes"].to_numpy(float) / 1000)
    assert np.isnan(table.loc[1, "sparse_bytes"]) and np.isnan(table.loc[1, "sparse_bytes_ratio"])


def test_the_figure_is_a_palette_png_with_a_line_per_artefact(frame, tmp_path):
    few, many = tmp_path / "few.png", tmp_path / "many.png"
    encoding_figure(frame.head(4), few)
    encoding_figure(frame, many)
    with Image.open(few) as small, Image.open(many) as large:
        assert small.mode == large.mode == "P"
        assert large.height > small.height * 2  # the figure grows with the artefacts
