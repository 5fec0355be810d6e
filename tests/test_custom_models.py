"""A model outside the registry (``custom_models``), on both backends: the factories are defined
in this file, written into a throw-away project as ``my_models.py`` and named
``my_models:<function>``, as a user's project-local models file would be.

The chains run the real CLI, one job per command as Snakemake and DVC run them; the checks of
what a factory returned run in-process, where they are quick.
"""

from __future__ import annotations

import inspect
import json
import subprocess
from pathlib import Path

import pytest
import torch  # before TensorFlow, in a process that loads both
import yaml
from projects import BIN, ROOT, make_project, mlflow_runs, tool_env
from stage_projects import prepare_digits
from torch import nn

from shrinkflow import custom_models
from shrinkflow.config import load_params
from shrinkflow.errors import ShrinkflowError

# ---- the user's models file (each function's source is written into the project) ----


def tiny_cnn(num_classes, in_channels, image_size, backend):
    """One factory for both backends: two conv-BN-ReLU blocks, global pooling, the logits."""
    if backend == "torch":
        from torch import nn

        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, num_classes),
        )
    import tf_keras as keras
    from tf_keras import layers

    x = inputs = keras.Input((image_size, image_size, in_channels))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    x = layers.GlobalAveragePooling2D()(layers.Add()([x, y]))
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def wrong_classes(num_classes, in_channels, image_size):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes + 2))


def no_keywords(classes, channels, size):
    raise AssertionError("never called: its signature is refused")


def not_a_model(num_classes, in_channels, image_size):
    return "a model"


def fixed_view(num_classes, in_channels, image_size):
    """A reshape to a fixed size: Torch-Pruning removes filters the reshape still counts."""
    from torch import nn

    class FixedView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
            self.fc = nn.Linear(4 * image_size**2, num_classes)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(-1, 4 * image_size**2))

    return FixedView()


def branchy(num_classes, in_channels, image_size):
    """Python control flow on a tensor's value: torch.export cannot capture it."""
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            x = self.conv(x)
            x = x if x.sum() > 0 else -x
            return self.fc(x.mean((2, 3)))

    return Branchy()


def keras_lambda(num_classes, in_channels, image_size):
    import tf_keras as keras
    from tf_keras import layers

    x = inputs = keras.Input((image_size, image_size, in_channels))
    x = layers.GlobalAveragePooling2D()(layers.Lambda(lambda t: t * 2.0)(x))
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def keras_softmax(num_classes, in_channels, image_size):
    import tf_keras as keras
    from tf_keras import layers

    x = inputs = keras.Input((image_size, image_size, in_channels))
    x = layers.Dense(num_classes)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Softmax()(x))


FACTORIES = (
    tiny_cnn,
    wrong_classes,
    no_keywords,
    not_a_model,
    fixed_view,
    branchy,
    keras_lambda,
    keras_softmax,
)
NOT_CALLABLE = "not_callable = 3\n"
TINY = {
    "data": {"image_size": 8},
    "train": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
    "quantize": {"calibration_batches": 1},
    "evaluate": {"batch_sizes": [1], "warmup": 1, "repeats": 1},
}
CUSTOM = {"tiny_cnn": "my_models:tiny_cnn"}


def write_models_file(project: Path) -> None:
    sources = [inspect.getsource(f) for f in FACTORIES]
    (project / "my_models.py").write_text("\n\n".join([*sources, NOT_CALLABLE]))


def write_project_params(project: Path, **top: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params.update({"models": ["tiny_cnn"], "custom_models": CUSTOM, **top})
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml naming tiny_cnn, my_models.py, and the 8x8 digits prepared in ``prepared``."""
    root = tmp_path_factory.mktemp("custom")
    write_models_file(root)
    write_project_params(root)
    prepare_digits(root / "prepared")
    return root


def shrinkflow(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "shrinkflow"), *args],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
    )


def ok(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = shrinkflow(project, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0].removeprefix("error: ")


# ---- validation: no framework, no user code ----


@pytest.mark.parametrize(
    ("custom", "models", "message"),
    [
        (
            {"tiny_cnn": "nosuch.nets:build"},
            ["tiny_cnn"],
            "custom_models.tiny_cnn: module 'nosuch.nets' not found",
        ),
        (
            {"tiny_cnn": "nets/missing.py:build"},
            ["tiny_cnn"],
            "custom_models.tiny_cnn: file nets/missing.py not found",
        ),
        (
            {"tiny_cnn": "my_models"},
            ["tiny_cnn"],
            "custom_models.tiny_cnn: 'my_models' is not a factory ref (module.path:callable",
        ),
        (
            {"resnet20": "my_models:tiny_cnn"},
            ["resnet20"],
            "custom_models.resnet20: 'resnet20' is a registry model's name",
        ),
        (
            {"tiny_cnn": {"torch": "my_models:tiny_cnn"}},
            ["tiny_cnn"],
            "models[0]: custom model 'tiny_cnn' has no tensorflow factory in "
            "custom_models.tiny_cnn; a list applies to every listed backend: for an entry one "
            "backend lacks, write models per backend",
        ),
        (
            CUSTOM,
            ["tiny_cnn", "small_cnn"],
            "models[1]: 'small_cnn' is neither a torch registry model",
        ),
    ],
    ids=["module", "file", "syntax", "registry-name", "backend-missing", "unknown"],
)
def test_validate_refuses_bad_custom_models_in_one_line(tmp_path, custom, models, message):
    write_models_file(tmp_path)
    write_project_params(tmp_path, custom_models=custom, models=models)
    assert one_line_error(shrinkflow(tmp_path, "validate")).startswith(message)


def test_a_per_backend_factory_builds_only_on_its_backend(project, monkeypatch):
    monkeypatch.chdir(project)
    per_backend = {"torch": ["resnet20", "tiny_cnn"], "tensorflow": ["resnet20"]}
    cfg = load_params(
        [project / "params.yaml"],
        [f"custom_models={json.dumps({'tiny_cnn': {'torch': 'my_models:tiny_cnn'}})}"]
        + [f"models={json.dumps(per_backend)}"],
    )
    assert custom_models.builds_on(cfg, "torch", "tiny_cnn")
    assert not custom_models.builds_on(cfg, "tensorflow", "tiny_cnn")
    assert custom_models.builds_on(cfg, "tensorflow", "resnet20")
    assert custom_models.factory_ref(cfg, "tensorflow", "tiny_cnn") is None


# ---- what a factory returns (torch) ----


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("my_models:missing", "custom_models.m: my_models has no attribute 'missing'"),
        ("my_models:not_callable", "my_models:not_callable is not callable (it is of type int)"),
        (
            "my_models:no_keywords",
            "custom_models.m: my_models:no_keywords takes no num_classes, in_channels, "
            "image_size keyword",
        ),
        ("my_models:not_a_model", "returned a builtins.str, not a torch nn.Module"),
        ("my_models:wrong_classes", "the torch model outputs (1, 12) for a (1, 1, 8, 8) input"),
    ],
    ids=["attribute", "not-callable", "signature", "not-a-module", "output-shape"],
)
def test_torch_refuses_a_factory_that_does_not_build_a_model(project, monkeypatch, ref, message):
    from shrinkflow.backends.torch.models import create_model

    monkeypatch.chdir(project)
    with pytest.raises(ShrinkflowError, match="^custom_models.m: ") as error:
        create_model("m", 10, 1, 8, factory=ref)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_train_cli_stops_on_a_bad_model_in_one_line(project):
    result = shrinkflow(
        project, "train", "--backend", "torch", "--model", "tiny_cnn", "--in", "prepared",
        "--out", "bad/model", "--set", "custom_models.tiny_cnn=my_models:wrong_classes",
    )  # fmt: skip
    assert one_line_error(result) == (
        "custom_models.tiny_cnn: the torch model outputs (1, 12) for a (1, 1, 8, 8) input, "
        "expected (1, 10) (one logit per class)"
    )
    assert not (project / "bad/model").exists()


def _baseline(project: Path, factory: str, dest: Path) -> Path:
    """An untrained custom model saved as a torch baseline node (no MLflow run)."""
    from shrinkflow.backends.torch.artifact import save_model
    from shrinkflow.backends.torch.models import create_model
    from shrinkflow.data.prepared import load_prepared
    from shrinkflow.outputs import write_json
    from shrinkflow.stages import NODE_FILE
    from shrinkflow.training import model_spec

    data = load_prepared(project / "prepared")
    name = factory.split(":")[1]
    model = create_model(name, data.num_classes, data.channels, data.image_size, factory=factory)
    dest.mkdir(parents=True)
    save_model(model, model_spec(name, data, factory), dest)
    write_json(
        dest / NODE_FILE, {"backend": "torch", "model": name, "stage": "baseline", "seed": 0}
    )
    return dest


def test_torch_pruning_and_export_failures_name_the_job(project, monkeypatch, tmp_path):
    from shrinkflow.backends.base import JobContext
    from shrinkflow.backends.torch.prune import prune_model
    from shrinkflow.backends.torch.quantize import quantize_model
    from shrinkflow.backends.torch.sensitivity import analyze_sensitivity
    from shrinkflow.data.prepared import load_prepared

    monkeypatch.chdir(project)
    cfg = load_params([project / "params.yaml"])
    data = load_prepared(project / "prepared")
    context = JobContext(tmp_path / "out", tmp_path / "resume")
    context.out_dir.mkdir()
    viewed = _baseline(project, "my_models:fixed_view", tmp_path / "fixed_view")
    with pytest.raises(ShrinkflowError) as error:
        prune_model(cfg, "structured_l1", 0.5, viewed, data, context)
    assert str(error.value).startswith(
        "prune structured_l1: Torch-Pruning cannot prune model fixed_view: running the pruned "
        "model failed (shape '[-1, 256]' is invalid"
    )
    with pytest.raises(ShrinkflowError, match="^sensitivity: Torch-Pruning cannot prune model"):
        analyze_sensitivity(cfg, viewed, data, tmp_path / "sensitivity")
    branching = _baseline(project, "my_models:branchy", tmp_path / "branchy")
    with pytest.raises(ShrinkflowError) as error:
        quantize_model(cfg, "static_int8", branching, data, context)
    assert str(error.value).startswith(
        "quantize static_int8: torch.export cannot capture model branchy ("
    )
    assert "\n" not in str(error.value)


# ---- the chains, through the CLI ----


def test_torch_chain_runs_a_custom_model(project):
    """train, prune (l1_unstructured and structured_l1), static_int8, evaluate; the model
    rebuilds from its spec's factory after filter pruning; the train run records the ref."""
    base = "results/models/torch/tiny_cnn/seed0"
    baseline = f"{base}/baseline/model"
    ok(project, "train", "--backend", "torch", "--model", "tiny_cnn", "--in", "prepared",
       "--out", baseline)  # fmt: skip
    for method in ("l1_unstructured", "structured_l1"):
        ok(project, "prune", "--method", method, "--sparsity", "0.5", "--in", baseline,
           "--data", "prepared", "--sensitivity", f"{base}/sensitivity",
           "--out", f"{base}/pruned/{method}/0.5/model")  # fmt: skip
    quantized = f"{base}/quantized/static_int8/baseline"
    ok(project, "quantize", "--method", "static_int8", "--in", baseline, "--data", "prepared",
       "--out", f"{quantized}/model")  # fmt: skip
    ok(project, "evaluate", "--in", f"{quantized}/model", "--reference", baseline,
       "--data", "prepared", "--out", f"{quantized}/metrics.json")  # fmt: skip

    from shrinkflow.backends.torch.artifact import load_model

    spec = torch.load(project / baseline / "model.pt", weights_only=True)["spec"]
    assert spec["arch"] == "tiny_cnn" and spec["factory"] == "my_models:tiny_cnn"
    before, _ = load_model(project / baseline)
    pruned, _ = load_model(project / f"{base}/pruned/structured_l1/0.5/model")
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [m.out_channels for m in before.modules() if isinstance(m, nn.Conv2d)]
    metrics = json.loads((project / f"{quantized}/metrics.json").read_text())
    assert metrics["model"] == "tiny_cnn" and metrics["quant_method"] == "static_int8"
    trained = [
        run.data.params["custom_models.tiny_cnn"]
        for run in mlflow_runs(project)
        if run.data.tags.get("shrinkflow.stage") == "train" and run.info.status == "FINISHED"
    ]
    assert trained == ["my_models:tiny_cnn"]  # the factory ref is a param of the train run


def test_tensorflow_refuses_lambda_and_softmax_models(project, monkeypatch):
    from shrinkflow.backends.tensorflow.models import create_model

    monkeypatch.chdir(project)
    with pytest.raises(ShrinkflowError) as error:
        create_model("m", 10, 1, 8, factory="my_models:keras_lambda")
    assert str(error.value).startswith(
        "custom_models.m: the tensorflow model uses a Lambda layer; shrinkflow saves and loads "
        "only models of built-in tf_keras layers"
    )
    with pytest.raises(ShrinkflowError, match="ends in a Softmax layer; it must end in the Dense"):
        create_model("m", 10, 1, 8, factory="my_models:keras_softmax")
    with pytest.raises(ShrinkflowError, match="returned a builtins.str, not a tf_keras Model"):
        create_model("m", 10, 1, 8, factory="my_models:not_a_model")


def test_tensorflow_chain_runs_a_custom_model(project):
    """train, prune l1_unstructured, static_int8 (TFLite), evaluate; the saved Keras model is
    the registry's shape (pixels in, normalised inside, logits from ``fc``) and loads in safe
    mode."""
    base = "results/models/tensorflow/tiny_cnn/seed0"
    baseline = f"{base}/baseline/model"
    ok(project, "train", "--backend", "tensorflow", "--model", "tiny_cnn", "--in", "prepared",
       "--out", baseline)  # fmt: skip
    ok(project, "prune", "--method", "l1_unstructured", "--sparsity", "0.5", "--in", baseline,
       "--data", "prepared", "--sensitivity", f"{base}/sensitivity",
       "--out", f"{base}/pruned/l1_unstructured/0.5/model")  # fmt: skip
    quantized = f"{base}/quantized/static_int8/baseline"
    ok(project, "quantize", "--method", "static_int8", "--in", baseline, "--data", "prepared",
       "--out", f"{quantized}/model")  # fmt: skip
    ok(project, "evaluate", "--in", f"{quantized}/model", "--reference", baseline,
       "--data", "prepared", "--out", f"{quantized}/metrics.json")  # fmt: skip

    from shrinkflow.backends.tensorflow.artifact import load_model

    model, spec = load_model(project / baseline)
    names = [layer.name for layer in model.layers]
    assert names[:3] == ["pixels", "rescale", "normalize"] and names[-1] == "fc"
    assert model.name == "tiny_cnn" and spec["factory"] == "my_models:tiny_cnn"
    pruned = json.loads(
        (project / f"{base}/pruned/l1_unstructured/0.5/model/prune.json").read_text()
    )
    assert pruned["measured_sparsity"] > 0.4
    metrics = json.loads((project / f"{quantized}/metrics.json").read_text())
    assert metrics["model"] == "tiny_cnn" and metrics["quant_method"] == "static_int8"


# ---- the DAG ----


def test_snakemake_and_dvc_plan_the_custom_models_jobs(tmp_path):
    """A dry run of both DAG tools lists the custom model's jobs."""
    project = make_project(tmp_path / "p", quantize_methods=["static_int8"])
    write_models_file(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params.update(models=["resnet20", "tiny_cnn"], custom_models=CUSTOM)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "1"],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = dry.stdout + dry.stderr
    assert "--model tiny_cnn" in planned
    assert "results/models/torch/tiny_cnn/seed0/quantized/static_int8/baseline" in planned

    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        commands = [" ".join(stage.cmd.split()) for stage in repo.index.stages]
    trains = [c for c in commands if c.startswith("shrinkflow train ")]
    assert sum("--model tiny_cnn" in c for c in trains) == 1, trains
    assert sum("tiny_cnn/seed0/quantized/static_int8/baseline" in c for c in commands) >= 1
