"""Knowledge distillation in fine-tuning (and QAT's fingerprint), on both backends: the loss, the
teacher check, the params the run logs, and a distilled run that resumes.

The models are untrained resnet20s on the 8x8 digits (160 training images): distillation's
plumbing needs a teacher whose logits differ from the student's, not a good one.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch  # before tensorflow (see DESIGN.md)
from data_fixtures import digits_data
from torch_fixtures import fixed_threads  # noqa: F401 (one thread for every test here)

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch import finetune as torch_finetune
from shrinkflow.backends.torch.artifact import load_model, save_model
from shrinkflow.backends.torch.distill import distill_loss
from shrinkflow.backends.torch.models import create_model
from shrinkflow.config import BASE_PARAMS, merge, read_yaml
from shrinkflow.data.prepared import load_prepared, write_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import write_json
from shrinkflow.stages import NODE_FILE
from shrinkflow.stages import finetune as finetune_stage
from shrinkflow.training import model_spec

DISTILL = {"alpha": 0.7, "temperature": 4.0}


def _cfg(tmp: Path, **finetune) -> dict:
    """params.yaml for the 8x8 digits, one short fine-tuning epoch, MLflow in ``tmp``."""
    return merge(
        read_yaml(BASE_PARAMS),
        {
            "data": {"image_size": 8},
            "train": {"batch_size": 64, "augment": True},
            "finetune": {"epochs": 1, "lr": 0.01, "distill": DISTILL, **finetune},
            "tracking": {"experiment": "distill", "uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        },
    )


def _node(folder: Path, backend: str, stage: str, model: str = "resnet20", **point) -> Path:
    write_json(folder / NODE_FILE, {"backend": backend, "model": model, "stage": stage,
                                    "seed": 0, **point})  # fmt: skip
    return folder


PRUNED_POINT = {"prune_method": "l1_unstructured", "target_sparsity": 0.5}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared 8x8 digits (160 training images) and a torch baseline (the teacher) with the
    student pruned from it (its smaller half of conv/linear weights zeroed), as node folders."""
    root = tmp_path_factory.mktemp("distill")
    data = digits_data(slice(540, 700))
    splits = {"train": data.train, "val": data.val, "test": data.test}
    params = {"dataset": "digits", "image_size": 8, "seed": 0, "val_fraction": 0.1,
              "test_fraction": 0.2}  # fmt: skip
    write_prepared(root / "prepared", images=data.images, labels=data.labels, splits=splits,
                   classes=data.classes, params=params)  # fmt: skip
    data = load_prepared(root / "prepared")
    torch.manual_seed(0)
    spec = model_spec("resnet20", data)
    model = create_model("resnet20", data.num_classes, data.channels, data.image_size)
    baseline = root / "torch/baseline"
    baseline.mkdir(parents=True)
    save_model(model, spec, baseline)
    _node(baseline, "torch", "baseline")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(p.abs() > p.abs().median())
    pruned = root / "torch/pruned"
    pruned.mkdir()
    save_model(model, spec, pruned)
    _node(pruned, "torch", "pruned", **PRUNED_POINT)
    return root


# --- the loss ------------------------------------------------------------------------------


def _hand_loss(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, a: float, t: float):
    """The Hinton et al. loss written out with numpy, per image then averaged."""

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ce = -log_softmax(student)[np.arange(len(labels)), labels]
    p_t, log_p_t, log_p_s = np.exp(log_softmax(teacher / t)), log_softmax(teacher / t), \
        log_softmax(student / t)  # fmt: skip
    kl = (p_t * (log_p_t - log_p_s)).sum(1)
    return float(((1 - a) * ce + a * t * t * kl).mean()), float(ce.mean())


LOGITS = np.random.default_rng(0).normal(0, 3, (2, 5, 4))  # (student, teacher) x 5 images x 4
LABELS = np.array([0, 3, 1, 2, 3])


def test_torch_loss_is_cross_entropy_at_alpha_0_and_matches_a_hand_computation():
    student, teacher = (torch.tensor(x, dtype=torch.float32) for x in LOGITS)
    ce = torch.nn.functional.cross_entropy(student, torch.tensor(LABELS))
    expected, hand_ce = _hand_loss(*LOGITS, LABELS, 0.7, 4.0)
    assert float(distill_loss(student, teacher, ce, 0.0, 4.0)) == pytest.approx(hand_ce, rel=1e-6)
    assert float(distill_loss(student, teacher, ce, 0.7, 4.0)) == pytest.approx(expected, rel=1e-5)
    assert not math.isclose(expected, hand_ce, rel_tol=1e-3)  # the soft term does count


def test_tensorflow_loss_matches_the_hand_computation_with_the_labels_beside_the_logits():
    import tensorflow as tf

    from shrinkflow.backends.tensorflow.distill import DistillLoss

    one_hot = np.eye(4)[LABELS]
    y_true = tf.constant(np.concatenate([one_hot, LOGITS[1]], axis=1), tf.float32)
    y_pred = tf.constant(LOGITS[0], tf.float32)
    expected, hand_ce = _hand_loss(*LOGITS, LABELS, 0.7, 4.0)
    assert float(DistillLoss(4, 0.0, 4.0, 0.0)(y_true, y_pred)) == pytest.approx(hand_ce, rel=1e-5)
    assert float(DistillLoss(4, 0.7, 4.0, 0.0)(y_true, y_pred)) == pytest.approx(expected, rel=1e-5)


# --- torch fine-tuning -----------------------------------------------------------------------


def _run_stage(project: Path, cfg: dict, out: Path, teacher: Path | None) -> dict:
    finetune_stage.run(cfg, project / "torch/pruned", project / "prepared", out, teacher)
    return read_yaml(out / "train.json")


def test_torch_finetune_distils_holds_zeros_and_logs_alpha_and_temperature(project, tmp_path):
    import mlflow

    cfg = _cfg(tmp_path)
    out = tmp_path / "distilled/model"
    _run_stage(project, cfg, out, project / "torch/baseline")
    distilled, _ = load_model(out)
    pruned, _ = load_model(project / "torch/pruned")
    weights = {n: p for n, p in distilled.named_parameters() if p.ndim > 1}
    zeros = {n: p == 0 for n, p in pruned.named_parameters() if p.ndim > 1}
    assert all(bool((weights[n][z] == 0).all()) for n, z in zeros.items())
    client = mlflow.MlflowClient(cfg["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("distill-jobs").experiment_id])
    assert run.data.params["finetune.distill.alpha"] == "0.7"
    assert run.data.params["finetune.distill.temperature"] == "4.0"


@pytest.mark.parametrize(
    ("teacher", "why"),
    [
        ("pruned", "the pruned of torch resnet20 seed 0"),
        ("other_model", "the baseline of torch resnet32 seed 0"),
        ("other_backend", "the baseline of tensorflow resnet20 seed 0"),
    ],
)
def test_a_teacher_other_than_the_students_baseline_is_a_one_line_error(
    project, tmp_path, teacher, why
):
    folder = project / "torch/pruned"
    if teacher == "other_model":
        folder = shutil.copytree(project / "torch/baseline", tmp_path / "other")
        _node(folder, "torch", "baseline", model="resnet32")
    elif teacher == "other_backend":
        folder = tmp_path / "keras"
        folder.mkdir()
        _tf_baseline(folder, load_prepared(project / "prepared"))
    with pytest.raises(ShrinkflowError) as raised:
        _run_stage(project, _cfg(tmp_path), tmp_path / "out/model", folder)
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        f"--teacher {folder}: {why}; the teacher must be the baseline of torch resnet20 seed 0"
    )
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened


def test_distillation_without_a_teacher_is_a_one_line_error(project, tmp_path):
    with pytest.raises(ShrinkflowError, match=r"^finetune.distill is set: --teacher .* required$"):
        _run_stage(project, _cfg(tmp_path), tmp_path / "out/model", None)


def test_a_killed_distilled_finetune_resumes_and_ends_as_an_uninterrupted_one(project, tmp_path):
    """Two epochs, killed after the first and run again, end with the weights of two epochs in
    one go, which differ from an undistilled run's; the fingerprint changes with the teacher's
    file and with finetune.distill."""
    cfg = _cfg(tmp_path, epochs=2)
    data = load_prepared(project / "prepared")
    pruned, teacher = project / "torch/pruned", project / "torch/baseline"

    def run(name: str, on_epoch=None, cfg: dict = cfg) -> object:
        out, resume = tmp_path / name, tmp_path / f"{name}-resume"
        out.mkdir()
        resume.mkdir(exist_ok=True)
        context = JobContext(out, resume, on_epoch or (lambda epoch, metrics: None))
        return torch_finetune.finetune_model(cfg, pruned, data, context, teacher)

    def killed_in_second_epoch(epoch, metrics):  # after epoch 1's resume state is saved
        if epoch == 2:
            raise KeyboardInterrupt

    whole = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("resumed", killed_in_second_epoch)
    shutil.rmtree(tmp_path / "resumed")
    resumed = run("resumed")
    assert (whole.resumed_from_epoch, resumed.resumed_from_epoch) == (0, 1)
    a, _ = load_model(tmp_path / "whole")
    b, _ = load_model(tmp_path / "resumed")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))  # fmt: skip
    run("plain", cfg=_cfg(tmp_path, epochs=2, distill=None))
    plain, _ = load_model(tmp_path / "plain")
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), plain.parameters(),
                                                     strict=True))  # fmt: skip

    fingerprint = torch_finetune.finetune_fingerprint
    other_teacher = shutil.copytree(teacher, tmp_path / "teacher2")
    with torch.no_grad():
        model, spec = load_model(other_teacher)
        next(model.parameters()).add_(1.0)
    save_model(model, spec, other_teacher)
    other_alpha = copy.deepcopy(cfg)
    other_alpha["finetune"]["distill"]["alpha"] = 0.5
    prints = {
        fingerprint(cfg, pruned, data, teacher),
        fingerprint(cfg, pruned, data, other_teacher),
        fingerprint(other_alpha, pruned, data, teacher),
        fingerprint(_cfg(tmp_path, epochs=2, distill=None), pruned, data, teacher),
    }
    assert len(prints) == 4


def test_qat_fingerprint_reads_finetune_distill_and_the_teacher(project, tmp_path):
    from shrinkflow.backends.torch.quantize import quantize_fingerprint

    data = load_prepared(project / "prepared")
    baseline = project / "torch/baseline"
    cfg, plain = _cfg(tmp_path), _cfg(tmp_path, distill=None)
    distilled = quantize_fingerprint(cfg, "qat_int8", baseline, data, baseline)
    assert distilled != quantize_fingerprint(plain, "qat_int8", baseline, data, baseline)
    # a method that does not train reads neither
    static = {quantize_fingerprint(c, "static_int8", baseline, data) for c in (plain, plain)}
    assert len(static) == 1


# --- tensorflow fine-tuning ----------------------------------------------------------------


def _tf_baseline(folder: Path, data) -> Path:
    """An untrained Keras resnet20 for ``data``, as a tensorflow baseline node."""
    from shrinkflow.backends.tensorflow.artifact import save_model as save_keras
    from shrinkflow.backends.tensorflow.models import create_model as create_keras

    model = create_keras("resnet20", data.num_classes, data.channels, data.image_size,
                         data.mean, data.std)  # fmt: skip
    save_keras(model, model_spec("resnet20", data), folder)
    return _node(folder, "tensorflow", "baseline")


def test_tensorflow_finetune_distils_and_logs_alpha_and_temperature(project, tmp_path):
    import mlflow

    from shrinkflow.backends.tensorflow.artifact import load_model as load_keras
    from shrinkflow.backends.tensorflow.artifact import save_model as save_keras

    data = load_prepared(project / "prepared")
    (tmp_path / "baseline").mkdir()
    baseline = _tf_baseline(tmp_path / "baseline", data)
    model, spec = load_keras(baseline)
    for layer in model.layers:
        if getattr(layer, "kernel", None) is not None:
            w = layer.kernel.numpy()
            layer.kernel.assign(w * (np.abs(w) > np.median(np.abs(w))))
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    save_keras(model, spec, pruned)
    _node(pruned, "tensorflow", "pruned", **PRUNED_POINT)
    cfg = _cfg(tmp_path)
    out = tmp_path / "finetuned/model"
    finetune_stage.run(cfg, pruned, project / "prepared", out, baseline)
    facts = read_yaml(out / "train.json")
    assert facts["epochs"] == 1 and math.isfinite(facts["history"][0]["train_loss"])
    assert 0.0 <= facts["history"][0]["train_top1"] <= 1.0
    tuned, _ = load_keras(out)
    kernels = {
        layer.name: layer.kernel.numpy()
        for layer in model.layers
        if getattr(layer, "kernel", None) is not None
    }
    for layer in tuned.layers:
        if layer.name in kernels:
            assert (layer.kernel.numpy()[kernels[layer.name] == 0] == 0).all()
    client = mlflow.MlflowClient(cfg["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("distill-jobs").experiment_id])
    assert run.data.params["finetune.distill.alpha"] == "0.7"
    assert run.data.params["finetune.distill.temperature"] == "4.0"
