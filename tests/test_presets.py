"""Every reference-study preset validates, plans the DAG it promises, and smoke-runs on digits."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shrinkflow.config import load_params
from shrinkflow.dag import evaluated_nodes
from shrinkflow.quantization import parse_quant_method

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_is_a_preset_per_reference_study():
    names = [p.name for p in PRESETS]
    assert any(n.startswith("study1_") for n in names)
    assert any(n.startswith("study2_") for n in names)
    assert any(n.startswith("study3_") for n in names)
    assert any(n.startswith("study4_") for n in names)


def test_study1_compares_tfmot_schedules_at_60_and_70_percent_and_converts_to_tflite():
    cfg = load_params([ROOT / "params.yaml", ROOT / "configs/study1_tfmot_resnet20_resnet44.yaml"])
    assert cfg["backends"] == ["tensorflow"] and cfg["models"] == ["resnet20", "resnet44"]
    assert cfg["prune"]["methods"] == ["gradual_polynomial", "gradual_constant"]
    assert cfg["prune"]["sparsities"] == [0.6, 0.7]
    assert set(cfg["quantize"]["methods"]) == {"static_int8", "dynamic_int8", "float16", "float32"}
    assert cfg["train"]["mixed_precision"] and cfg["train"]["augment"]
    # every fine-tuned point and the baseline, in every TFLite format
    quantized = [n for n in evaluated_nodes(cfg) if n.stage == "quantized"]
    assert len(quantized) == 2 * (1 + 2 * 2) * 4


def test_study3_sweeps_every_5_percent_and_keeps_the_output_layer():
    cfg = load_params(
        [ROOT / "params.yaml", ROOT / "configs/study3_unstructured_sweep_resnet50.yaml"]
    )
    assert cfg["prune"]["sparsities"] == [round(0.05 * i, 2) for i in range(20)]
    assert cfg["prune"]["methods"] == ["l1_unstructured"]
    assert "output" in cfg["prune"]["exclude"] and cfg["finetune"]["epochs"] == 0


def test_study2_expresses_the_published_layer_ratios_and_rounds():
    cfg = load_params(
        [ROOT / "params.yaml", ROOT / "configs/study2_structured_resnet18_vgg16.yaml"]
    )
    structured = cfg["prune"]["structured"]
    assert structured["layer_ratios"] == [0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3]
    assert structured["rounds"] > 1
    profile_mean = sum(structured["layer_ratios"]) / len(structured["layer_ratios"])
    assert cfg["prune"]["sparsities"] == [pytest.approx(profile_mean)]


def test_study2_quantizes_every_model_with_int8_qat_and_fixed_point_from_16_to_2_bits():
    cfg = load_params(
        [ROOT / "params.yaml", ROOT / "configs/study2_structured_resnet18_vgg16.yaml"]
    )
    methods = cfg["quantize"]["methods"]
    assert methods[:2] == ["static_int8", "qat_int8"]
    assert [parse_quant_method(m).bits for m in methods[2:]] == [16, 8, 6, 4, 2]
    # the baseline and the three structured points of both models, each in seven formats
    quantized = [n for n in evaluated_nodes(cfg) if n.stage == "quantized"]
    assert len(quantized) == 2 * (1 + 3) * 7
    assert {n.source.stage for n in quantized} == {"baseline", "finetuned"}


def test_study4_compares_pruning_with_static_int8_and_study3_does_not_quantize():
    study4 = load_params([ROOT / "params.yaml", ROOT / "configs/study4_googlenet_cifar100.yaml"])
    assert study4["quantize"]["methods"] == ["static_int8"]
    study3 = load_params(
        [ROOT / "params.yaml", ROOT / "configs/study3_unstructured_sweep_resnet50.yaml"]
    )
    assert study3["quantize"]["methods"] == []
    assert all(n.stage != "quantized" for n in evaluated_nodes(study3))


def smoke_overrides(preset: Path) -> dict:
    """The preset on digits with one epoch everywhere and its first sweep point."""
    cfg = load_params([ROOT / "params.yaml", preset])
    return {
        "data": {"name": "digits", "image_size": 8},
        "train": {"epochs": 1, "warmup_epochs": 0},
        "prune": {
            "sparsities": cfg["prune"]["sparsities"][:1],
            # one epoch of digits is ~20 steps: tfmot's 100-step frequency would never fire
            "gradual": {"epochs": 1, "frequency": 1},
            "structured": {  # iterative, but two short rounds are enough to smoke-test it
                "rounds": min(2, cfg["prune"]["structured"]["rounds"]),
                "round_epochs": min(1, cfg["prune"]["structured"]["round_epochs"]),
            },
        },
        "finetune": {"epochs": min(1, cfg["finetune"]["epochs"])},
        # a one-epoch model loses more than any real budget: let every ratio pass
        "sensitivity": {"ratios": cfg["sensitivity"]["ratios"][:2], "max_drop": 1.0},
        # Quantization runs in a second, targeted pass (see the smoke test).
        "quantize": {"methods": [], "calibration_batches": 1, "qat": {"epochs": 1}},
        "evaluate": {"batch_sizes": [1, 16], "warmup": 1, "repeats": 2},
    }


@pytest.mark.slow
# Study 2 trains, prunes and evaluates two 11-15 M-parameter models at 4 nodes each, then
# quantizes both baselines: 13.5 minutes measured on 2 busy cores (load average 3), so over the
# suite's 15-minute default when busier.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_smoke_runs_on_digits_with_one_epoch(preset, tmp_path):
    """The preset's DAG without quantization, then its first quantization method on each
    model's baseline only: every preset that quantizes starts with static_int8, whose
    torch.export capture (or TFLite full-integer conversion) is what differs between
    architectures (each method on every kind of
    source is covered in tests/test_pipeline_e2e.py). Quantizing every sweep point as well would
    add 8 more jobs to study2, minutes on 2 cores."""
    for name in ["Snakefile", "workflow", "src", "params.yaml"]:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
        else:
            shutil.copy(source, tmp_path / name)
    shutil.copy(preset, tmp_path / "preset.yaml")
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(smoke_overrides(preset)))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def snakemake(*targets: str, configfiles=("preset.yaml", "smoke.yaml")) -> set[str]:
        """Run Snakemake in the project; return the names of the rules it ran."""
        result = subprocess.run(
            [str(BIN / "snakemake"), *targets, "--cores", "2", "--configfile", *configfiles],
            cwd=tmp_path, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return set(re.findall(r"^(?:local)?rule (\w+):", result.stderr, re.MULTILINE))

    snakemake()
    cfg = load_params([tmp_path / "params.yaml", tmp_path / "preset.yaml", tmp_path / "smoke.yaml"])
    with (tmp_path / "results/summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    points = len(cfg["prune"]["methods"]) * len(cfg["prune"]["sparsities"])
    assert len(rows) == len(cfg["backends"]) * len(cfg["models"]) * (1 + points)
    assert {r["model"] for r in rows} == set(cfg["models"])
    assert all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)

    methods = load_params([ROOT / "params.yaml", preset])["quantize"]["methods"][:1]
    if not methods:  # study3 measures pruning alone
        return
    (tmp_path / "quantize.yaml").write_text(yaml.safe_dump({"quantize": {"methods": methods}}))
    nodes = {
        (b, m): f"results/models/{b}/{m}/quantized/{methods[0]}/baseline"
        for b in cfg["backends"]
        for m in cfg["models"]
    }
    rules = snakemake(
        *[f"{node}/metrics.json" for node in nodes.values()],
        configfiles=("preset.yaml", "smoke.yaml", "quantize.yaml"),
    )
    assert rules == {"quantize", "evaluate_quantized"}  # on the models already trained
    for (backend, model), node in nodes.items():
        record = json.loads((tmp_path / node / "metrics.json").read_text())
        assert (record["stage"], record["quant_method"]) == ("quantized", methods[0])
        assert 0.0 <= record["top1"] <= 1.0
        model_file = {"torch": "model.pt", "tensorflow": "model.keras"}[backend]
        baseline = tmp_path / f"results/models/{backend}/{model}/baseline/model/{model_file}"
        assert record["size_bytes"] < record["reference_size_bytes"] == baseline.stat().st_size
