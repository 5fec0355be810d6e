"""A training loss that becomes NaN or infinite stops the job in one line (issue 14).

Every loop that trains (baseline, fine-tuning, gradual pruning, QAT: ``train.fit``; structured
pruning's rounds: ``train.fit_in_memory``; TensorFlow's ``train.fit``) checks each step's loss,
the validation loss and the kept weights; the error names the epoch, the step and what to try.
The job's MLflow run then ends FAILED, and nothing is written under the output's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import digits_data
from torch_fixtures import with_train

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.train import fit, fit_in_memory, train_model
from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import diverged

# 160 training images in batches of 32: 5 steps per epoch, a fraction of a second each.
SMALL = slice(540, 700)
STEPS = 5


def poison_after(model: torch.nn.Module, step: int):
    """A step hook that sets one weight to NaN after optimizer step ``step`` (1-based, global):
    the loss of the next step is then NaN."""

    def hook(current: int) -> None:
        if current == step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan

    return hook


def small_fit(tmp_path: Path, model: torch.nn.Module, data=None, **kwargs):
    seen: list[int] = []
    out = tmp_path / "out"
    out.mkdir()
    cfg = with_train(epochs=3, augment=False)
    defaults = dict(
        epochs=3,
        lr=0.05,
        warmup_epochs=0,
        out_dir=out,
        resume_dir=tmp_path / "resume",
        fingerprint="test",
        on_epoch=lambda epoch, metrics: seen.append(epoch),
        run_id=None,
        spec={},
    )
    fit(model, cfg, data or digits_data(SMALL), **{**defaults, **kwargs})
    return seen


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 10, in_channels=1, image_size=8)


def test_a_nan_loss_names_its_epoch_step_and_key_and_writes_nothing(tmp_path):
    model = tiny_model()
    seen: list[int] = []
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShrinkflowError) as info:
        fit(
            model,
            with_train(epochs=3, augment=False),
            digits_data(SMALL),
            epochs=3,
            lr=0.02,
            warmup_epochs=0,
            out_dir=out,
            resume_dir=tmp_path / "resume",
            fingerprint="test",
            on_epoch=lambda epoch, metrics: seen.append(epoch),
            run_id=None,
            spec={},
            step_hook=poison_after(model, STEPS + 2),  # the loss of epoch 2, step 3 is NaN
            lr_key="prune.gradual.lr",
        )
    assert str(info.value) == (
        "prune: loss became nan at epoch 2 step 3 of 5; lower prune.gradual.lr (now 0.02) "
        "or check the data"
    )
    assert seen == [1]  # the diverged epoch is neither logged nor kept
    assert list(out.iterdir()) == []


def test_a_huge_learning_rate_stops_baseline_training_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = with_train(epochs=2, lr=1e6, augment=False, warmup_epochs=0)
    with pytest.raises(ShrinkflowError) as info:
        train_model(cfg, "resnet20", digits_data(SMALL), JobContext(out, tmp_path / "r"))
    message = str(info.value)
    assert message.startswith("train: loss became "), message
    assert "lower train.lr (now 1e+06), raise train.warmup_epochs or check the data" in message
    assert "\n" not in message and list(out.iterdir()) == []


def test_structured_rounds_stop_on_a_nan_loss(tmp_path):
    """fit_in_memory: the fine-tuning between rounds of structured pruning."""
    model = tiny_model()
    with pytest.raises(
        ShrinkflowError, match=r"^finetune: loss became nan at epoch 1 step 2 of 5; "
    ):
        fit_in_memory(
            model,
            with_train(augment=False),
            digits_data(SMALL),
            epochs=2,
            lr=0.01,
            step_hook=poison_after(model, 1),
            lr_key="finetune.lr",
        )


def test_weights_broken_by_the_last_step_are_caught_by_the_validation_loss(tmp_path):
    """No later step's loss shows the last step's update: the validation loss does."""
    model = tiny_model()
    with pytest.raises(ShrinkflowError) as info:
        small_fit(tmp_path, model, epochs=1, step_hook=poison_after(model, STEPS))
    assert str(info.value).startswith("train: validation loss became nan at epoch 1; lower")


def test_without_a_validation_split_broken_weights_are_caught_before_saving(tmp_path):
    data = dataclasses.replace(digits_data(SMALL), val=np.array([], dtype=np.int64))
    model = tiny_model()
    with pytest.raises(ShrinkflowError, match=r"^train: a weight became nan at epoch 1; lower"):
        small_fit(tmp_path, model, data, epochs=1, step_hook=poison_after(model, STEPS))
    assert list((tmp_path / "out").iterdir()) == []


def test_the_message_suggests_mixed_precision_only_when_it_is_on():
    on = diverged(math.inf, epoch=3, step=17, steps=20, lr_key="train.lr", lr=10.0,
                  mixed_precision=True)  # fmt: skip
    assert str(on) == (
        "train: loss became inf at epoch 3 step 17 of 20; lower train.lr (now 10), raise "
        "train.warmup_epochs, set train.mixed_precision: false (float16 overflows) or check "
        "the data"
    )


def test_tensorflow_fit_stops_at_the_step_whose_loss_became_nan(tmp_path):
    import tf_keras as keras
    from tf_fixtures import with_train as tf_with_train

    from shrinkflow.backends.tensorflow.device import distribution_strategy
    from shrinkflow.backends.tensorflow.models import create_model as tf_create_model
    from shrinkflow.backends.tensorflow.train import fit as tf_fit

    data = digits_data(SMALL)

    class Poison(keras.callbacks.Callback):
        """NaN into the output layer's kernel after the 7th batch: the 8th (epoch 2 step 3) has
        NaN logits, hence a NaN loss. (A NaN in one tap of a conv kernel need not show: on CPU,
        TensorFlow's graph-mode convolutions can skip it, and only the final weight check sees
        it.)"""

        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if self.batches == STEPS + 2:
                kernel = [w for w in self.model.trainable_weights if len(w.shape) > 1][-1]
                kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    with distribution_strategy().scope():
        model = tf_create_model("resnet20", 10, 1, 8, data.mean, data.std)
    out = tmp_path / "out"
    out.mkdir()
    seen: list[int] = []
    with pytest.raises(ShrinkflowError) as info:
        tf_fit(
            model,
            tf_with_train(epochs=3, augment=False),
            data,
            epochs=3,
            lr=0.02,
            warmup_epochs=0,
            out_dir=out,
            resume_dir=tmp_path / "resume",
            fingerprint="test",
            on_epoch=lambda epoch, metrics: seen.append(epoch),
            run_id=None,
            spec={},
            callbacks=[Poison()],
            lr_key="finetune.lr",
        )
    assert str(info.value) == (
        "finetune: loss became nan at epoch 2 step 3 of 5; lower finetune.lr (now 0.02) "
        "or check the data"
    )
    assert seen == [1] and list(out.iterdir()) == []
    state = json.loads((tmp_path / "resume" / "state.json").read_text())
    assert state["epoch"] == 1  # the resume state holds the last good epoch


def test_a_diverged_job_ends_its_mlflow_run_failed_and_writes_nothing(tmp_path, monkeypatch):
    """Through the train stage: the run is FAILED (not FINISHED), no model and no train.json."""
    from mlflow import MlflowClient

    from shrinkflow.config import load_params
    from shrinkflow.data.prepared import write_prepared
    from shrinkflow.stages import train as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = digits_data(SMALL)
    splits = {"train": data.train, "val": data.val, "test": data.test}
    params = {"dataset": "digits", "image_size": 8, "seed": 0, "val_fraction": 0.1}
    write_prepared(
        tmp_path / "prepared",
        images=data.images,
        labels=data.labels,
        splits=splits,
        classes=data.classes,
        params={**params, "test_fraction": 0.2},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["train.lr=1e6", "train.epochs=2", "train.warmup_epochs=0", f"tracking.uri={uri}"]
    cfg = load_params([Path(__file__).resolve().parents[1] / "params.yaml"], overrides)
    out = tmp_path / "baseline"
    with pytest.raises(
        ShrinkflowError,
        match=r"^train: (validation )?loss became \S+ at epoch \d.*lower train\.lr \(now 1e\+06\)",
    ):
        stage.run(cfg, "torch", "resnet20", 0, tmp_path / "prepared", out)
    assert not out.exists()
    assert not list(tmp_path.glob(".tmp-baseline-*"))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shrinkflow-jobs").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_write_json_refuses_nan_and_infinity_naming_the_key(tmp_path):
    from shrinkflow.outputs import write_json

    path = tmp_path / "m.json"
    with pytest.raises(ValueError, match=r"m\.json: history\[1\]\.val_loss is nan, which JSON"):
        write_json(path, {"history": [{"val_loss": 1.0}, {"val_loss": math.nan}]})
    with pytest.raises(ValueError, match=r"top1 is inf"):
        write_json(path, {"top1": math.inf}, nan_means="undefined")
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_write_json_writes_a_declared_nan_as_null_and_says_why(tmp_path):
    from shrinkflow.outputs import NULL_MEANS, write_json
    from shrinkflow.training import NO_VALIDATION_IMAGES

    path = tmp_path / "train.json"
    write_json(path, {"best_val_top1": math.nan, "epochs": 2}, nan_means=NO_VALIDATION_IMAGES)
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {
        "best_val_top1": None,
        "epochs": 2,
        NULL_MEANS: NO_VALIDATION_IMAGES,
    }
    write_json(path, {"best_val_top1": 0.5}, nan_means=NO_VALIDATION_IMAGES)
    assert json.loads(path.read_text()) == {"best_val_top1": 0.5}  # no null, no explanation


def test_tensorflow_resume_state_without_a_validation_split_is_valid_json(tmp_path):
    """The TensorFlow resume state (state.json) holds the epochs' val scores: null, not NaN."""
    from tf_fixtures import with_train as tf_with_train

    from shrinkflow.backends.tensorflow.train import train_model as tf_train_model

    data = dataclasses.replace(digits_data(SMALL), val=np.array([], dtype=np.int64))
    out = tmp_path / "out"
    out.mkdir()
    cfg = tf_with_train(epochs=1, augment=False)
    result = tf_train_model(cfg, "resnet20", data, JobContext(out, tmp_path / "resume"))
    assert math.isnan(result.best_val_top1)
    state = json.loads((tmp_path / "resume" / "state.json").read_text(), parse_constant=_refuse)
    assert state["best_val_top1"] is None and state["history"][0]["val_top1"] is None


def _refuse(name: str) -> None:
    raise AssertionError(f"bare {name} in JSON")
