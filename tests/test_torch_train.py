"""PyTorch training: learning, bit-exact repeatability, kill + resume, schedule, model files."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import digits_data, write_data_file
from torch_fixtures import THREADS, fixed_threads, with_train  # noqa: F401 (an autouse fixture)
from torch_fixtures import TRAIN_CFG as CFG

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_model
from shrinkflow.backends.torch.augment import Augment
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.optim import lr_factor, param_groups
from shrinkflow.backends.torch.resume_state import STATE_FILE, resumable_run_id, train_fingerprint
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import train_model
from shrinkflow.errors import ShrinkflowError

WORKER = Path(__file__).with_name("train_worker.py")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def weights(folder: Path) -> dict:
    return torch.load(folder / MODEL_FILE, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that the other tests compare against."""
    root = tmp_path_factory.mktemp("reference")
    out, resume = root / "out", root / "resume"
    out.mkdir()
    data = digits_data()
    epochs = []
    result = train_model(
        CFG,
        "resnet20",
        data,
        JobContext(out, resume, lambda e, m: epochs.append((e, m)), "run-1"),
        "cpu",
    )
    return {"data": data, "out": out, "resume": resume, "result": result, "epochs": epochs}


def test_training_learns_digits_and_keeps_the_best_val_epoch(reference):
    result, data = reference["result"], reference["data"]
    # Measured 0.92 after these 3 epochs; chance is 0.1.
    assert result.best_val_top1 > 0.8
    assert [e for e, _ in reference["epochs"]] == [1, 2, 3]
    assert set(reference["epochs"][0][1]) == {
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "lr",
        "epoch_seconds",
    }
    val_top1 = [h["val_top1"] for h in result.history]
    # Ties go to the later epoch.
    assert result.best_epoch == max(e for e, v in enumerate(val_top1, 1) if v == max(val_top1))
    model, spec = load_model(reference["out"])
    assert spec["arch"] == "resnet20" and spec["classes"] == data.classes
    x, y = to_device_tensors(data, "val", "cpu")
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 32]).argmax(1) for i in range(0, len(y), 32)])
    assert (predicted == y).float().mean().item() == pytest.approx(result.best_val_top1)


def test_same_seed_gives_bit_identical_weights(reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    train_model(
        CFG,
        "resnet20",
        reference["data"],
        JobContext(out, tmp_path / "r"),
        device="cpu",
    )
    assert_same_weights(weights(out), weights(reference["out"]))


def test_killed_job_resumes_to_the_uninterrupted_weights(reference, tmp_path, capsys):
    """A training process killed outright (SIGKILL: no handler, no clean-up) after its epoch-1
    state was saved: the next run of the job continues from that state to the weights of the
    uninterrupted run. The kill needs a process of its own; the resumed run is this one."""
    data = reference["data"]
    data_file, cfg_file = write_data_file(tmp_path / "data.npz", data), tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(CFG))
    out, resume = tmp_path / "out", tmp_path / "resume"
    out.mkdir()
    args = [sys.executable, str(WORKER), data_file, cfg_file, out, resume, "run-7", str(THREADS)]

    # Paused after training epoch 2, before saving its state: the kill loses that epoch.
    job = subprocess.Popen([*map(str, args), "2"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (resume / STATE_FILE).exists():
            assert job.poll() is None, "worker exited before saving a resume state"
            assert time.monotonic() < deadline, "no resume state after 120 s"
            time.sleep(0.05)
        assert torch.load(resume / STATE_FILE, weights_only=True)["epoch"] == 1
        assert job.poll() is None
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL
    assert not (out / MODEL_FILE).exists()
    fingerprint = train_fingerprint(CFG, "resnet20", data)
    assert resumable_run_id(resume, fingerprint) == "run-7"

    capsys.readouterr()
    result = train_model(CFG, "resnet20", data, JobContext(out, resume, run_id="run-7"), "cpu")
    assert "resuming from epoch 2/3" in capsys.readouterr().err
    assert result.resumed_from_epoch == 1
    resumed = [{**h, "epoch_seconds": 0} for h in result.history]
    assert resumed == [{**h, "epoch_seconds": 0} for h in reference["result"].history]
    assert_same_weights(weights(out), weights(reference["out"]))


def test_finished_state_is_reused_without_training(reference, tmp_path, capsys):
    resume, out = tmp_path / "resume", tmp_path / "out"
    shutil.copytree(reference["resume"], resume)
    out.mkdir()
    calls = []
    result = train_model(
        CFG,
        "resnet20",
        reference["data"],
        JobContext(out, resume, lambda e, m: calls.append(e)),
        device="cpu",
    )
    assert calls == [] and result.resumed_from_epoch == 3
    assert result.history == reference["result"].history
    assert "all 3 epochs already trained" in capsys.readouterr().err
    assert_same_weights(weights(out), weights(reference["out"]))


def test_changed_params_start_over(reference, tmp_path, capsys):
    resume, out = tmp_path / "resume", tmp_path / "out"
    shutil.copytree(reference["resume"], resume)
    out.mkdir()
    old = train_fingerprint(CFG, "resnet20", reference["data"])
    assert resumable_run_id(resume, old) == "run-1"
    # One batch larger than the whole train split; mixed precision is a no-op on CPU.
    cfg = with_train(epochs=1, batch_size=5000, hflip=True, mixed_precision=True)
    new = train_fingerprint(cfg, "resnet20", reference["data"])
    assert new != old
    result = train_model(
        cfg,
        "resnet20",
        reference["data"],
        JobContext(out, resume, run_id="run-2"),
        device="cpu",
    )
    err = capsys.readouterr().err
    assert "starting over" in err and "resuming" not in err
    assert "mixed_precision: ignored on CPU" in err
    assert result.resumed_from_epoch == 0 and len(result.history) == 1
    assert (out / MODEL_FILE).is_file()
    assert resumable_run_id(resume, old) is None
    assert resumable_run_id(resume, new) == "run-2"


def test_lr_warms_up_then_follows_the_cosine_to_zero(reference):
    lr, steps = CFG["train"]["lr"], math.ceil(len(reference["data"].train) / 32)
    last_steps = [steps - 1, 2 * steps - 1, 3 * steps - 1]  # the last iteration of each epoch
    expected = [lr * (0.1 + 0.9 * last_steps[0] / steps)] + [
        lr * 0.5 * (1 + math.cos(math.pi * (s - steps) / (2 * steps))) for s in last_steps[1:]
    ]
    assert [m["lr"] for _, m in reference["epochs"]] == pytest.approx(expected)
    assert expected[-1] < 1e-3 * lr


def test_lr_factor_shapes():
    cosine, constant = lr_factor("cosine", 10, 110), lr_factor("constant", 10, 110)
    assert cosine(0) == constant(0) == pytest.approx(0.1)
    assert cosine(5) == constant(5) == pytest.approx(0.55)
    assert cosine(10) == constant(10) == 1.0
    assert cosine(60) == pytest.approx(0.5) and constant(60) == 1.0
    assert cosine(110) == pytest.approx(0.0, abs=1e-12) and constant(110) == 1.0
    factors = [cosine(s) for s in range(10, 111)]
    assert factors == sorted(factors, reverse=True)
    with pytest.raises(ShrinkflowError, match="train.schedule"):
        lr_factor("step", 10, 110)


def test_weight_decay_only_on_conv_and_linear_weights():
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    assert decayed == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, layers)}
    assert {"bn1.weight", "bn1.bias", "fc.bias"} <= {names[id(p)] for p in no_decay["params"]}


@pytest.mark.parametrize("hflip", [False, True])
def test_augmentation_crops_the_black_padded_image_and_flips(hflip):
    x = torch.randn(6, 3, 8, 8)
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    shifts = torch.randint(0, 5, (6, 2), generator=generator)
    flips = torch.tensor([True, False, True, False, True, True])
    out = Augment(enabled=True, hflip=hflip, pad=2, fill=fill)(x, shifts, flips)
    for b in range(6):
        padded = fill[0].expand(3, 12, 12).clone()
        padded[:, 2:10, 2:10] = x[b]
        top, left = shifts[b].tolist()
        crop = padded[:, top : top + 8, left : left + 8]
        assert torch.equal(out[b], crop.flip(2) if hflip and flips[b] else crop)
    assert Augment(enabled=False, hflip=True, pad=2, fill=fill)(x, shifts, flips) is x


def test_device_tensors_are_normalized_nchw():
    data = digits_data()
    x, y = to_device_tensors(data, "train", "cpu")
    assert x.shape == (len(data.train), 1, 8, 8) and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(data.labels[data.train]))
    with pytest.raises(ShrinkflowError, match="'holdout'"):
        to_device_tensors(data, "holdout", "cpu")


def test_empty_train_split_is_an_error(tmp_path):
    with pytest.raises(ShrinkflowError, match="no training images"):
        train_model(
            CFG,
            "resnet20",
            digits_data(train=slice(0, 0)),
            JobContext(tmp_path, tmp_path / "r"),
            device="cpu",
        )


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    model(torch.randn(4, 1, 8, 8))  # training-mode pass: BN running statistics move off init
    spec = {
        "arch": "resnet20",
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 8,
        "mean": [0.3],
        "std": [0.4],
        "classes": [str(c) for c in range(10)],
    }
    path = save_model(model, spec, tmp_path)
    loaded, loaded_spec = load_model(tmp_path)
    assert path == tmp_path / MODEL_FILE and loaded_spec == spec and not loaded.training
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize(
    "content",
    [b"not a zip file", None],
    ids=["corrupt", "foreign-format"],
)
def test_unreadable_model_file_is_named(tmp_path, content):
    path = tmp_path / MODEL_FILE
    if content is None:
        torch.save({"weights": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ShrinkflowError, match=str(path)):
        load_model(tmp_path)


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(ShrinkflowError, match="model.pt: model file not found"):
        load_model(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_trains(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = with_train(epochs=2, mixed_precision=True)
    result = train_model(
        cfg,
        "resnet20",
        digits_data(),
        JobContext(out, tmp_path / "r"),
        device="cuda",
    )
    assert result.best_val_top1 > 0.5
    model, _ = load_model(out, "cuda")
    assert next(model.parameters()).is_cuda


def test_a_final_single_sample_batch_joins_the_one_before():
    from shrinkflow.training import batch_bounds

    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # BatchNorm cannot train on one 1x1 sample
    assert batch_bounds(1, 4) == [(0, 1)]
    assert batch_bounds(8, 4) == [(0, 4), (4, 8)]
    assert batch_bounds(0, 4) == []
