"""TensorFlow training and fine-tuning: learning, bit-exact repeatability, kill + resume,
schedule, optimizer, augmentation, tfmot and mixed-precision models, every registered model."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402
from data_fixtures import digits_data, write_data_file  # noqa: E402
from tf_fixtures import TRAIN_CFG as CFG  # noqa: E402
from tf_fixtures import one_thread, with_train  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow import trainer  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import (  # noqa: E402
    KERAS_FILE,
    SPEC_FILE,
    load_model,
    save_model,
)
from shrinkflow.backends.tensorflow.augment import (
    EpochData,  # noqa: E402
    augment_batch,  # noqa: E402
)
from shrinkflow.backends.tensorflow.finetune import (  # noqa: E402
    KeepZeros,
    finetune_fingerprint,
    finetune_model,
    zero_masks,
)
from shrinkflow.backends.tensorflow.models import create_model, list_models  # noqa: E402
from shrinkflow.backends.tensorflow.optim import (  # noqa: E402
    LRSchedule,
    TorchSGD,
    compile_model,  # noqa: E402
)
from shrinkflow.backends.tensorflow.resume_state import (  # noqa: E402
    STATE_FILE,
    resumable_run_id,
    train_fingerprint,
)
from shrinkflow.backends.tensorflow.train import fit, train_model  # noqa: E402
from shrinkflow.backends.tensorflow.trainer import evaluate_split  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.training import (  # noqa: E402
    batch_bounds,
    model_spec,  # noqa: E402
    steps_per_epoch,
)
from shrinkflow.training.fast_path import FastPath  # noqa: E402

# CPU kernels are bit-exact only for a fixed thread count. Set at import, before any test
# initialises TensorFlow; if another module initialised it first, its counts hold, and the
# worker processes are given whatever counts this process has.
one_thread()

WORKER = Path(__file__).with_name("tf_train_worker.py")


def weights(folder: Path) -> list[np.ndarray]:
    return load_model(folder)[0].get_weights()


def assert_same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), i


def no_epochs(epoch: int, metrics: dict) -> None:
    pass


def train_into(tmp_path: Path, cfg: dict, data: PreparedData, run_id=None):
    out = tmp_path / "out"
    out.mkdir()
    result = train_model(
        cfg, "resnet20", data, JobContext(out, tmp_path / "resume", no_epochs, run_id)
    )
    return out, result


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return digits_data()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted run that the other tests compare against."""
    root = tmp_path_factory.mktemp("reference")
    out, resume = root / "out", root / "resume"
    out.mkdir()
    epochs = []
    result = train_model(
        CFG, "resnet20", data, JobContext(out, resume, lambda e, m: epochs.append((e, m)), "run-1")
    )
    return {"out": out, "resume": resume, "result": result, "epochs": epochs}


def test_training_learns_digits_and_keeps_the_best_val_epoch(reference, data):
    result = reference["result"]
    # Measured 0.87 after these 2 epochs; chance is 0.1.
    assert result.best_val_top1 > 0.6
    assert [e for e, _ in reference["epochs"]] == [1, 2]
    assert set(reference["epochs"][0][1]) == {
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "lr",
        "epoch_seconds",
    }
    assert [h["epoch"] for h in result.history] == [1, 2]
    val_top1 = [h["val_top1"] for h in result.history]
    # Ties go to the later epoch.
    assert result.best_epoch == max(e for e, v in enumerate(val_top1, 1) if v == max(val_top1))
    model, spec = load_model(reference["out"])
    assert spec["arch"] == "resnet20" and spec["classes"] == data.classes
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    _, top1 = evaluate_split(model, data, "val", 64)
    assert top1 == pytest.approx(result.best_val_top1)
    assert sorted(p.name for p in reference["resume"].iterdir()) == ["epoch-0002", STATE_FILE]


def test_same_seed_gives_bit_identical_weights(reference, data, tmp_path):
    out, _ = train_into(tmp_path, CFG, data)
    assert_same_weights(weights(out), weights(reference["out"]))


def test_killed_job_resumes_to_the_uninterrupted_weights(reference, data, tmp_path, capsys):
    """A training process killed outright (SIGKILL: no handler, no clean-up) after its epoch-1
    checkpoint was saved: the next run of the job continues from that checkpoint to the weights
    of the uninterrupted run. The kill needs a process of its own; the resumed run is this one
    (with this process's thread counts, which the worker was given too)."""
    data_file, cfg_file = write_data_file(tmp_path / "data.npz", data), tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(CFG))
    out, resume = tmp_path / "out", tmp_path / "resume"
    out.mkdir()
    threads = [
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    ]
    args = list(map(str, [sys.executable, WORKER, data_file, cfg_file, out, resume, "run-7"]))
    args += list(map(str, threads))

    # Paused after training epoch 2, before saving its state: the kill loses that epoch.
    job = subprocess.Popen([*args, "2"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (resume / STATE_FILE).exists():
            assert job.poll() is None, "worker exited before saving a resume state"
            assert time.monotonic() < deadline, "no resume state after 120 s"
            time.sleep(0.05)
        assert json.loads((resume / STATE_FILE).read_text())["epoch"] == 1
        assert job.poll() is None
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL
    assert not (out / KERAS_FILE).exists()
    assert resumable_run_id(resume, train_fingerprint(CFG, "resnet20", data)) == "run-7"

    capsys.readouterr()
    result = train_model(CFG, "resnet20", data, JobContext(out, resume, no_epochs, "run-7"))
    assert "resuming from epoch 2/2" in capsys.readouterr().err
    assert result.resumed_from_epoch == 1
    timeless = [{**h, "epoch_seconds": 0} for h in reference["result"].history]
    assert [{**h, "epoch_seconds": 0} for h in result.history] == timeless
    assert_same_weights(weights(out), weights(reference["out"]))


def test_finished_state_is_reused_without_training(reference, data, tmp_path, capsys):
    shutil.copytree(reference["resume"], tmp_path / "resume")
    calls = []
    out = tmp_path / "out"
    out.mkdir()
    result = train_model(
        CFG, "resnet20", data, JobContext(out, tmp_path / "resume", lambda e, m: calls.append(e))
    )
    assert calls == [] and result.resumed_from_epoch == 2
    assert result.history == reference["result"].history
    assert "all 2 epochs already trained" in capsys.readouterr().err
    assert_same_weights(weights(out), weights(reference["out"]))


def test_changed_params_start_over(reference, data, tmp_path, capsys):
    resume = tmp_path / "resume"
    shutil.copytree(reference["resume"], resume)
    old = train_fingerprint(CFG, "resnet20", data)
    assert resumable_run_id(resume, old) == "run-1"
    # One batch larger than the whole train split; mixed precision is a no-op on CPU.
    cfg = with_train(epochs=1, batch_size=5000, hflip=True, mixed_precision=True)
    new = train_fingerprint(cfg, "resnet20", data)
    assert new != old
    out, result = train_into(tmp_path, cfg, data, run_id="run-2")
    err = capsys.readouterr().err
    assert "starting over" in err and "resuming" not in err
    assert "mixed_precision: ignored on CPU" in err
    assert result.resumed_from_epoch == 0 and len(result.history) == 1
    assert (out / KERAS_FILE).is_file()
    assert resumable_run_id(resume, old) is None
    assert resumable_run_id(resume, new) == "run-2"
    assert sorted(p.name for p in resume.iterdir()) == ["epoch-0001", STATE_FILE]


def test_unreadable_checkpoint_is_ignored_and_training_starts_clean(
    reference, data, tmp_path, capsys
):
    resume = tmp_path / "resume"
    shutil.copytree(reference["resume"], resume)
    (variables,) = (resume / "epoch-0002").glob("ckpt.data-*")
    variables.write_bytes(variables.read_bytes()[: variables.stat().st_size // 2])
    out, result = train_into(tmp_path, CFG, data)
    assert "unreadable resume checkpoint ignored" in capsys.readouterr().err
    assert result.resumed_from_epoch == 0
    # A half-done restore is undone: the run equals one that never saw the checkpoint.
    assert_same_weights(weights(out), weights(reference["out"]))


def test_lr_warms_up_then_follows_the_cosine_to_zero(reference, data):
    lr, steps = CFG["train"]["lr"], steps_per_epoch(CFG, data)
    assert steps == math.ceil(len(data.train) / 32)
    last_steps = [steps - 1, 2 * steps - 1]  # the last iteration of each epoch
    expected = [
        lr * (0.1 + 0.9 * last_steps[0] / steps),
        lr * 0.5 * (1 + math.cos(math.pi * (last_steps[1] - steps) / steps)),
    ]
    assert [m["lr"] for _, m in reference["epochs"]] == pytest.approx(expected, rel=1e-6)


def test_lr_schedule_has_the_torch_shape():
    cosine, constant = LRSchedule(2.0, "cosine", 10, 110), LRSchedule(2.0, "constant", 10, 110)

    def factors(schedule, steps):
        return [float(schedule(tf.constant(s, tf.int64))) / 2.0 for s in steps]

    assert factors(cosine, [0, 5, 10, 60, 110, 200]) == pytest.approx(
        [0.1, 0.55, 1.0, 0.5, 0.0, 0.0], abs=1e-7
    )
    assert factors(constant, [0, 5, 10, 60, 110]) == pytest.approx([0.1, 0.55, 1, 1, 1])
    decaying = factors(cosine, range(10, 111))
    assert decaying == sorted(decaying, reverse=True)
    assert factors(LRSchedule(2.0, "cosine", 0, 10), [0, 5]) == pytest.approx([1.0, 0.5])
    with pytest.raises(ShrinkflowError, match="train.schedule"):
        LRSchedule(1.0, "step", 10, 110)


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_steps_like_torch_sgd_with_coupled_decay_on_kernels(nesterov):
    momentum, decay, lrs = 0.9, 0.1, [0.5, 0.3, 0.1]
    kernel = tf.Variable(np.array([[1.0, -2.0], [0.5, 3.0]], np.float32))
    bias = tf.Variable(np.array([1.0, -1.0], np.float32))
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], lrs)  # steps 0, 1, 2
    sgd = TorchSGD(
        learning_rate=schedule, momentum=momentum, nesterov=nesterov, coupled_weight_decay=decay
    )
    grads = [np.array([[0.1, 0.2], [0.3, -0.4]], np.float32), np.array([0.5, -0.5], np.float32)]
    # torch.optim.SGD: g += wd * w (kernels only); buf = m * buf + g; w -= lr * step.
    expected = [kernel.numpy().astype(np.float64), bias.numpy().astype(np.float64)]
    bufs = [np.zeros_like(w) for w in expected]
    for lr in lrs:
        sgd.apply_gradients(zip([tf.constant(g) for g in grads], [kernel, bias], strict=True))
        for i, (w, g) in enumerate(zip(expected, grads, strict=True)):
            g = g + (decay * w if w.ndim > 1 else 0.0)
            bufs[i] = momentum * bufs[i] + g
            expected[i] = w - lr * (g + momentum * bufs[i] if nesterov else bufs[i])
    assert kernel.numpy() == pytest.approx(expected[0], rel=1e-5)
    assert bias.numpy() == pytest.approx(expected[1], rel=1e-5)


@pytest.mark.parametrize("hflip", [False, True])
def test_augmentation_crops_the_black_padded_image_and_flips(hflip):
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (6, 8, 8, 3)).astype(np.uint8)
    shifts = rng.integers(0, 5, (6, 2))
    flips = np.array([True, False, True, False, True, True])
    out = augment_batch(
        tf.constant(x), tf.constant(shifts), tf.constant(flips) if hflip else None, 2
    )
    for b in range(6):
        padded = np.zeros((12, 12, 3), np.uint8)
        padded[2:10, 2:10] = x[b]
        top, left = shifts[b]
        crop = padded[top : top + 8, left : left + 8]
        assert np.array_equal(out[b].numpy(), crop[:, ::-1] if hflip and flips[b] else crop)
    assert np.array_equal(augment_batch(tf.constant(x), tf.constant(shifts), None, 0).numpy(), x)


def test_a_final_single_sample_batch_joins_the_one_before():
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # BatchNorm cannot train on one 1x1 sample
    assert batch_bounds(1, 4) == [(0, 1)]
    assert batch_bounds(8, 4) == [(0, 4), (4, 8)]
    assert batch_bounds(0, 4) == []


def test_epochs_below_one_is_an_error(data, tmp_path):
    with pytest.raises(ShrinkflowError, match="train.epochs: 0 is not >= 1"):
        train_model(
            with_train(epochs=0), "resnet20", data, JobContext(tmp_path, tmp_path, no_epochs)
        )


def test_empty_train_split_is_an_error(tmp_path):
    with pytest.raises(ShrinkflowError, match="no training images"):
        train_model(
            CFG, "resnet20", digits_data(slice(0, 0)), JobContext(tmp_path, tmp_path, no_epochs)
        )


@pytest.fixture(scope="module")
def pruned(reference, tmp_path_factory):
    """The reference model with the smaller half of every conv/dense kernel set to zero."""
    model, spec = load_model(reference["out"])
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel = layer.kernel.numpy()
            kernel[np.abs(kernel) < np.median(np.abs(kernel))] = 0.0
            layer.kernel.assign(kernel)
    folder = tmp_path_factory.mktemp("pruned")
    save_model(model, spec, folder)
    return folder


def test_zero_masks_mark_the_nonzero_kernel_entries(pruned):
    model, _ = load_model(pruned)
    masks = zero_masks(model)
    conv_dense = [
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]
    assert set(masks) == {layer.name for layer in conv_dense} and "fc" in masks
    for layer in conv_dense:
        assert np.array_equal(masks[layer.name], layer.kernel.numpy() != 0)
        assert 0.4 < masks[layer.name].mean() < 0.6


def test_finetune_keeps_zeros_at_zero_and_trains_the_rest(pruned, data, tmp_path):
    out, resume = tmp_path / "out", tmp_path / "resume"
    out.mkdir()
    epochs = []
    result = finetune_model(
        CFG, pruned, data, JobContext(out, resume, lambda e, m: epochs.append(e), "run-f")
    )
    assert result.epochs == 1 and epochs == [1] and result.best_val_top1 > 0.6
    before, after = load_model(pruned)[0], load_model(out)[0]
    masks = zero_masks(before)
    for layer in after.layers:
        if layer.name in masks:
            kernel, old = layer.kernel.numpy(), before.get_layer(layer.name).kernel.numpy()
            keep = masks[layer.name].astype(bool)
            assert np.all(kernel[~keep] == 0), layer.name
            assert np.all(kernel[keep] != old[keep]), layer.name
    assert resumable_run_id(resume, finetune_fingerprint(CFG, pruned, data)) == "run-f"


def test_finetune_zero_epochs_copies_the_model(pruned, data, tmp_path):
    cfg = {**CFG, "finetune": {"epochs": 0, "lr": 0.01}}
    result = finetune_model(cfg, pruned, data, JobContext(tmp_path, tmp_path / "resume", no_epochs))
    for name in (KERAS_FILE, SPEC_FILE):
        assert (tmp_path / name).read_bytes() == (pruned / name).read_bytes()
    _, top1 = evaluate_split(load_model(pruned)[0], data, "val", 32)
    assert result.epochs == 0 and result.history == [] and result.best_val_top1 == top1
    assert not (tmp_path / "resume").exists()


def test_finetune_fingerprint_covers_the_model_file(pruned, data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pruned, copy)
    first = finetune_fingerprint(CFG, copy, data)
    assert first == finetune_fingerprint(CFG, pruned, data)
    model, spec = load_model(copy)
    model.get_layer("fc").bias.assign(model.get_layer("fc").bias + 1.0)
    save_model(model, spec, copy)
    assert finetune_fingerprint(CFG, copy, data) != first
    longer = {**CFG, "finetune": {"epochs": 2, "lr": 0.01}}
    assert finetune_fingerprint(longer, pruned, data) != first


def test_keep_zeros_names_a_layer_the_model_lacks():
    model = create_model("resnet20", 10, 1, 8)
    callback = KeepZeros({"no_such_conv": np.zeros((3, 3, 1, 16), np.float32)})
    callback.set_model(model)
    with pytest.raises(ValueError, match="no_such_conv"):
        callback.on_train_begin()


def test_tfmot_wrapped_model_resumes_its_masks_and_steps(tmp_path):
    """A pruning-wrapped model killed after epoch 1 continues to the uninterrupted weights: the
    checkpoint holds tfmot's masks, thresholds and step counters. In-process: the resume folder
    is copied while epoch 2 reports, which is what a kill at that moment leaves behind."""
    small = digits_data(slice(540, 860))
    killed = tmp_path / "killed"

    def wrapped() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = create_model("resnet20", 10, 1, 8, small.mean, small.std)
        schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=3)

        def wrap(layer):
            if isinstance(layer, keras.layers.Conv2D):
                return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
            return layer

        return keras.models.clone_model(model, clone_function=wrap)

    def snapshot(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            shutil.copytree(tmp_path / "resume", killed)

    def run(resume_dir: Path, on_epoch) -> tuple[list[np.ndarray], int]:
        model = wrapped()
        result = fit(
            model,
            CFG,
            small,
            epochs=2,
            lr=0.05,
            warmup_epochs=1,
            out_dir=tmp_path,
            resume_dir=resume_dir,
            fingerprint="wrapped",
            on_epoch=on_epoch,
            run_id=None,
            spec=model_spec("resnet20", small),
            callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
            save=lambda m, folder: None,
        )
        return model.get_weights(), result.resumed_from_epoch

    uninterrupted, _ = run(tmp_path / "resume", snapshot)
    resumed, resumed_from = run(killed, no_epochs)
    assert resumed_from == 1
    assert_same_weights(resumed, uninterrupted)
    masks = [w for w in uninterrupted if w.ndim == 4 and set(np.unique(w)) <= {0.0, 1.0}]
    assert masks and all(m.mean() == pytest.approx(0.5, abs=0.05) for m in masks)


def test_mixed_precision_trains_a_float16_twin_and_saves_float32(data, tmp_path, monkeypatch):
    # float16 runs (slowly) on CPU too, which exercises the GPU path where no GPU exists.
    monkeypatch.setattr(trainer, "fast_path", lambda t: FastPath("float16", compile=False))
    small = digits_data(slice(540, 800))
    keras.utils.set_random_seed(0)
    model = create_model("resnet20", 10, 1, 8, small.mean, small.std)
    initial = model.get_weights()
    seen = []

    class Policies(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append({layer.name: layer.dtype_policy.name for layer in self.model.layers})
            seen.append(type(self.model.optimizer).__name__)

    result = fit(
        model,
        with_train(label_smoothing=0.0),
        small,
        epochs=1,
        lr=0.05,
        warmup_epochs=0,
        out_dir=tmp_path,
        resume_dir=tmp_path / "resume",
        fingerprint="amp",
        on_epoch=no_epochs,
        run_id=None,
        spec=model_spec("resnet20", small),
        callbacks=[Policies()],
    )
    policies, optimizer = seen[0], seen[1]
    assert policies["fc"] == "float32" and policies["layer1_0_conv1"] == "mixed_float16"
    assert optimizer == "LossScaleOptimizerV3"
    assert math.isfinite(result.history[0]["train_loss"])
    saved = load_model(tmp_path)[0]
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    assert_same_weights(saved.get_weights(), model.get_weights())
    assert not np.array_equal(model.get_weights()[0], initial[0])


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains_a_step_at_8x8(name):
    """Builds each registry model at the smallest size and takes one optimizer step on a batch
    of two with the training recipe (compile, optimizer, augmented input pipeline)."""
    tiny = digits_data(slice(540, 542))
    keras.utils.set_random_seed(0)
    model = create_model(name, 10, 1, 8, tiny.mean, tiny.std)
    before = [w.numpy().copy() for w in model.trainable_weights]
    schedule = LRSchedule(0.05, "cosine", 0, 1)
    compile_model(model, CFG["train"], schedule, amp=False)
    model.run_eagerly = True  # one step: tracing the deep models would cost more than it
    batches = EpochData(tiny, 2, augment=True, hflip=True, seed=0).batches(1)
    loss = model.fit(batches, verbose=0).history["loss"]
    assert len(loss) == 1 and math.isfinite(loss[0])
    assert int(model.optimizer.iterations) == 1
    after = [w.numpy() for w in model.trainable_weights]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="needs a GPU")
def test_gpu_mixed_precision_trains(data, tmp_path):
    out, result = train_into(tmp_path, with_train(mixed_precision=True), data)
    assert result.best_val_top1 > 0.5
    assert {layer.dtype_policy.name for layer in load_model(out)[0].layers} == {"float32"}
