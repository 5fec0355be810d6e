"""TensorFlow pruning: one-shot magnitude pruning, tfmot's gradual schedules, the prune stage."""

import copy
import os
import shutil

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from data_fixtures import TRAIN  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import (  # noqa: E402
    KERAS_FILE,
    load_model,
    save_model,
)
from shrinkflow.backends.tensorflow.prune import (  # noqa: E402
    gradual_fingerprint,
    magnitude_prune,
    prune_model,
    prune_one_shot,
    schedule_steps,
)
from shrinkflow.backends.tensorflow.resume_state import resumable_run_id  # noqa: E402
from shrinkflow.backends.tensorflow.weights import (  # noqa: E402
    count_params,
    prunable_layers,
    prunable_weights,
    resolve_exclude,
)
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402

# Other jobs share the 2 CI cores; one thread each keeps TensorFlow from oversubscribing them.
# Setting it fails once TensorFlow has run an op, i.e. when another test module of this
# session got there first and fixed the count already.
try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

BATCH = 32
CFG = {
    "seed": 0,
    "train": {**TRAIN, "batch_size": BATCH},
    "prune": {
        "scope": "global",
        "exclude": ["output"],
        # 256 training images = 8 steps an epoch, 16 in all: updates at steps 4, 8 and 12.
        "gradual": {
            "epochs": 2,
            "lr": 0.01,
            "begin_fraction": 0.0,
            "end_fraction": 0.75,
            "frequency": 4,
            "initial_sparsity": 0.0,
        },
    },
}


def with_prune(**changes) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["prune"].update(changes)
    return cfg


def with_gradual(**changes) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["prune"]["gradual"].update(changes)
    return cfg


def digits_data() -> PreparedData:
    """384 of scikit-learn's 8x8 digits: 256 train, 64 val, 64 test images, 1 channel."""
    digits = load_digits()
    images = np.round(digits.images[:384] * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    train = order[128:]
    pixels = images[train] / 255.0
    return PreparedData(
        images=images,
        labels=digits.target[:384].astype(np.int64),
        train=train,
        val=order[64:128],
        test=order[:64],
        classes=[str(c) for c in range(10)],
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        manifest={"fingerprint": "digits-8x8-tf-prune-test"},
    )


@pytest.fixture(scope="module")
def baseline(tf_digits_baseline):
    """conftest's trained resnet20 (read only), pruned here on the 384-image ``digits_data``:
    (model folder, data)."""
    return tf_digits_baseline[0], digits_data()


def fresh(baseline) -> keras.Model:
    return load_model(baseline[0])[0]


def kernels(model: keras.Model) -> dict[str, np.ndarray]:
    return {layer.name: layer.kernel.numpy() for layer in prunable_layers(model)}


def prune(
    baseline, tmp_path, method="l1_unstructured", sparsity=0.7, cfg=CFG, run_id=None, watch=None
):
    """``prune_model`` into ``tmp_path/out``: (out, facts, on_epoch calls). ``watch(epoch)`` is
    called from on_epoch too."""
    out = tmp_path / "out"
    out.mkdir()
    epochs = []

    def on_epoch(epoch, metrics):
        epochs.append((epoch, metrics))
        if watch is not None:
            watch(epoch)

    facts = prune_model(
        cfg,
        method,
        sparsity,
        baseline[0],
        baseline[1],
        JobContext(out, tmp_path / "resume", on_epoch, run_id),
        None,
    )
    return out, facts, epochs


def test_magnitude_prune_zeroes_exactly_the_rounded_count_smallest_first():
    a = np.array([[0.5, -0.1], [0.3, -0.3]], np.float32)
    b = np.array([0.2, -0.05, 0.3, 0.9, 0.1], np.float32)

    def f32(values) -> np.ndarray:
        return np.array(values, np.float32)

    # Global: round(0.6 x 9) = 5 of the 9 entries; the fifth smallest is a tie of three |0.3|,
    # broken by position: a[1, 0] goes, a[1, 1] and b[2] stay.
    glob = magnitude_prune([a, b], 0.6, "global")
    np.testing.assert_array_equal(glob[0], f32([[0.5, 0.0], [0.0, -0.3]]))
    np.testing.assert_array_equal(glob[1], f32([0.0, 0.0, 0.3, 0.9, 0.0]))
    # Layer: 2 of 4 and round(2.5) = 2 of 5 (Python rounds halves to even, as torch does).
    layer = magnitude_prune([a, b], 0.5, "layer")
    np.testing.assert_array_equal(layer[0], f32([[0.5, 0.0], [0.0, -0.3]]))
    np.testing.assert_array_equal(layer[1], f32([0.2, 0.0, 0.3, 0.9, 0.0]))
    assert a[0, 1] == f32(-0.1)  # the inputs are not modified
    for kept, original in zip(magnitude_prune([a, b], 0.0, "global"), [a, b], strict=True):
        np.testing.assert_array_equal(kept, original)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_shot_scopes_hit_the_target_and_keep_excluded_layers_dense(baseline, scope):
    model = fresh(baseline)
    before = kernels(model)
    names = prune_one_shot(model, 0.7, scope, ["output", "layer1_0_*"])
    after = kernels(model)
    assert "fc" not in names and "layer1_0_conv1" not in names and "conv1" in names
    for name in ("fc", "layer1_0_conv1", "layer1_0_conv2"):
        np.testing.assert_array_equal(after[name], before[name])
    n = sum(after[k].size for k in names)
    zeros = sum(int((after[k] == 0).sum()) for k in names)
    per_layer = {k: float((after[k] == 0).mean()) for k in names}
    if scope == "global":
        assert zeros == round(0.7 * n)
        # One ranking across layers: every pruned |w| is at most every kept |w|.
        pruned = np.concatenate([np.abs(before[k][after[k] == 0]) for k in names])
        kept = np.concatenate([np.abs(before[k][after[k] != 0]) for k in names])
        assert pruned.max() <= kept.min()
        assert max(per_layer.values()) - min(per_layer.values()) > 0.1
    else:
        for k in names:
            assert int((after[k] == 0).sum()) == round(0.7 * after[k].size), k
    for k in names:  # kept entries keep their values
        np.testing.assert_array_equal(after[k][after[k] != 0], before[k][after[k] != 0])


def test_exclude_resolves_output_and_patterns(baseline):
    model = fresh(baseline)
    assert resolve_exclude(model, ["output"]) == ["fc"]
    assert resolve_exclude(model, ["*_downsample_0"]) == [
        "layer2_0_downsample_0",
        "layer3_0_downsample_0",
    ]
    assert len(prunable_layers(model)) == len(prunable_layers(model, ["output"])) + 1 == 22


def test_exclude_pattern_that_matches_nothing_is_named(baseline):
    with pytest.raises(ShrinkflowError) as error:
        resolve_exclude(fresh(baseline), ["output", "layer9*"])
    message = str(error.value)
    assert message.startswith("prune.exclude: 'layer9*' matches no conv or dense layer")
    assert "(layers: conv1, layer1_0_conv1" in message and "more)" in message
    # Torch's dotted names are not Keras layer names.
    with pytest.raises(ShrinkflowError, match=r"^prune.exclude: 'layer1\.\*' matches no"):
        resolve_exclude(fresh(baseline), ["layer1.*"])


def test_count_params_counts_trainable_variables_and_kernels(baseline):
    model = fresh(baseline)
    counts = count_params(model)
    # resnet20 on 1 channel, 10 classes: the torch model's parameter count; batch-norm moving
    # statistics and the input normalisation's mean/variance are not parameters.
    assert counts["params"] == 272186
    assert counts["prunable_weights"] == prunable_weights(model) == 270608
    assert counts["prunable_nonzero"] == 270608 and counts["measured_sparsity"] == 0.0
    prune_one_shot(model, 0.5, "global", [])
    counts = count_params(model)
    assert counts["prunable_weights"] - counts["prunable_nonzero"] == round(0.5 * 270608)
    assert counts["measured_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert counts["nonzero_params"] <= counts["params"] - round(0.5 * 270608)


def test_one_shot_stage_saves_a_plain_model_at_the_target(baseline, tmp_path):
    out, facts, epochs = prune(baseline, tmp_path, cfg=with_prune(scope="layer"))
    assert sorted(p.name for p in out.iterdir()) == [KERAS_FILE, "spec.json"]
    assert epochs == [] and set(facts) == {
        "measured_sparsity",
        "val_top1",
        "params",
        "nonzero_params",
    }
    model, spec = load_model(out)
    assert spec["arch"] == "resnet20"
    saved = kernels(model)
    pruned = [k for k in saved if k != "fc"]
    zeros = sum(int((saved[k] == 0).sum()) for k in pruned)
    assert facts["measured_sparsity"] == zeros / sum(saved[k].size for k in pruned)
    assert facts["measured_sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert not (saved["fc"] == 0).any()
    assert facts["params"] == count_params(model)["params"]
    assert facts["nonzero_params"] == count_params(model)["nonzero_params"]
    data = baseline[1]
    logits = model.predict(data.images[data.val].astype(np.float32), verbose=0)
    assert facts["val_top1"] == pytest.approx(
        float((logits.argmax(1) == data.labels[data.val]).mean())
    )


@pytest.mark.parametrize(
    ("method", "sparsity", "cfg", "message"),
    [
        (
            "taylor",
            0.5,
            CFG,
            r"^prune.methods: 'taylor' is not available for backend tensorflow "
            r"\(available: l1_unstructured, gradual_polynomial, gradual_constant, structured_l1, "
            r"structured_random, structured_sensitivity\)$",
        ),
        ("l1_unstructured", 1.0, CFG, r"^prune.sparsities: 1.0 is not in \[0, 1\)$"),
        ("l1_unstructured", 0.5, with_prune(scope="block"), r"^prune.scope: 'block' is not one"),
        ("l1_unstructured", 0.5, with_prune(exclude=["fc2"]), r"^prune.exclude: 'fc2' matches"),
        ("l1_unstructured", 0.5, with_prune(exclude=["*"]), r"^prune.exclude: excludes every"),
        ("gradual_polynomial", 0.5, with_prune(exclude=["x*"]), r"^prune.exclude: 'x\*' matches"),
        (
            "gradual_polynomial",
            0.5,
            with_gradual(frequency=13),
            r"^prune.gradual.frequency: 13 steps never reaches the target within the 12 "
            r"pruning steps \(steps 0\.\.12 of 2 epochs x 8 steps .*\); use <= 12, or "
            r"prune.gradual.epochs >= 3$",
        ),
        (
            "gradual_constant",
            0.5,
            with_gradual(end_fraction=0.03),
            r"^prune.gradual.epochs: 2 leaves no step to prune in .*; use >= 15$",
        ),
        (
            "gradual_polynomial",
            0.5,
            with_gradual(initial_sparsity=0.6),
            r"^prune.gradual.initial_sparsity: 0.6 is above the target sparsity 0.5$",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    baseline, tmp_path, method, sparsity, cfg, message
):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShrinkflowError, match=message) as error:
        prune_model(
            cfg,
            method,
            sparsity,
            baseline[0],
            baseline[1],
            JobContext(
                out,
                tmp_path / "resume",
                lambda e, m: pytest.fail("trained although the input is bad"),
            ),
            None,
        )
    assert "\n" not in str(error.value)
    assert list(out.iterdir()) == [] and not (tmp_path / "resume").exists()


def test_schedule_steps_end_on_the_last_update():
    gradual = CFG["prune"]["gradual"]
    assert schedule_steps(gradual, 8) == (0, 12)  # updates 4, 8, 12: 12 is one
    # round(0.75 x 16) = 12, but with frequency 5 the updates are 5 and 10: the schedule ends
    # at 10 so that PolynomialDecay's last update is the one at the final sparsity.
    assert schedule_steps({**gradual, "frequency": 5}, 8) == (0, 10)
    assert schedule_steps({**gradual, "begin_fraction": 0.25, "frequency": 3}, 8) == (4, 10)
    with pytest.raises(ShrinkflowError, match=r"^prune.gradual.end_fraction: 0.2 is not above"):
        schedule_steps({**gradual, "begin_fraction": 0.2, "end_fraction": 0.2}, 8)


PLAIN_LAYERS = {
    "InputLayer",
    "Rescaling",
    "Normalization",
    "Conv2D",
    "BatchNormalization",
    "ReLU",
    "ZeroPadding2D",
    "Add",
    "GlobalAveragePooling2D",
    "Dense",
}


@pytest.fixture(scope="module")
def polynomial_run(baseline, tmp_path_factory) -> dict:
    """gradual_polynomial to 60 % (MLflow run "run-1"): its out folder, facts and on_epoch calls,
    and what a job killed while epoch 2 reports leaves behind: a copy of the resume folder taken
    then (epoch 1's state is the last saved; epoch 2's is written after on_epoch) and the files
    in the out folder then."""
    root = tmp_path_factory.mktemp("gradual_polynomial")
    killed = {}

    def snapshot(epoch: int) -> None:
        if epoch == 2:
            killed["resume"] = shutil.copytree(root / "resume", root / "killed-resume")
            killed["out_files"] = sorted(p.name for p in (root / "out").iterdir())

    out, facts, epochs = prune(
        baseline, root, "gradual_polynomial", 0.6, run_id="run-1", watch=snapshot
    )
    return {"out": out, "facts": facts, "epochs": epochs, "killed": killed}


@pytest.fixture(scope="module")
def gradual_runs(baseline, polynomial_run, tmp_path_factory):
    """Both gradual methods to 60 %: (out folder, facts, on_epoch calls) by method."""
    polynomial = tuple(polynomial_run[key] for key in ("out", "facts", "epochs"))
    constant = prune(baseline, tmp_path_factory.mktemp("gradual_constant"), "gradual_constant", 0.6)
    return {"gradual_polynomial": polynomial, "gradual_constant": constant}


@pytest.mark.parametrize("method", ["gradual_polynomial", "gradual_constant"])
def test_gradual_saves_a_plain_model_at_the_target(baseline, gradual_runs, method):
    out, facts, epochs = gradual_runs[method]
    model, _ = load_model(out)  # safe_mode, no tfmot scope: a wrapper would not load
    assert {type(layer).__name__ for layer in model.layers} <= PLAIN_LAYERS
    assert len(model.weights) == len(fresh(baseline).weights)  # no mask/threshold/step
    saved = kernels(model)
    pruned = [k for k in saved if k != "fc"]
    total = sum(saved[k].size for k in pruned)
    zeros = sum(int((saved[k] == 0).sum()) for k in pruned)
    assert facts["measured_sparsity"] == zeros / total == pytest.approx(0.6, abs=1e-3)
    for k in pruned:  # tfmot prunes every layer to the target, up to its rounding
        assert float((saved[k] == 0).mean()) == pytest.approx(0.6, abs=1 / saved[k].size), k
    assert not (saved["fc"] == 0).any()
    # 16 steps, last update at step 12 (epoch 2): only epoch 2 may be saved.
    assert (facts["epochs"], facts["best_epoch"], facts["resumed_from_epoch"]) == (2, 2, 0)
    assert [e for e, _ in epochs] == [1, 2]
    assert epochs[1][1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert facts["params"] == count_params(model)["params"] == 272186
    assert 0.0 <= facts["val_top1"] <= 1.0


def test_gradual_schedules_differ_before_the_end(gradual_runs):
    # After epoch 1 (step 8 of 12) the cubic schedule is at 0.6 (1 - (1/3)^3) ~ 0.578, the
    # constant one at the target since its first update (step 4).
    polynomial = gradual_runs["gradual_polynomial"][2][0][1]["sparsity"]
    constant = gradual_runs["gradual_constant"][2][0][1]["sparsity"]
    assert polynomial == pytest.approx(0.6 * (1 - (1 / 3) ** 3), abs=2e-3)
    assert constant == pytest.approx(0.6, abs=1e-3)


class Killed(Exception):
    """Stands for the job being killed."""


def test_gradual_resumes_mid_schedule_to_the_same_model(baseline, polynomial_run, tmp_path):
    """A run killed after epoch 1 resumes there: tfmot's masks and step counter come back
    from fit's checkpoint, so the schedule continues at step 9 and the saved model is the one
    of the uninterrupted run, bit for bit (CPU, one thread, deterministic ops). The killed job
    is the uninterrupted run's resume folder as it was while epoch 2 reported (before epoch 2's
    state was written): what a kill at that moment leaves on disk."""
    killed = polynomial_run["killed"]
    assert killed["out_files"] == []  # nothing is written under the output before the end
    resume = shutil.copytree(killed["resume"], tmp_path / "resume")
    fingerprint = gradual_fingerprint(CFG, "gradual_polynomial", 0.6, baseline[0], baseline[1])
    assert resumable_run_id(resume, fingerprint) == "run-1"
    out = tmp_path / "out"
    out.mkdir()
    epochs = []
    resumed = prune_model(
        CFG,
        "gradual_polynomial",
        0.6,
        baseline[0],
        baseline[1],
        JobContext(
            out, resume, lambda epoch, metrics: epochs.append((epoch, metrics["sparsity"])), "run-1"
        ),
        None,
    )
    assert resumed == {**polynomial_run["facts"], "resumed_from_epoch": 1}
    assert [e for e, _ in epochs] == [2] and epochs[0][1] == pytest.approx(0.6, abs=1e-3)
    before, after = load_model(polynomial_run["out"])[0], load_model(out)[0]
    for a, b in zip(before.get_weights(), after.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gradual_fingerprint_covers_what_decides_the_run(baseline, tmp_path):
    model_dir, data = baseline
    key = gradual_fingerprint(CFG, "gradual_polynomial", 0.6, model_dir, data)
    assert key == gradual_fingerprint(
        copy.deepcopy(CFG), "gradual_polynomial", 0.6, model_dir, data
    )
    other_model = tmp_path / "baseline"
    shutil.copytree(model_dir, other_model)
    model = fresh(baseline)
    prune_one_shot(model, 0.1, "layer", [])
    save_model(model, load_model(model_dir)[1], other_model)
    changed = [
        gradual_fingerprint(CFG, "gradual_constant", 0.6, model_dir, data),
        gradual_fingerprint(CFG, "gradual_polynomial", 0.7, model_dir, data),
        gradual_fingerprint(with_gradual(frequency=3), "gradual_polynomial", 0.6, model_dir, data),
        gradual_fingerprint(with_prune(exclude=[]), "gradual_polynomial", 0.6, model_dir, data),
        gradual_fingerprint({**CFG, "seed": 1}, "gradual_polynomial", 0.6, model_dir, data),
        gradual_fingerprint(CFG, "gradual_polynomial", 0.6, other_model, data),
    ]
    assert len({key, *changed}) == 1 + len(changed)
    # Keys the run does not read (another sweep's sparsities, say) leave it unchanged.
    assert key == gradual_fingerprint(
        with_prune(sparsities=[0.1]), "gradual_polynomial", 0.6, model_dir, data
    )


@pytest.mark.parametrize(
    ("gradual", "select_from"),
    [
        ({}, 2),  # updates 4, 8, 12: step 12 lies in epoch 2 (steps 9..16)
        ({"end_fraction": 0.5}, 1),  # updates 4, 8: the target is in place after epoch 1
        ({"end_fraction": 0.6}, 1),  # round(9.6) = 10, but the last update is step 8
    ],
)
def test_only_epochs_after_the_last_update_compete(
    baseline, tmp_path, monkeypatch, gradual, select_from
):
    seen = {}

    def fake_fit(model, cfg, data, **kwargs):
        seen.update(kwargs, model=model)
        raise Killed

    monkeypatch.setattr("shrinkflow.backends.tensorflow.prune.fit", fake_fit)
    with pytest.raises(Killed):
        prune(baseline, tmp_path, "gradual_constant", 0.5, with_gradual(**gradual))
    assert seen["select_from_epoch"] == select_from
    assert (seen["epochs"], seen["lr"], seen["warmup_epochs"]) == (2, 0.01, 0)
    assert [type(c).__name__ for c in seen["callbacks"]][0] == "UpdatePruningStep"
    wrapped = [layer.name for layer in seen["model"].layers if hasattr(layer, "pruning_vars")]
    assert len(wrapped) == 21 and "prune_low_magnitude_fc" not in wrapped
