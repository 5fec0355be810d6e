"""Every reference-study preset validates, plans the DAG it promises, and smoke-runs on digits."""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from projects import BIN, ROOT, copy_checkout, read_summary, tool_env
from sklearn.datasets import load_digits

from shrinkflow import invocation
from shrinkflow.cli import app
from shrinkflow.config import load_params
from shrinkflow.dag import evaluated_nodes
from shrinkflow.quantization import parse_quant_method

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
# The one preset run by Snakemake itself, every job a `shrinkflow` process as in production: the
# cheapest (torch only, one model, no sensitivity, fine-tuning and quantization), and what it
# proves about running jobs is the same for every preset. The others run the very jobs Snakemake
# plans for them in this process (test_preset_jobs_snakemake_plans_run_in_one_process).
END_TO_END = ROOT / "configs/study3_unstructured_sweep_resnet50.yaml"
IN_PROCESS = [preset for preset in PRESETS if preset != END_TO_END]

# Runs the DAG's jobs for targets (none: the default target) with these config files; returns the
# names of the rules whose jobs ran.
Executor = Callable[[Sequence[str], Sequence[str]], set[str]]


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
    tflite = {"static_int8", "dynamic_int8", "float16", "float32"}
    assert set(cfg["quantize"]["methods"]) == tflite | {"qat_int8"}  # tfmot's QAT path too
    assert cfg["train"]["mixed_precision"] and cfg["train"]["augment"]
    # every fine-tuned point and the baseline, in every TFLite format and through QAT
    quantized = [n for n in evaluated_nodes(cfg) if n.stage == "quantized"]
    assert len(quantized) == 2 * (1 + 2 * 2) * 5


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
        # A one-epoch model loses more than any real budget: every ratio passes, so each layer
        # group gets the largest one. One ratio, the preset's second (the largest of the two
        # this ran before), gives structured_sensitivity the same ratios at half the
        # sensitivity job's cost (it prunes every group once per ratio); choosing among ratios
        # is tests/test_torch_sensitivity.py's and tests/test_tf_sensitivity.py's.
        "sensitivity": {"ratios": cfg["sensitivity"]["ratios"][:2][-1:], "max_drop": 1.0},
        # Quantization runs in a second, targeted pass (see check_smoke_run).
        "quantize": {"methods": [], "calibration_batches": 1, "qat": {"epochs": 1}},
        "evaluate": {"batch_sizes": [1, 16], "warmup": 1, "repeats": 2},
    }


def smoke_project(project: Path, preset: Path, **sections: dict) -> Path:
    """A copy of the project with the preset as preset.yaml and its smoke overrides, each of
    ``sections`` updated over its section, as smoke.yaml (later config files win)."""
    copy_checkout(project, ("Snakefile", "workflow", "src", "params.yaml"))
    shutil.copy(preset, project / "preset.yaml")
    overrides = smoke_overrides(preset)
    for section, values in sections.items():
        overrides[section].update(values)
    (project / "smoke.yaml").write_text(yaml.safe_dump(overrides))
    return project


def digits_subset_folder(root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each of scikit-learn's 8x8 digits as an image folder
    (one sub-folder of grayscale PNGs per class), pixels scaled as the digits download does."""
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            Image.fromarray(pixels[index], mode="L").save(root / str(label) / f"{i}.png")
    return root


def small_data(tmp_path: Path) -> dict[str, dict]:
    """The smoke runs' data sections: 240 of the digits as an image folder instead of all 1,797.
    Every job computes on ~8x fewer images, and each epoch of batches of 32 still has 5 steps
    (tfmot's schedule updates the masks at several of them)."""
    root = digits_subset_folder(tmp_path / "digits", per_class=24)
    return {"data": {"name": "imagefolder", "root": str(root)}, "train": {"batch_size": 32}}


def check_smoke_run(project: Path, preset: Path, execute: Executor) -> None:
    """The preset's DAG without quantization, then its first quantization method on each
    model's baseline only: every preset that quantizes starts with static_int8, whose
    torch.export capture (or TFLite full-integer conversion) is what differs between
    architectures (each method on every kind of source is covered in
    tests/test_pipeline_e2e.py). Quantizing every sweep point as well would add 8 more jobs to
    study2."""
    execute((), ("preset.yaml", "smoke.yaml"))
    cfg = load_params([project / "params.yaml", project / "preset.yaml", project / "smoke.yaml"])
    rows = read_summary(project)
    points = len(cfg["prune"]["methods"]) * len(cfg["prune"]["sparsities"])
    assert len(rows) == len(cfg["backends"]) * len(cfg["models"]) * (1 + points)
    assert {r["model"] for r in rows} == set(cfg["models"])
    assert all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)

    methods = load_params([ROOT / "params.yaml", preset])["quantize"]["methods"][:1]
    if not methods:  # study3 measures pruning alone
        return
    (project / "quantize.yaml").write_text(yaml.safe_dump({"quantize": {"methods": methods}}))
    nodes = {
        (b, m): f"results/models/{b}/{m}/seed0/quantized/{methods[0]}/baseline"
        for b in cfg["backends"]
        for m in cfg["models"]
    }
    rules = execute(
        [f"{node}/metrics.json" for node in nodes.values()],
        ("preset.yaml", "smoke.yaml", "quantize.yaml"),
    )
    assert rules == {"quantize", "evaluate_quantized"}  # on the models already trained
    for (backend, model), node in nodes.items():
        record = json.loads((project / node / "metrics.json").read_text())
        assert (record["stage"], record["quant_method"]) == ("quantized", methods[0])
        assert 0.0 <= record["top1"] <= 1.0
        model_file = {"torch": "model.pt", "tensorflow": "model.keras"}[backend]
        baseline = project / f"results/models/{backend}/{model}/seed0/baseline/model/{model_file}"
        assert record["size_bytes"] < record["reference_size_bytes"] == baseline.stat().st_size


@pytest.mark.slow
def test_preset_runs_end_to_end_through_snakemake(tmp_path):
    """A preset as `--configfile` through the whole DAG, each job a `shrinkflow` process that
    Snakemake starts, as a user runs it."""
    project = smoke_project(tmp_path / "project", END_TO_END, **small_data(tmp_path))

    def snakemake(targets: Sequence[str], configfiles: Sequence[str]) -> set[str]:
        """Run Snakemake in the project; return the names of the rules it ran."""
        result = subprocess.run(
            [str(BIN / "snakemake"), *targets, "--cores", "2", "--configfile", *configfiles],
            cwd=project, env=tool_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return set(re.findall(r"^(?:local)?rule (\w+):", result.stderr, re.MULTILINE))

    check_smoke_run(project, END_TO_END, snakemake)


def planned_jobs(project: Path, targets: Sequence[str], configfiles: Sequence[str]) -> list:
    """(rule, `shrinkflow` arguments) of every job Snakemake would run now for ``targets``, in
    the order it would start them (each after the jobs it needs), from its dry run's shell
    commands without their `2> log` redirection. Jobs without a command (rule all) are left out.
    """
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", *targets, "--configfile", *configfiles],
        cwd=project, env=tool_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    jobs, rule = [], None
    for line in result.stdout.splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            rule = match[1]
        elif line.startswith("Shell command: ") and line != "Shell command: None":
            words = shlex.split(line.removeprefix("Shell command: "))
            assert words[0] == "shrinkflow" and words[-2] == "2>", line
            jobs.append((rule, words[1:-2]))
    assert jobs, result.stdout[-4000:]
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("preset", IN_PROCESS, ids=[p.stem for p in IN_PROCESS])
def test_preset_jobs_snakemake_plans_run_in_one_process(preset, tmp_path, monkeypatch, empty_store):
    """Every job Snakemake plans for the preset, with the very `shrinkflow` arguments it would
    start it with, run in dependency order by the CLI in this process: the torch (and
    TensorFlow) import is paid once instead of once a job. The second pass's plan, made after the
    first pass's outputs exist, also shows that Snakemake takes them for its own."""
    project = smoke_project(tmp_path / "project", preset, **small_data(tmp_path))
    shutil.copy(empty_store, project / "mlflow.db")  # the store each job would create
    monkeypatch.chdir(project)
    # What the Snakefile gives every job (envvars): one invocation id and the project's store.
    monkeypatch.setenv(invocation.ENV, invocation.new_invocation_id())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    environment = dict(os.environ)

    def in_process(targets: Sequence[str], configfiles: Sequence[str]) -> set[str]:
        jobs = planned_jobs(project, targets, configfiles)
        for _, args in jobs:
            app(args, standalone_mode=False)
            fresh_process_state(environment)
        return {rule for rule, _ in jobs}

    check_smoke_run(project, preset, in_process)


def fresh_process_state(environment: dict[str, str]) -> None:
    """Undo what a job leaves behind that its own process would have taken with it: changed
    environment variables and Keras' graph state (layer-name counters, cached models)."""
    for name in set(os.environ) - set(environment):
        del os.environ[name]
    os.environ.update(environment)
    if "tf_keras" in sys.modules:
        sys.modules["tf_keras"].backend.clear_session()
    gc.collect()
