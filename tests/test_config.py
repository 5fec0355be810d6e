"""params.yaml validation: every bad input is one line naming the key path and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shrinkflow.config import apply_override, load_params, merge, schema
from shrinkflow.errors import ShrinkflowError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def test_default_params_are_valid():
    cfg = load_params([PARAMS])
    assert cfg["data"]["name"] == "digits"
    assert cfg["backends"] == ["torch", "tensorflow"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_fraction=1.5", "data.val_fraction: 1.5 is not in [0, 1)"),
        (
            "data.name=cifar",
            "data.name: 'cifar' is not one of digits, cifar10, cifar100, imagefolder",
        ),
        (
            "train.epoch=3",
            "train: unknown key 'epoch' (allowed: augment, batch_size, compile, distributed,",
        ),
        ("bogus=1", "params: unknown key 'bogus'"),
        ("train.epochs=two", "train.epochs: 'two' is not of type integer"),
        ("train.epochs=0", "train.epochs: 0 is not in [1, 1000]"),
        ("train.lr=0", "train.lr: 0 is not in (0, inf)"),
        ("models=[resnet20, resnet21]", "models[1]: 'resnet21' is neither a torch registry"),
        ("backends=[torch, jax]", "backends[1]: 'jax' is not one of torch"),
        ("backends=[]", "backends: needs at least 1 item(s)"),
        ("evaluate.batch_sizes=[1, 0]", "evaluate.batch_sizes[1]: 0 is not in [1, 4096]"),
        ("data.mirror=ftp://x", "data.mirror: 'ftp://x' does not match"),
        ("train.schedule=step", "train.schedule: 'step' is not one of cosine, constant"),
        ("data.name=imagefolder", "data.root: required when data.name is imagefolder"),
        ("train.nesterov=1", "train.nesterov: 1 is not of type boolean"),
        ("prune.sparsities=[0.5, 1.0]", "prune.sparsities[1]: 1.0 is not in [0, 1)"),
        ("prune.sparsities=[-0.1]", "prune.sparsities[0]: -0.1 is not in [0, 1)"),
        ("prune.methods=[l2]", "prune.methods[0]: 'l2' is not one of l1_unstructured,"),
        ("prune.scope=block", "prune.scope: 'block' is not one of global, layer"),
        (
            "prune.structured.max_layer_ratio=1",
            "prune.structured.max_layer_ratio: 1 is not in (0, 1)",
        ),
        (
            "prune.structured.layer_ratios=[0.1, 1.0]",
            "prune.structured.layer_ratios[1]: 1.0 is not",
        ),
        ("prune.gradual.frequency=0", "prune.gradual.frequency: 0 is not in [1, inf)"),
        ("finetune.epochs=-1", "finetune.epochs: -1 is not in [0, 1000]"),
        (
            "quantize.calibration_batches=0",
            "quantize.calibration_batches: 0 is not in [1, 1000]",
        ),
        ("quantize.qat.epochs=0", "quantize.qat.epochs: 0 is not in [1, 1000]"),
        ("quantize.qat.lr=0", "quantize.qat.lr: 0 is not in (0, inf)"),
        ("quantize.qat.warmup=1", "quantize.qat: unknown key 'warmup' (allowed: epochs, lr)"),
        ("quantize.method=[static_int8]", "quantize: unknown key 'method' (allowed:"),
        (
            "quantize.methods=[static_int8, static_int8]",
            "quantize.methods: ['static_int8', 'static_int8'] has duplicate items",
        ),
        ("quantize.methods=[8]", "quantize.methods[0]: 8 is not of type string"),
        (
            "quantize.methods=[static_int8, int4]",
            "quantize.methods[1]: 'int4' is not a quantization method (allowed: static_int8, "
            "dynamic_int8, qat_int8, float32, float16, fixed_w<bits> with bits 2..16)",
        ),
        (
            "quantize.methods=[fixed_w1]",
            "quantize.methods[0]: 'fixed_w1' asks for 1-bit weights; fixed-point widths are 2..16",
        ),
        ("quantize.methods=[fixed_w17]", "quantize.methods[0]: 'fixed_w17' asks for 17-bit"),
        ("quantize.methods=[fixed_w]", "quantize.methods[0]: 'fixed_w' is not a quantization"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ShrinkflowError) as info:
        load_params([PARAMS], [override])
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_every_quantize_method_family_is_accepted_and_an_empty_list_turns_it_off():
    methods = "[static_int8, dynamic_int8, qat_int8, fixed_w2, fixed_w16]"
    cfg = load_params([PARAMS], ["backends=[torch]", f"quantize.methods={methods}"])
    assert cfg["quantize"]["methods"][-1] == "fixed_w16"
    tflite = "[static_int8, dynamic_int8, float16, float32, fixed_w8]"
    cfg = load_params([PARAMS], ["backends=[tensorflow]", f"quantize.methods={tflite}"])
    assert cfg["quantize"]["methods"][2:4] == ["float16", "float32"]
    assert load_params([PARAMS], ["quantize.methods=[]"])["quantize"]["methods"] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backends=[torch]", "quantize.methods=[static_int8, float16]"],
            "quantize.methods[1]: 'float16' is not available for backend torch (it has: "
            "static_int8, dynamic_int8, qat_int8, fixed_w<bits>)",
        ),
    ],
)
def test_every_method_must_exist_on_every_listed_backend(overrides, message):
    """DVC's matrix runs every method on every backend, so a gap is an error up front."""
    with pytest.raises(ShrinkflowError) as info:
        load_params([PARAMS], overrides)
    assert str(info.value) == message


def test_missing_key_is_named(tmp_path):
    cfg = yaml.safe_load(PARAMS.read_text())
    del cfg["train"]["lr"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ShrinkflowError, match=r"^train: missing key 'lr'$"):
        load_params([path])


def test_presets_merge_in_order_and_lists_replace(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("models: [resnet56]\ntrain: {epochs: 3}\n")
    cfg = load_params([PARAMS, preset], ["train.lr=1e-3"])
    assert cfg["models"] == ["resnet56"]
    assert cfg["train"]["epochs"] == 3
    assert cfg["train"]["lr"] == pytest.approx(1e-3)  # 1e-3 is a float, not YAML 1.1's string
    assert cfg["train"]["batch_size"] == load_params([PARAMS])["train"]["batch_size"]


def test_merge_does_not_mutate_its_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    merged = merge(base, {"a": {"b": 2}})
    assert merged == {"a": {"b": 2, "c": [1]}}
    assert base == {"a": {"b": 1, "c": [1]}}


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..lr=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(ShrinkflowError, match="expected key.path=value"):
        apply_override({}, bad)


def test_unreadable_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ShrinkflowError, match=r"nope\.yaml: cannot read"):
        load_params([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ShrinkflowError, match=r"broken\.yaml: line \d+ is not valid YAML"):
        load_params([broken])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ShrinkflowError, match="expected a mapping"):
        load_params([listy])


def test_declared_registry_models_are_what_each_backend_builds():
    """backends.base.REGISTRY_MODELS (read without a framework, by config validation) lists
    each backend's registry; torch first, as in any process that loads both frameworks."""
    from shrinkflow.backends.base import REGISTRY_MODELS, backend_module

    for backend in ("torch", "tensorflow"):
        built = backend_module(backend, "models").list_models()
        assert sorted(REGISTRY_MODELS[backend]) == sorted(built), backend


def test_a_model_no_backend_registers_is_a_one_line_error():
    with pytest.raises(ShrinkflowError) as err:
        load_params([ROOT / "params.yaml"], ["models=[resnet20, resnet21]"])
    assert str(err.value) == (
        "models[1]: 'resnet21' is neither a torch registry model (googlenet, resnet18, resnet20, "
        "resnet32, resnet44, resnet50, resnet56, vgg16, vgg16_bn) nor a custom_models key"
    )


def test_packaged_schema_is_the_workflow_schema():
    from shrinkflow.config import SCHEMA_PATH

    assert SCHEMA_PATH.read_text() == (ROOT / "workflow/schemas/params.schema.yaml").read_text()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shrinkflow.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_validate_ok_and_bad_input_exit_codes():
    ok = run_cli("validate", "--params", str(PARAMS))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = run_cli("validate", "--params", str(PARAMS), "--set", "data.val_fraction=2")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: data.val_fraction: 2 is not in [0, 1)"
    assert "Traceback" not in bad.stderr


def test_cli_validate_merges_a_preset_over_the_folders_params():
    """As Snakemake merges a --configfile over params.yaml (and each job reads both)."""
    preset = "configs/study4_googlenet_cifar100.yaml"
    alone = run_cli("validate", "--params", preset)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.startswith(f"params.yaml + {preset}: ok (data cifar100,"), alone.stdout
    both = run_cli("validate", "--params", str(PARAMS), "--params", preset)
    assert both.stdout.replace(str(PARAMS), "params.yaml") == alone.stdout


def test_cli_validate_of_a_preset_outside_a_project_says_how(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("models: [resnet56]\n")
    bad = run_cli("validate", "--params", "preset.yaml", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: params: missing key "), bad.stderr
    assert "there is no params.yaml here to merge preset.yaml over;" in bad.stderr
    assert bad.stderr.count("\n") == 1
    ok = run_cli("validate", "--params", str(PARAMS), "--params", "preset.yaml", cwd=tmp_path)
    assert ok.stdout.startswith(f"{PARAMS} + preset.yaml: ok"), ok.stderr


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("[static_int8, fixed_w1]", "quantize.methods[1]: 'fixed_w1' asks for 1-bit weights;"),
        ("[int4]", "quantize.methods[0]: 'int4' is not a quantization method (allowed:"),
    ],
)
def test_cli_validate_names_a_bad_quantize_method(methods, message):
    bad = run_cli("validate", "--params", str(PARAMS), "--set", f"quantize.methods={methods}")
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"error: {message}"), bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_cli_models_lists_the_registry():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert "resnet20" in names and "vgg16_bn" in names
    resnet20 = next(line for line in result.stdout.splitlines() if line.startswith("resnet20 "))
    assert float(resnet20.split()[1]) == pytest.approx(0.27, abs=0.01)


def test_cli_unknown_backend_is_one_line():
    result = run_cli("models", "--backend", "jax")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: backend: 'jax' is not one of torch, tensorflow"


# ---- issue 14: non-finite numbers, integers, bounds, key types, ASCII digits, tracking URIs ----


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.nan", "train.lr: nan is not a finite number"),
        ("train.lr=.inf", "train.lr: inf is not a finite number"),
        ("prune.sparsities=[0.5, .nan]", "prune.sparsities[1]: nan is not a finite number"),
        ("data.val_fraction=.nan", "data.val_fraction: nan is not a finite number"),
        ("report.max_accuracy_drop=-.inf", "report.max_accuracy_drop: -inf is not a finite"),
        # a key the schema does not type (an unknown key) is still walked
        ("train.bogus=.nan", "train.bogus: nan is not a finite number"),
        ("data.image_size=16.0", "data.image_size: 16.0 is not of type integer"),
        ("train.epochs=1e3", "train.epochs: 1000.0 is not of type integer"),
        ("evaluate.batch_sizes=[1, 64.0]", "evaluate.batch_sizes[1]: 64.0 is not of type integer"),
        ("evaluate.batch_sizes=[1, 2000000]", "evaluate.batch_sizes[1]: 2000000 is not in [1, "),
        ("train.batch_size=100000", "train.batch_size: 100000 is not in [1, "),
        ("train.epochs=100000", "train.epochs: 100000 is not in [1, "),
        ("seed=4294967296", "seed: 4294967296 is not in [0, 4294967295]"),
        ("seeds=[0, -1]", "seeds[1]: -1 is not in [0, 4294967295]"),
        ("seeds=[0, 1.5]", "seeds[1]: 1.5 is not of type integer"),
        ("seeds=[2, 2]", "seeds: [2, 2] has duplicate items"),
        ("seeds=[]", "seeds: needs at least 1 item(s)"),
        ("seeds=3", "seeds: 3 is not of type array"),
        ("data.root=2024-01-01", "data.root: 2024-01-01 is read by YAML as a date"),
        ("quantize.methods=[fixed_w٤]", "quantize.methods[0]: 'fixed_w٤' is not a quantization"),
        ("quantize.methods=[fixed_w04]", "quantize.methods[0]: 'fixed_w04' is not a quantization"),
        ("tracking.uri=foo://host/x", "tracking.uri: 'foo://host/x' has scheme 'foo', which"),
        ("tracking.uri=databricks-uc", "tracking.uri: 'databricks-uc' has scheme"),
    ],
)
def test_non_finite_non_integer_unbounded_and_odd_values_are_named(override, message):
    with pytest.raises(ShrinkflowError) as info:
        load_params([PARAMS], [override])
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def _integer_keys(node: dict, path: str = "") -> list[str]:
    """Dotted paths of every `type: integer` key in the schema (list items as `key[0]`)."""
    found = []
    if node.get("type") == "integer":
        found.append(path)
    for name, child in node.get("properties", {}).items():
        found += _integer_keys(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        found += _integer_keys(node["items"], f"{path}[0]")
    return found


def test_every_integer_key_rejects_a_float_with_an_integral_value():
    """jsonschema counts 16.0 as an integer; params must not (range(16.0) fails mid-run)."""
    keys = _integer_keys(schema())
    assert "data.image_size" in keys and "evaluate.batch_sizes[0]" in keys and len(keys) >= 15
    base = load_params([PARAMS])
    for key in keys:
        dotted = key.removesuffix("[0]")
        value = base
        for part in dotted.split("."):
            value = value[part]
        wanted = value[0] if key.endswith("[0]") else value
        raw = f"[{float(wanted)}]" if key.endswith("[0]") else f"{float(wanted)}"
        with pytest.raises(ShrinkflowError, match=r"is not of type integer$") as info:
            load_params([PARAMS], [f"{dotted}={raw}"])
        assert str(info.value).startswith(key), info.value


def test_every_bounded_integer_explains_its_bound():
    """A maximum that stops a run before it asks for too much memory or time says why."""

    def walk(node: dict, path: str) -> None:
        if node.get("type") == "integer" and "maximum" in node:
            assert node.get("description"), f"{path}: maximum without a description"
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema(), "params")


def test_keys_that_are_not_text_are_one_line(tmp_path):
    """YAML reads `1:` as an int and `on:` as a bool; mixed with text keys, sorting them used to
    raise TypeError. Now one line names the key."""
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("1: a\nfoo: b\n")
    with pytest.raises(ShrinkflowError, match=r"^params: key 1 is not text .*quote it"):
        load_params([PARAMS, mixed])
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  on: 3\n")
    with pytest.raises(ShrinkflowError, match=r"^train: key True is not text"):
        load_params([PARAMS, nested])


def test_cli_validate_rejects_nan_and_mixed_keys_in_one_line(tmp_path):
    bad = run_cli("validate", "--params", str(PARAMS), "--set", "train.lr=.nan")
    assert bad.returncode == 2
    assert bad.stderr == "error: train.lr: nan is not a finite number\n", bad.stderr
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("1: a\nfoo: b\n")
    bad = run_cli("validate", "--params", str(PARAMS), "--params", str(mixed))
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: params: key 1 is not text"), bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "postgresql://u:p@host:5432/db",
        "postgresql+psycopg2://u@host/db",
        "mysql+pymysql://u@host/db",
        "mssql://u@host/db",
        "http://127.0.0.1:5000",
        "https://mlflow.example.org",
        "file:///tmp/mlruns",
        "mlruns",
        "databricks",
        "databricks://profile",
    ],
)
def test_tracking_uris_mlflow_can_store_runs_in_are_accepted(uri):
    assert load_params([PARAMS], [f"tracking.uri={uri}"])["tracking"]["uri"] == uri


def test_a_bad_tracking_uri_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://host/x")
    with pytest.raises(ShrinkflowError, match=r"^MLFLOW_TRACKING_URI: 'foo://host/x' has scheme"):
        load_params([PARAMS])
    # tracking.uri wins over the variable, so a good one in params is enough
    load_params([PARAMS], ["tracking.uri=sqlite:///x.db"])
    from shrinkflow.tracking import tracking_uri

    with pytest.raises(ShrinkflowError, match=r"^MLFLOW_TRACKING_URI: "):
        tracking_uri({"tracking": {"uri": None}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["quantize.methods={torch: [fixed_w8]}"],
            "quantize.methods: no list for tensorflow, which backends lists (a per-backend "
            "mapping names every listed backend; give it one or drop it from backends)",
        ),
        (
            ["backends=[torch]", "quantize.methods={torch: [fixed_w8], tensorflow: [float16]}"],
            "quantize.methods.tensorflow: tensorflow is not in backends",
        ),
        (
            ["quantize.methods={torch: [float16], tensorflow: [float16]}"],
            "quantize.methods.torch[0]: 'float16' is not available for backend torch (it has: "
            "static_int8, dynamic_int8, qat_int8, fixed_w<bits>)",
        ),
        (
            ["quantize.methods=[static_int8, float16]"],
            "quantize.methods[1]: 'float16' is not available for backend torch (it has: "
            "static_int8, dynamic_int8, qat_int8, fixed_w<bits>); a list applies to every listed "
            "backend: for an entry one backend lacks, write quantize.methods per backend, "
            "{torch: [...], tensorflow: [...]}",
        ),
        (
            ["models={torch: [resnet20], tf: [resnet20]}"],
            "models: 'tf' is not one of torch, tensorflow",
        ),
    ],
)
def test_per_backend_lists_are_checked_per_backend(overrides, message):
    with pytest.raises(ShrinkflowError) as err:
        load_params([ROOT / "params.yaml"], overrides)
    assert str(err.value) == message


def test_a_per_backend_list_gives_each_backend_its_own_sweep():
    from shrinkflow import dag

    cfg = load_params(
        [ROOT / "params.yaml"],
        [
            "models={torch: [resnet20, resnet32], tensorflow: [resnet20]}",
            "quantize.methods={torch: [fixed_w8], tensorflow: [fixed_w8, float16]}",
            "prune.methods=[l1_unstructured]",
        ],
    )
    nodes = dag.evaluated_nodes(cfg)
    points = len(cfg["prune"]["sparsities"])
    torch_nodes = [n for n in nodes if n.backend == "torch"]
    tf_nodes = [n for n in nodes if n.backend == "tensorflow"]
    assert len(torch_nodes) == 2 * (1 + points) * (1 + 1)
    assert len(tf_nodes) == 1 * (1 + points) * (1 + 2)
    assert {n.quant_method for n in torch_nodes} == {"", "fixed_w8"}
    assert {n.model for n in tf_nodes} == {"resnet20"}
